"""Frozen, versioned quantization configs with a JSON round trip, and the two presets."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import UserError
from .primitives import MAX_BITS, MIN_BITS

CONFIG_VERSION = 1
FLOAT_BIT_VALUES = (16, 32)


@dataclass(frozen=True)
class QuantScheme:
    """How each tensor kind is quantized; a preset names one scheme."""

    w_method: str          # range search for weights: minmax | mse
    w_symmetric: bool
    a_method: str          # range search for activations: minmax | percentile | mse
    log2_softmax: bool     # log-√2 quantizer on post-softmax attention (else it stays float)
    reparam: bool          # RepQ-ViT LayerNorm scale reparameterization
    reparam_strength: float = 1.0   # exponent α of the channel scaling (1: RepQ-ViT)
    reparam_shift: bool = True      # RepQ-ViT's zero-point alignment of the channels


PRESETS = {
    # RepQ-ViT class: MSE-searched per-channel weights, MSE-searched per-tensor activations,
    # log-√2 post-softmax quantizer; post-LayerNorm channels reparameterized at half strength
    # without the zero-point shift (ours: far less sensitive to synthetic calibration images).
    "repq": QuantScheme(w_method="mse", w_symmetric=True, a_method="mse", log2_softmax=True, reparam=True,
                        reparam_strength=0.5, reparam_shift=False),
    # RepQ-ViT as published: every post-LayerNorm pair reparameterized at full strength.
    "repq-vit": QuantScheme(w_method="mse", w_symmetric=True, a_method="mse", log2_softmax=True, reparam=True),
    # PSAQ-ViT's (FQ-ViT-derived) naive quantizer: per-channel min-max weights, per-tensor
    # min-max activations, softmax output left in float.
    "psaq": QuantScheme(w_method="minmax", w_symmetric=True, a_method="minmax", log2_softmax=False, reparam=False),
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
    preset: str = "repq"
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
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))
