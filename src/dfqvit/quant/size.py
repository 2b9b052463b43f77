"""Model size at the target bit-widths (what a packed integer file holds)."""
from __future__ import annotations

from torch import nn

from . import primitives as P
from .modules import InputFold
from .quantizers import Quantizer, WeightQuantizer

FLOAT_BYTES = 4


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters: quantized weights at their bit-width plus one float scale per
    channel (and a one-byte zero point for asymmetric grids); everything else in float32."""
    total_bits = 0
    quantized = set()
    for mod in model.modules():
        wq = getattr(mod, "weight_quant", None)
        if isinstance(wq, WeightQuantizer) and not P.is_float(wq.bits):
            total_bits += mod.weight.numel() * wq.bits
            total_bits += wq.scale.numel() * (FLOAT_BYTES * 8 + (0 if wq.symmetric else 8))
            quantized.add(id(mod.weight))
    for p in model.parameters():
        if id(p) not in quantized:
            total_bits += p.numel() * FLOAT_BYTES * 8
    for mod in model.modules():  # activation quantizers: one scale + zero point each
        if isinstance(mod, Quantizer) and not isinstance(mod, WeightQuantizer) and not P.is_float(mod.bits):
            total_bits += 2 * FLOAT_BYTES * 8
        elif isinstance(mod, InputFold) and mod.active:  # a shift and a divisor per channel
            total_bits += 2 * mod.shift.numel() * FLOAT_BYTES * 8
    return (total_bits + 7) // 8
