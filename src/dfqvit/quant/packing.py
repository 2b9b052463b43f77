"""Integer codes packed at their bit-width: what a saved quantized model stores instead of
float weights.

Layout (little end first, like ONNX's INT4/UINT4 tensors):

=========  ==============  ===================================================================
bits       field width     storage
=========  ==============  ===================================================================
2          2 bits          four codes per byte; code ``i`` sits in bits ``2*(i%4)..2*(i%4)+1``
3, 4       4 bits          two codes per byte, first code in the low nibble. 3-bit codes use
                           a whole nibble: a 3-bit stream would save 25 % more but its codes
                           straddle bytes, and nibbles are exactly ONNX's INT4/UINT4 layout
                           (and what int4 kernels such as ORT's MatMulNBits read)
5 .. 8     8 bits          one code per byte: ``int8`` for signed grids, ``uint8`` for unsigned
=========  ==============  ===================================================================

Signed grids (symmetric weights, ``[-(2^(b-1)-1), 2^(b-1)-1]``) are stored in two's complement
within the field, unsigned grids (``[0, 2^b-1]``) as is. The packed buffer is flat: the
tensor's shape travels in the metadata. ``unpack_codes(pack_codes(c, b, s), b, s, shape) == c``
exactly for every code of the grid.
"""
from __future__ import annotations

import torch

from . import primitives as P
from .quantizers import WeightQuantizer

PACK_SUFFIX = ".packed"   # state-dict key of the packed codes: "<weight key>.packed"


def field_bits(bits: int) -> int:
    """Storage width of one ``bits``-bit code (2, 4 or 8)."""
    if not P.MIN_BITS <= bits <= P.MAX_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes (supported: {P.MIN_BITS}..{P.MAX_BITS})")
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def storage_dtype(bits: int, signed: bool) -> torch.dtype:
    """dtype of the packed buffer: uint8 bytes for sub-byte fields, int8/uint8 codes for 8-bit fields."""
    return (torch.int8 if signed else torch.uint8) if field_bits(bits) == 8 else torch.uint8


def packed_numel(numel: int, bits: int) -> int:
    per_byte = 8 // field_bits(bits)
    return (numel + per_byte - 1) // per_byte


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer ``codes`` (any integer or integral float dtype) into a flat byte tensor."""
    width = field_bits(bits)
    qmin, qmax = P.qrange(bits, signed)
    flat = codes.detach().flatten().to(torch.int32).cpu()
    if flat.numel() and (int(flat.min()) < qmin or int(flat.max()) > qmax):
        raise ValueError(f"codes outside the {bits}-bit {'signed' if signed else 'unsigned'} grid [{qmin}, {qmax}]")
    if width == 8:
        return flat.to(storage_dtype(bits, signed))
    per_byte = 8 // width
    mask = (1 << width) - 1
    fields = (flat & mask).to(torch.uint8)  # two's complement within the field for negatives
    pad = (-fields.numel()) % per_byte
    if pad:
        fields = torch.cat([fields, fields.new_zeros(pad)])
    fields = fields.view(-1, per_byte)
    out = torch.zeros(fields.shape[0], dtype=torch.uint8)
    for i in range(per_byte):
        out |= fields[:, i] << (width * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, shape) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes of ``shape``."""
    width = field_bits(bits)
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(f"packed buffer has {packed.numel()} bytes, expected {packed_numel(numel, bits)} "
                         f"for {numel} {bits}-bit codes")
    if width == 8:
        return packed.to(torch.int32).reshape(tuple(shape))
    per_byte = 8 // width
    mask = (1 << width) - 1
    b = packed.to(torch.int32)
    fields = torch.stack([(b >> (width * i)) & mask for i in range(per_byte)], dim=1).flatten()[:numel]
    if signed:
        fields = torch.where(fields >= (1 << (width - 1)), fields - (1 << width), fields)
    return fields.reshape(tuple(shape))


def _view(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (weight.ndim - 1))) if t.numel() > 1 else t.reshape(())


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in float32, per output channel (dim 0) or per tensor —
    the arithmetic of torch's fake-quant kernels and of ONNX DequantizeLinear."""
    s = _view(scale.float(), codes)
    z = _view(zero_point.round(), codes)
    return (codes.float() - z) * s


def packable(mod) -> bool:
    """Whether ``mod``'s weight is stored as packed codes: a calibrated, enabled, integer weight quantizer."""
    wq = getattr(mod, "weight_quant", None)
    return isinstance(wq, WeightQuantizer) and wq.active and isinstance(getattr(mod, "weight", None), torch.Tensor)
