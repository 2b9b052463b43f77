"""Save / reload quantized models: ``model.safetensors`` + ``quantization_config.json``.

Format 2 stores every active quantized weight (a calibrated :class:`WeightQuantizer` below
16 bits) as its integer codes packed at their bit-width (:mod:`dfqvit.quant.packing`: 2-bit
four per byte, 3- and 4-bit two per byte, 5- to 8-bit one per byte) under
``<name>.weight.packed``, next to the per-channel ``weight_quant.scale`` (float32); the zero
point of a symmetric grid is all zeros and is not stored. Everything else (biases, LayerNorm,
position embeddings, activation quantizer ranges, float layers) is stored as is.

On reload the weight is rebuilt as ``(code - zero_point) * scale``, which is bit for bit the
fake-quantized weight the saved model computed with, so the reloaded model's outputs equal
the saved model's exactly. The float weights before quantization are **not** recoverable
from a saved quantized model (keep the FP32 checkpoint for that). Format-1 directories
(float weights) still load.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

from .. import __version__
from ..acm import ACMConfig, ActivationCorrection, Corrected, attach_corrections, correction_layout
from ..errors import UserError, first_line
from ..fileio import atomic_dir
from ..models import ModelSpec, build_model, load_checkpoint_strict
from .config import QuantConfig
from .convert import quantize_model, quantizers
from .modules import InputFold
from .packing import PACK_SUFFIX, dequantize_codes, field_bits, pack_codes, packable, unpack_codes
from .quantizers import ActQuantizer, Quantizer

FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "dfqvit"
CONFIG_FILE = "quantization_config.json"


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def packed_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The state dict to save: quantized weights replaced by packed codes. Returns
    (state, packing table ``{weight key: {bits, signed, shape, field_bits, zero_point}}``)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    table: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if not packable(mod):
            continue
        p = _prefix(name)
        wq = mod.weight_quant
        key = p + "weight"
        codes = wq.int_weight(mod.weight)
        # Guarantee: the codes dequantize to exactly the weight the model computes with.
        if not torch.equal(dequantize_codes(codes, wq.scale, wq.zero_point), wq(mod.weight.float()).float()):
            continue  # cannot happen with torch's fake-quant arithmetic; keep the float weight then
        signed = wq.symmetric
        state[key + PACK_SUFFIX] = pack_codes(codes, wq.bits, signed)
        del state[key]
        entry = {"bits": wq.bits, "signed": signed, "shape": list(codes.shape), "field_bits": field_bits(wq.bits),
                 "zero_point": "stored"}
        if signed and not bool(wq.zero_point.any()):
            del state[p + "weight_quant.zero_point"]
            entry["zero_point"] = "zeros"
        table[key] = entry
    return state, table


def unpack_state_dict(state: dict[str, torch.Tensor], table: dict[str, dict],
                      template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`packed_state_dict`: float weights rebuilt from codes and scales."""
    state = dict(state)
    for key, entry in table.items():
        p = key[: -len("weight")]
        packed = state.pop(key + PACK_SUFFIX, None)
        scale = state.get(p + "weight_quant.scale")
        if packed is None or scale is None:
            raise UserError(f"packed weight {key} is incomplete in the saved model (file damaged?)")
        if entry.get("zero_point") == "zeros":
            state[p + "weight_quant.zero_point"] = torch.zeros_like(template.get(p + "weight_quant.zero_point", scale))
        try:
            codes = unpack_codes(packed, int(entry["bits"]), bool(entry["signed"]), entry["shape"])
        except ValueError as e:
            raise UserError(f"cannot unpack {key}: {e}") from None
        weight = dequantize_codes(codes, scale, state[p + "weight_quant.zero_point"])
        dtype = template[key].dtype if key in template else torch.float32
        state[key] = weight.to(dtype)
    return state


def fp32_safetensors_bytes(model: torch.nn.Module) -> int:
    """Size of the FP32 safetensors file of the float model this quantized model came from:
    its float tensors, without the quantizers' buffers and without activation corrections
    (``dfqvit.acm``, which the FP32 model does not have), under the FP32 model's key names."""
    drop, renames = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, (Quantizer, InputFold, ActivationCorrection)):
            drop.update(_prefix(name) + k for k in mod.state_dict())
        elif isinstance(mod, Corrected):
            renames.append((_prefix(name) + "module.", _prefix(name)))
    state = {}
    for k, v in model.state_dict().items():
        if k in drop:
            continue
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
        v = v.detach().cpu()
        state[k] = (v.float() if v.is_floating_point() else v).contiguous()
    return len(save(state))


def save_quantized(model: torch.nn.Module, spec: ModelSpec, config: QuantConfig, out_dir, *,
                   force: bool = False, extra: dict | None = None, extra_files: dict | None = None) -> Path:
    """Write the quantized model atomically; ``extra`` lands in the JSON (calibration, results).

    Quantized weights are stored packed (see the module docstring); the JSON records the
    packing table and ``size`` (this file's bytes vs the FP32 safetensors of the same model).
    """
    state, table = packed_state_dict(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "dfqvit_version": __version__,
        # The FP32 source; its checkpoint is only used to find the reference model again.
        "model": {**asdict(spec), "checkpoint": spec.checkpoint and str(Path(spec.checkpoint).resolve())},
        "quantization": config.to_dict(),
        **(extra or {}),
        "packed_weights": table,
    }
    # The model is the truth about its corrections (a Python caller fits them without telling us).
    layout = correction_layout(model)
    meta["acm"] = {**(meta.get("acm") or {}), **layout} if layout else {"kind": "off"}
    with atomic_dir(out_dir, force=force) as tmp:
        # One metadata key: safetensors writes its metadata map in arbitrary order, so with
        # several keys identical weights would give files that hash differently.
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={METADATA_KEY: json.dumps(
            {"dfqvit": __version__, "format_version": FORMAT_VERSION, "quantization": config.to_dict()},
            sort_keys=True)})
        file_bytes = os.path.getsize(tmp / WEIGHTS_FILE)
        fp32_bytes = fp32_safetensors_bytes(model)
        meta["size"] = {"model_safetensors_bytes": file_bytes, "fp32_safetensors_bytes": fp32_bytes,
                        "ratio": round(file_bytes / fp32_bytes, 4)}
        if spec.checkpoint and str(spec.checkpoint).endswith(".safetensors") and Path(spec.checkpoint).is_file():
            meta["size"]["fp32_checkpoint_bytes"] = os.path.getsize(spec.checkpoint)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(out_dir)


def read_meta(path) -> dict:
    """The JSON of a saved quantized model, checked enough that every later step can trust it."""
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise UserError(f"{path} is not a dfqvit quantized model (no {CONFIG_FILE}); "
                        "create one with `dfqvit quantize --out DIR`")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg} is not valid JSON: {e}") from None
    damaged = "the file was edited or damaged; restore it or quantize the model again"
    if not isinstance(meta, dict):
        raise UserError(f"{cfg} does not hold a JSON object; {damaged}")
    version = meta.get("format_version")
    if type(version) is not int:
        raise UserError(f"{cfg}: format_version must be an integer (got {version!r}); {damaged}")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer dfqvit (format {version}); upgrade dfqvit")
    for key in ("model", "quantization"):
        if not isinstance(meta.get(key), dict):
            raise UserError(f"{cfg} has no '{key}' section; {damaged}")
    try:
        ModelSpec(**meta["model"])
        QuantConfig.from_dict(meta["quantization"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{cfg}: bad 'model' or 'quantization' section ({e}); {damaged}") from None
    for key in ("packed_weights", "acm"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise UserError(f"{cfg}: '{key}' must be an object; {damaged}")
    return meta


def _read_weights(path: Path, config: QuantConfig) -> dict[str, torch.Tensor]:
    """``model.safetensors``, refused when damaged or saved with another quantization config."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the quantized model is incomplete (quantize it again)")
    try:
        with safe_open(str(path), "pt") as f:
            saved = (f.metadata() or {}).get(METADATA_KEY)
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)}): truncated or damaged; quantize the model again") from None
    if saved is not None:
        try:
            stored = QuantConfig.from_dict(json.loads(saved)["quantization"]).to_dict()
        except (json.JSONDecodeError, KeyError, TypeError, UserError):
            stored = None
        if stored != config.to_dict():
            changed = sorted(k for k in config.to_dict() if stored is None or stored.get(k) != config.to_dict()[k])
            raise UserError(f"{path.parent / CONFIG_FILE} does not match the weights saved with it "
                            f"(differs in: {', '.join(changed) or 'all'}); the JSON was edited; restore it, "
                            "or quantize the model again with the settings you want")
    return state


def reference_spec(meta: dict) -> ModelSpec | None:
    """The FP32 model a quantized model came from, if it can still be found here."""
    spec = ModelSpec(**meta["model"])
    if spec.zoo:
        from ..models import resolve_spec
        return resolve_spec(spec.zoo)
    if spec.pretrained or (spec.checkpoint and Path(spec.checkpoint).is_file()):
        return spec
    return None


def load_quantized(path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a saved quantized model; returns (model, metadata). Outputs equal the saved model's
    bit for bit; packed weights come back as their dequantized values (``code * scale``)."""
    meta = read_meta(path)
    spec = ModelSpec(**{**meta["model"], "checkpoint": None, "pretrained": False})
    config = QuantConfig.from_dict(meta["quantization"])
    model, _ = quantize_model(build_model(spec), config)
    acm = meta.get("acm")
    if isinstance(acm, dict) and acm.get("kind", "off") != "off":
        # activation corrections (dfqvit.acm) saved with the model: same structure, then load
        try:
            attach_corrections(model, ACMConfig(**acm))
        except TypeError as e:
            raise UserError(f"{Path(path) / CONFIG_FILE}: bad 'acm' section ({e})") from None
    weights = Path(path) / WEIGHTS_FILE
    state = _read_weights(weights, config)
    table = meta.get("packed_weights") or {}
    _check_code_bits(model, table, Path(path) / CONFIG_FILE)
    if table:
        state = unpack_state_dict(state, table, model.state_dict())
    state = _with_identity_input_folds(model, state)
    for name, q in quantizers(model):
        if isinstance(q, ActQuantizer):
            q.fit_saved_ranges(state, _prefix(name))
    load_checkpoint_strict(model, state, str(weights))
    return model.eval(), meta


def _with_identity_input_folds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Models saved before input folds existed have none in their file: theirs are
    the identity, which the freshly built model's buffers are."""
    fold_keys = {_prefix(name) + k for name, mod in model.named_modules() if isinstance(mod, InputFold)
                 for k in mod.state_dict()}
    if not fold_keys or fold_keys & set(state):
        return state
    own = model.state_dict()
    return {**state, **{k: own[k] for k in fold_keys}}


def _check_code_bits(model: torch.nn.Module, table: dict, source: Path) -> None:
    """The stored codes' bit-widths must be the ones the config gives each layer (an edited
    ``w_bits`` would otherwise reload silently with the old grid's values)."""
    modules = dict(model.named_modules())
    for key, entry in table.items():
        module = modules.get(key[: -len(".weight")])
        wq = getattr(module, "weight_quant", None)
        if not isinstance(entry, dict) or "bits" not in entry:
            raise UserError(f"{source}: bad packed_weights entry for {key}; the file was edited or damaged")
        if wq is None or wq.bits != entry["bits"]:
            raise UserError(f"{source} gives {key} {getattr(wq, 'bits', 'no')}-bit weights but its codes are stored "
                            f"at {entry['bits']} bits; the JSON was edited: restore it or quantize the model again")
