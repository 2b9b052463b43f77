"""Save / reload quantized models: ``model.safetensors`` + ``quantization_config.json``."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import UserError
from ..fileio import atomic_dir
from ..models import ModelSpec, build_model, load_checkpoint_strict
from .config import QuantConfig
from .convert import quantize_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantization_config.json"


def save_quantized(model: torch.nn.Module, spec: ModelSpec, config: QuantConfig, out_dir, *,
                   force: bool = False, extra: dict | None = None, extra_files: dict | None = None) -> Path:
    """Write the quantized model atomically; ``extra`` lands in the JSON (calibration, results)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "dfqvit_version": __version__,
        # The FP32 source; its checkpoint is only used to find the reference model again.
        "model": {**asdict(spec), "checkpoint": spec.checkpoint and str(Path(spec.checkpoint).resolve())},
        "quantization": config.to_dict(),
        **(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir, force=force) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "dfqvit": __version__})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(out_dir)


def read_meta(path) -> dict:
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        raise UserError(f"{path} is not a dfqvit quantized model (no {CONFIG_FILE}); "
                        "create one with `dfqvit quantize --out DIR`")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg} is not valid JSON: {e}") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer dfqvit (format {meta['format_version']}); upgrade dfqvit")
    return meta


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
    """Rebuild a saved quantized model; returns (model, metadata). Outputs equal the saved model's."""
    meta = read_meta(path)
    spec = ModelSpec(**{**meta["model"], "checkpoint": None, "pretrained": False})
    config = QuantConfig.from_dict(meta["quantization"])
    model, _ = quantize_model(build_model(spec), config)
    weights = Path(path) / WEIGHTS_FILE
    load_checkpoint_strict(model, load_file(str(weights)) if weights.is_file() else {}, str(weights))
    return model.eval(), meta
