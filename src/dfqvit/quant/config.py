"""Frozen, versioned quantization configs with a JSON round trip, and the two presets."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import UserError
from .primitives import MAX_BITS, MIN_BITS

CONFIG_VERSION = 2
# Version 2 renamed the min-max preset ("psaq" → "minmax") and redefined "repq-vit" (RepQ-ViT's
# own percentile search, asymmetric weights and calibration order).
_V1_RENAMED = {"psaq": "minmax"}
_V1_REDEFINED = ("repq-vit",)
FLOAT_BIT_VALUES = (16, 32)
ORDERS = ("float", "sequential")
WEIGHT_ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True)
class QuantScheme:
    """How each tensor kind is quantized; a preset names one scheme."""

    w_method: str          # range search for weights: minmax | percentile | mse
    w_symmetric: bool
    a_method: str          # range search for activations: minmax | percentile | mse
    log2_softmax: bool     # log-√2 quantizer on post-softmax attention (else it stays float)
    reparam: bool          # RepQ-ViT LayerNorm scale reparameterization
    reparam_strength: float = 1.0   # exponent α of the channel scaling (1: RepQ-ViT; order "float" only)
    reparam_shift: bool = True      # RepQ-ViT's zero-point alignment of the channels (order "float" only)
    # "sequential": RepQ-ViT's order — every activation range is set on the quantized stream of
    # the quantizers before it, LayerNorm consumers from searched per-channel ranges;
    # "float": all ranges observed on float activations after reparameterizing from LN min/max.
    order: str = "float"
    reparam_head: bool = True       # also reparameterize the final norm → classifier pair
    # Closed-form error compensation of every Linear (order "sequential" only; ours, see
    # dfqvit.quant.compensate): ridge update towards the FP output, then weight rounding.
    compensate: bool = False
    ridge: float = 10.0             # λ relative to mean(diag(x̂ᵀx̂)); measured 0.01..1000 on the zoo (docs/RESULTS.md)
    # Instead, λ per Linear from RIDGE_GRID by image-grouped cross-validation (ours, see
    # dfqvit.quant.compensate.ridge_by_cross_validation).
    ridge_cv: bool = False
    weight_rounding: str = "gptq"   # gptq | nearest
    # Per-channel ranges for every Linear input that no LayerNorm feeds (post-GELU, attention
    # output), made exact per-tensor ones by a channel map folded into the Linear (ours, see
    # dfqvit.quant.modules.InputFold; order "sequential" only).
    fold_inputs: bool = False
    # One range per token position for q and k in q·kᵀ (ours): exact, the scales factor out of
    # the scores as row and column rescales (order "sequential" only).
    token_ranges: bool = False

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"QuantScheme.order must be one of {ORDERS}, not {self.order!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"QuantScheme.weight_rounding must be one of {WEIGHT_ROUNDINGS}, not {self.weight_rounding!r}")
        if self.compensate and self.order != "sequential":
            raise ValueError("QuantScheme.compensate needs order='sequential'")
        if self.ridge_cv and not self.compensate:
            raise ValueError("QuantScheme.ridge_cv needs compensate=True")
        if self.fold_inputs and not self.compensate:
            raise ValueError("QuantScheme.fold_inputs needs compensate=True")
        if self.token_ranges and self.order != "sequential":
            raise ValueError("QuantScheme.token_ranges needs order='sequential'")


PRESETS = {
    # RepQ-ViT class: MSE-searched per-channel weights, MSE-searched per-tensor activations,
    # log-√2 post-softmax quantizer; post-LayerNorm channels reparameterized at half strength
    # without the zero-point shift (ours: far less sensitive to synthetic calibration images).
    "repq": QuantScheme(w_method="mse", w_symmetric=True, a_method="mse", log2_softmax=True, reparam=True,
                        reparam_strength=0.5, reparam_shift=False),
    # Ours: RepQ-ViT's quantizers and order, with exact b-bit folded LayerNorm inputs, the other
    # Linear inputs folded likewise through a channel map, one range per token for q and k, and
    # every Linear compensated in closed form (ERQ-style ridge update towards the FP output, its
    # strength cross-validated per layer, + GPTQ).
    "repq-comp": QuantScheme(w_method="percentile", w_symmetric=False, a_method="percentile", log2_softmax=True,
                             reparam=True, order="sequential", reparam_head=False, compensate=True,
                             ridge_cv=True, fold_inputs=True, token_ranges=True),
    # RepQ-ViT as published (paper + zkkli/RepQ-ViT): asymmetric per-channel weights and
    # per-tensor activations, each range the best of three percentile pairs by L2 error,
    # log-√2 post-softmax quantizer (delta likewise), calibrated in order on the quantized
    # stream; the blocks' LayerNorm → Linear pairs reparameterized from searched per-channel
    # ranges (the final norm → head pair is not).
    "repq-vit": QuantScheme(w_method="percentile", w_symmetric=False, a_method="percentile", log2_softmax=True,
                            reparam=True, order="sequential", reparam_head=False),
    # A naive min-max quantizer (per-channel symmetric weights, per-tensor activations, softmax
    # output left float). Not PSAQ-ViT's quantizer, which quantizes layer outputs (the residual
    # stream and the pre-softmax scores too); formerly, wrongly, named "psaq".
    "minmax": QuantScheme(w_method="minmax", w_symmetric=True, a_method="minmax", log2_softmax=False, reparam=False),
}


def _check_bits(name: str, bits: int | None, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS or bits in FLOAT_BIT_VALUES):
        raise UserError(f"{name}={bits!r} is not supported: use {MIN_BITS}..{MAX_BITS} bits, "
                        f"or 16/32 to keep float")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. ``first_last_bits`` keeps the patch embedding and the
    classifier at that many bits (weights and inputs); None quantizes them like the rest."""

    w_bits: int = 4
    a_bits: int = 8
    preset: str = "repq-comp"
    first_last_bits: int | None = 8
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    version: int = CONFIG_VERSION

    def __post_init__(self):
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.version > CONFIG_VERSION:
            raise UserError(f"quantization config version {self.version} is newer than this dfqvit "
                            f"understands ({CONFIG_VERSION}); upgrade dfqvit")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def scheme(self) -> QuantScheme:
        return PRESETS[self.preset]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown quantization config fields: {', '.join(sorted(unknown))}")
        if d.get("version", CONFIG_VERSION) < 2:
            preset = d.get("preset")
            if preset in _V1_REDEFINED:
                raise UserError(f"this model was quantized with the {preset!r} preset of dfqvit 0.1, which no longer "
                                f"exists in that form; quantize the FP32 model again")
            d = {**d, "preset": _V1_RENAMED.get(preset, preset), "version": CONFIG_VERSION}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))
