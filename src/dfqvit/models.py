"""Build a model from a timm name, ``zoo:`` name, kwargs and checkpoint, with its data config.

The flags mirror timm's ``validate.py`` so that a user's command line carries over.
"""
from __future__ import annotations

import ast
import contextlib
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import resolve_model_data_config

from .errors import UserError, first_line

ZOO_DIR = Path(__file__).parent / "zoo"
ZOO_PREFIX = "zoo:"
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: travels with quantized artifacts."""

    name: str                      # timm model name (zoo names resolved)
    kwargs: dict = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    data_config: dict = field(default_factory=dict)  # overrides on timm's resolved config
    zoo: str | None = None         # the zoo entry it came from, if any


def parse_kwargs(items: list[str] | None, flag: str = "--model-kwargs", example: str = "depth=6") -> dict:
    """``key=value`` strings to a dict, values parsed as Python literals like timm's validate.py."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"bad {flag} item {item!r}: expected key=value, e.g. {example}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare word such as act_layer=gelu stays a string
    return kwargs


def zoo_names() -> list[str]:
    return sorted(ZOO_PREFIX + p.stem for p in ZOO_DIR.glob("*.json"))


def zoo_card(name: str) -> dict:
    """The JSON card of a bundled model (``zoo:deit-fmnist`` or ``deit-fmnist``)."""
    stem = name.removeprefix(ZOO_PREFIX)
    path = ZOO_DIR / f"{stem}.json"
    if not path.is_file():
        hint = difflib.get_close_matches(ZOO_PREFIX + stem, zoo_names(), n=3)
        raise UserError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names()) or 'none'}"
                        + (f" (did you mean {hint[0]}?)" if hint else ""))
    return json.loads(path.read_text())


def resolve_spec(model: str, *, kwargs: dict | None = None, checkpoint: str | None = None,
                 pretrained: bool = False, data_overrides: dict | None = None) -> ModelSpec:
    """Turn command-line style arguments into a :class:`ModelSpec` (zoo cards filled in)."""
    overrides = {k: v for k, v in (data_overrides or {}).items() if v is not None}
    if model.startswith(ZOO_PREFIX):
        card = zoo_card(model)
        return ModelSpec(
            name=card["timm_name"], kwargs={**card["model_kwargs"], **(kwargs or {})},
            checkpoint=checkpoint or str(ZOO_DIR / card["checkpoint"]),
            data_config={**card["data_config"], **overrides}, zoo=model,
        )
    return ModelSpec(name=model, kwargs=dict(kwargs or {}), checkpoint=checkpoint,
                     pretrained=pretrained, data_config=overrides)


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    candidates = timm.list_models() + zoo_names()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models()` or zoo:* names."
    raise UserError(f"unknown model {name!r}.{hint}")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth`` (weights only) checkpoint; unwraps ``state_dict``/``model``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    except Exception as e:  # pickle refuses non-weight objects with its own error types
        raise UserError(f"cannot read checkpoint {path} as weights only: {first_line(e)}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or ±Inf: a model computed with them reports garbage, not an error."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise UserError(f"{source} holds NaN or infinite values in {shown}; the checkpoint is damaged "
                        "or came from a diverged training run")


def load_checkpoint_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load ``state`` into ``model``; on mismatch, one message listing every difference."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise UserError(f"checkpoint {source} does not fit the model ({'; '.join(parts)}). "
                        "Check --model, --model-kwargs and --num-classes.")
    check_finite(state, f"checkpoint {source}")
    model.load_state_dict(state)


@contextlib.contextmanager
def _quiet_hub():
    """The hub client logs each failed request as a warning; the failure becomes our one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pretrained_error(name: str, e: BaseException) -> UserError:
    return UserError(f"cannot get timm's pretrained weights for {name} ({type(e).__name__}: {first_line(e)}); "
                     "without network access pass --checkpoint FILE instead of --pretrained (or pre-fill "
                     "the Hugging Face cache and set HF_HUB_OFFLINE=1)")


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Create the timm model of ``spec`` in eval mode, with its checkpoint loaded."""
    _check_model_name(spec.name)
    try:
        with _quiet_hub() if spec.pretrained else contextlib.nullcontext():
            model = timm.create_model(spec.name, pretrained=spec.pretrained, **spec.kwargs)
    except TypeError as e:
        raise UserError(f"bad --model-kwargs for {spec.name}: {e}") from None
    except (ValueError, AssertionError, RuntimeError) as e:
        if spec.pretrained:
            raise _pretrained_error(spec.name, e) from None
        raise UserError(f"cannot build {spec.name} with {spec.kwargs}: {e or type(e).__name__}") from None
    except Exception as e:  # the hub client raises its own types (no network, no such weights, no cache)
        if spec.pretrained:
            raise _pretrained_error(spec.name, e) from None
        raise
    if spec.checkpoint:
        load_checkpoint_strict(model, load_state_dict(spec.checkpoint), spec.checkpoint)
    return model.eval()


def resolve_data_config(model: torch.nn.Module, overrides: dict | None = None) -> dict:
    """timm's data config for ``model`` with ``overrides`` applied (like validate.py's args)."""
    cfg = resolve_model_data_config(model)
    # timm reads input_size from the pretrained config (224 for most names); a model built
    # with other img_size / in_chans kwargs knows its own input size better.
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        in_chans = patch_embed.proj.in_channels
        cfg["input_size"] = (in_chans, *patch_embed.img_size)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}  # None: not given
    for key, value in given.items():
        if key not in DATA_CONFIG_KEYS:
            raise UserError(f"unknown data config key {key!r}; known: {', '.join(DATA_CONFIG_KEYS)}")
        cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg["input_size"] = tuple(int(v) for v in cfg["input_size"])
    _check_input_size(model, cfg["input_size"])
    in_chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        value = tuple(float(v) for v in cfg[key])
        if len(value) == 1:
            value = value * in_chans
        elif in_chans == 1 and len(value) == 3 and key not in given:
            value = (sum(value) / 3,)  # RGB defaults on a grayscale model: use their average
        if len(value) != in_chans:
            raise UserError(f"--{key} has {len(value)} values but the model has {in_chans} input channels")
        cfg[key] = value
    return cfg


def _check_input_size(model: torch.nn.Module, input_size: tuple[int, int, int]) -> None:
    """A ViT / Swin built for one image size and channel count takes only that: say so up front."""
    if len(input_size) != 3 or min(input_size) < 1:
        raise UserError(f"--input-size must be three positive numbers C H W (got {' '.join(map(str, input_size))})")
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    if proj is not None and getattr(proj, "in_channels", None) and proj.in_channels != input_size[0]:
        raise UserError(f"the model takes {proj.in_channels}-channel images but the input size is "
                        f"{'x'.join(map(str, input_size))}; fix --input-size or build it with --in-chans")
    img_size = getattr(patch_embed, "img_size", None)
    strict = getattr(patch_embed, "strict_img_size", True) and not getattr(patch_embed, "dynamic_img_size", False)
    if img_size and strict and tuple(img_size) != tuple(input_size[1:]):
        raise UserError(f"the model was built for {img_size[0]}x{img_size[1]} images but the input size is "
                        f"{input_size[1]}x{input_size[2]}; fix --input-size, or build the model for that size "
                        f"with --img-size (its checkpoint must fit)")


def load_model(model: str, **kwargs) -> tuple[torch.nn.Module, dict, ModelSpec]:
    """Convenience: ``resolve_spec`` + ``build_model`` + ``resolve_data_config``."""
    spec = resolve_spec(model, **kwargs)
    net = build_model(spec)
    return net, resolve_data_config(net, spec.data_config), spec


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
