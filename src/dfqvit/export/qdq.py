"""Export-friendly forms of the quantizers: torch autograd functions whose ``symbolic`` emits
ONNX QuantizeLinear / DequantizeLinear with our scales and zero points, and a context
manager that swaps them into a calibrated fake-quant model for the duration of an export.

Exactness (what the exported graph computes vs the PyTorch simulation):

* **Weights** (any 2..8 bits, symmetric or asymmetric, per channel or per tensor): stored as
  their integer codes in an 8-bit container feeding ``DequantizeLinear``, shifted by a constant
  with their zero point (the same values dequantize), so ``(q - z) * s`` is bit for bit the
  fake-quantized weight of the simulation (checked at export time). Which container: ONNX
  Runtime's fused ``MatMulIntegerToFloat`` on x86 CPUs without VNNI (AVX2, AVX-512BW) sums
  pairs of uint8 × int8 products in int16, which saturates for full 8-bit int8 weights
  (measured wrong by whole steps) but not for codes of magnitude ≤ 64 (2 · 255 · 64 < 2^15;
  measured exact at the extremes). So weights of at most 7 bits go in an *int8* container,
  centred on zero, which takes that fast u8·s8 kernel (~18 vs ~25 ms for u8·u8 on a DeiT-S
  fc1-shaped matmul, one AVX2 thread; docs/RESULTS.md); 8-bit weights go in a *uint8* container
  (a signed grid shifted up by ``2^(b-1)``), exact everywhere on the slower u8·u8 kernel.
  ``weight_format="int8-vnni"`` puts 8-bit weights in the int8 container too: the fast u8·s8
  kernel for W8 as well, exact on CPUs with VNNI or AMX (whose instructions sum in int32) and
  wrong by whole steps on the others, so it is for files that will run on such CPUs.
  Optionally (opset 21, ``weight_format="int4"``) weights of at most 4 bits are stored as
  UINT4 instead.
* **Input folds** (:class:`~dfqvit.quant.modules.InputFold`, preset ``repq-comp``): the
  channel map in front of a Linear's input quantizer is exported as the same float ``Add`` and
  ``Div`` that the simulation computes, so the quantizer after it stays per tensor.
* **Activations** (per-tensor uniform, 2..8 bits): ``QuantizeLinear`` to uint8 (int8 for a
  signed grid) with our scale and zero point; below the container's full range the integer
  code is clamped by ``Clip`` on the quantized (integer) tensor before ``DequantizeLinear`` —
  the same clamp torch's fake-quant applies, so a 4-bit quantizer is exactly a 4-bit
  quantizer. Rounding: torch computes ``round(x · (1/s))``, ONNX ``round(x / s)``; they differ
  for a value within one float rounding of a tie (measured 1.5e-6 of the values: one step).
  ``torch_rounding=True`` emits ``QuantizeLinear(x · (1/s), scale 1)`` instead, which matches
  torch bit for bit (verified on 12M values) at the price of one Mul per quantizer.
* **Per-token q and k** (preset ``repq-comp`` below 8 bits): one scale ``s_t`` and zero point
  ``z_t`` per token of q (rows of q·kᵀ) and of kᵀ (columns). Each operand is exported as its
  codes centred on their own zero point, ``clamp(round(x · (1/s_t)), qmin − z_t, qmax − z_t)``
  (Mul, Max, Min), in a QuantizeLinear → DequantizeLinear pair of scale 1 and one zero point
  for all tokens, so ORT keeps its integer matmul; the product is then rescaled by the constant
  outer product ``s_q · s_kᵀ``. The codes are torch's bit for bit; only the float rescale
  rounds differently (~1e-7 relative). ORT's per-axis DequantizeLinear cannot be used: its
  fusion into ``MatMulIntegerToFloat`` rejects a per-row scale of the first operand.
* **Whole network**: ORT's integer matmuls (exact int32 sums × ``s_a·s_w``) and float ops sum
  in another order than torch, so values before the next quantizer differ by ~1e-7
  relative and occasionally cross a rounding boundary: outputs agree to ~1e-7 for most
  inputs and differ by a few quantization steps for the rest (see the tests' tolerance).
* **Post-softmax log-√2 quantizer** (preset ``repq``), three modes:
  ``"emulate"`` (default): the same function with float ONNX ops (Div, Log, Mul, Round, Clip
  for the code; a code may differ only for inputs within float rounding of a decision boundary,
  as ONNX has no log2: ``ln(x) · (1 / ln 2)``). The level ``delta · 2^(-q/2)``: by default
  ``delta · exp(-q ln2 / 2)`` (Mul, Exp, Mul, and Where for the "zero" code below 8 bits),
  a few float ulps from torch's levels; with ``torch_rounding`` a Gather from a table of
  torch's levels, bit for bit, which cost ORT 19 % of a DeiT-T's batch-1 run. attn·V then
  stays a float MatMul, and these element-wise ops on the attention map still cost much of
  what the integer matmuls save (see ``benchmarks/bench_latency.py``).
  ``"uint8"``: approximated by a uniform uint8 QDQ on ``[0, delta]`` (scale ``delta/255``,
  zero point 0), so attn·V can run as an integer matmul — an approximation, not the
  simulated function.
  ``"float"``: the quantizer is dropped (probabilities stay float) — also not exact.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from ..quant import primitives as P
from ..quant.modules import QUANT_MODULES, QConv2d, QLinear, QMatMul
from ..quant.packing import dequantize_codes
from ..quant.quantizers import ActQuantizer, Log2Quantizer, Quantizer, WeightQuantizer

LOG2_MODES = ("emulate", "uint8", "float")
WEIGHT_FORMATS = ("int8", "int8-vnni", "int4")


def _const(g, value, dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


class QDQFunction(torch.autograd.Function):
    """Per-tensor uniform fake quantization → [Mul] QuantizeLinear [→ Clip] → DequantizeLinear.

    With ``torch_rounding`` the input is first multiplied by ``float32(1 / scale)`` and
    quantized with scale 1, which is exactly torch's fake-quant arithmetic (``round(x · (1/s))``),
    so even rounding ties land on the same code; ONNX Runtime still fuses the DequantizeLinear
    (scale ``s``) into its integer matmuls. Without it, the standard QDQ pair (``round(x / s)``)
    may differ from torch at ties (one step, ~1e-6 of the values)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int, torch_rounding: bool = False):
        return torch.fake_quantize_per_tensor_affine(
            x.float(), torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.int32),
            qmin, qmax).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, torch_rounding=False):
        dtype = torch.int8 if qmin < 0 else torch.uint8
        full = (-128, 127) if qmin < 0 else (0, 255)
        s, z = _const(g, scale, torch.float32), _const(g, zero_point, dtype)
        if torch_rounding:
            inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32)
            q = g.op("QuantizeLinear", g.op("Mul", x, g.op("Constant", value_t=inv)), _const(g, 1.0, torch.float32), z)
        else:
            q = g.op("QuantizeLinear", x, s, z)
        if (qmin, qmax) != full:
            q = g.op("Clip", q, _const(g, qmin, dtype), _const(g, qmax, dtype))
        return g.op("DequantizeLinear", q, s, z)


class CentredCodesFunction(torch.autograd.Function):
    """The codes of a per-token quantizer, each token centred on its own zero point, as float:
    ``clamp(round(x · inv_scale_t), lo_t, hi_t)`` along ``axis`` (negative). Exported as Mul,
    Max, Min and, where ``offset`` is given, a QuantizeLinear → DequantizeLinear pair of scale 1
    and zero point ``offset`` (uint8: all codes + offset lie in [0, 255]) that ORT fuses into its
    integer matmul; without it as Round (float)."""

    # the per-token vectors come as tuples of Python numbers: tensor arguments would become graph inputs
    @staticmethod
    def forward(ctx, x, inv_scale: tuple, lo: tuple, hi: tuple, axis: int, offset: int | None):
        shape = [-1] + [1] * (-axis - 1)
        vec = lambda v: torch.tensor(v, dtype=torch.float32, device=x.device).reshape(shape)  # noqa: E731
        return torch.minimum(torch.maximum((x.float() * vec(inv_scale)).round(), vec(lo)), vec(hi)).to(x.dtype)

    @staticmethod
    def symbolic(g, x, inv_scale, lo, hi, axis, offset):
        shape = [-1] + [1] * (-axis - 1)
        vec = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32).reshape(shape))  # noqa: E731
        scaled = g.op("Mul", x, vec(inv_scale))
        if offset is None:
            scaled = g.op("Round", scaled)
        # clamping before rounding gives the same codes: the bounds are integers
        codes = g.op("Min", g.op("Max", scaled, vec(lo)), vec(hi))
        if offset is None:
            return codes
        one, z = _const(g, 1.0, torch.float32), _const(g, offset, torch.uint8)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", codes, one, z), one, z)


class Log2Function(torch.autograd.Function):
    """The log-√2 quantizer with float ONNX ops (mode ``"emulate"``).

    The code ``q`` is computed the same way either way; its level ``delta · 2^(-q/2)`` comes
    from a Gather into a table of torch's own levels with ``exact_levels`` (bit for bit, for
    ``rounding="torch"``), else from one vectorised Exp (``exp(-q ln2 / 2)``: a few float ulps
    from torch's ``exp2``, about 5x cheaper in ORT than the Gather)."""

    @staticmethod
    def forward(ctx, x, delta: float, bits: int, exact_levels: bool = False):
        return P.log2_fake_quant(x, torch.tensor(delta, dtype=torch.float32), bits)

    @staticmethod
    def symbolic(g, x, delta, bits, exact_levels=False):
        levels = 2 ** bits
        # the simulation clamps x/delta at 1e-30, i.e. code 199: below 8 bits that is past the last
        # level (the "zero" code), so the clamp only matters from 8 bits on
        zero_code = -2 * math.log2(1e-30) >= levels
        ratio = g.op("Div", x, _const(g, delta, torch.float32))
        if not zero_code:
            ratio = g.op("Max", ratio, _const(g, 1e-30, torch.float32))
        # log(0) = -inf -> code +inf -> clipped to 2^bits -> 0, like the simulation
        q = g.op("Round", g.op("Mul", g.op("Log", ratio), _const(g, -2.0 / math.log(2.0), torch.float32)))
        q = g.op("Clip", q, _const(g, 0.0, torch.float32), _const(g, float(levels), torch.float32))
        if exact_levels:
            d = torch.tensor(delta, dtype=torch.float32)
            table = torch.cat([d * torch.exp2(-torch.arange(levels, dtype=torch.float32) / 2), torch.zeros(1)])
            return g.op("Gather", g.op("Constant", value_t=table), g.op("Cast", q, to_i=6), axis_i=0)  # INT32
        level = g.op("Mul", g.op("Exp", g.op("Mul", q, _const(g, -math.log(2.0) / 2, torch.float32))),
                     _const(g, delta, torch.float32))
        if not zero_code:
            return level
        return g.op("Where", g.op("Less", q, _const(g, float(levels), torch.float32)), level, _const(g, 0.0, torch.float32))


class DequantizeWeight(torch.autograd.Function):
    """Integer weight codes (a constant) → DequantizeLinear (per channel along ``axis`` or per tensor)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):
        if scale.ndim == 0:
            return (codes.float() - zero_point.float()) * scale
        shape = [1] * codes.ndim
        shape[axis] = -1
        return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


@dataclass
class ExportPlan:
    """What the export swap did: quantized layers and their bits, layers kept float, notes."""

    weight_bits: dict[str, int] = field(default_factory=dict)      # module -> weight bits
    act_bits: dict[str, int] = field(default_factory=dict)         # quantizer -> activation bits
    log2: dict[str, int] = field(default_factory=dict)             # log2 quantizer -> bits
    float_layers: list[str] = field(default_factory=list)          # quantizable layers left float
    uncalibrated: list[str] = field(default_factory=list)          # quantizers never calibrated
    codes: dict[str, int] = field(default_factory=dict)  # codes buffer (8-bit container) -> bits
    patch_as_matmul: list[str] = field(default_factory=list)
    rounded_zero_points: list[str] = field(default_factory=list)  # fractional in the simulation (repq-vit)


SIGNED_CONTAINER_MAX_BITS = 7   # int8 codes of magnitude <= 64 never saturate the AVX2 u8·s8 kernel


def weight_container(bits: int, symmetric: bool,
                     signed_max_bits: int = SIGNED_CONTAINER_MAX_BITS) -> tuple[torch.dtype, int]:
    """(container dtype, what to add to a weight grid's codes and zero point) for ``bits``-bit
    codes: int8 centred on zero up to ``signed_max_bits`` (7, or 8 for ``int8-vnni``), else uint8
    (see the module docstring)."""
    if bits <= signed_max_bits:
        return torch.int8, 0 if symmetric else -(2 ** (bits - 1))
    return torch.uint8, 2 ** (bits - 1) if symmetric else 0


def _act_forward(q: ActQuantizer, torch_rounding: bool):
    qmin, qmax = P.qrange(q.bits, q.symmetric)
    scale, zp = float(q.scale.float().reshape(-1)[0]), int(q.zero_point.round().reshape(-1)[0])

    def forward(x):
        return QDQFunction.apply(x, scale, zp, qmin, qmax, torch_rounding)
    return forward


def _is_per_token(q: nn.Module) -> bool:
    return isinstance(q, ActQuantizer) and q.token_axis is not None and q.active and q.scale.numel() > 1


def _centred_codes(q: ActQuantizer) -> tuple:
    """(the centred-codes function of per-token quantizer ``q``, its scales, whether the codes
    fit one byte: always below 8 bits, where every zero point lies on the grid)."""
    qmin, qmax = P.qrange(q.bits, q.symmetric)
    scale, zp = q.scale.detach().float().cpu(), q.zero_point.detach().round().float().cpu()
    lo, hi = qmin - zp, qmax - zp
    offset = int(-lo.min())
    offset = offset if int(hi.max()) + offset <= 255 else None   # else the matmul stays float
    args = (tuple(torch.reciprocal(scale).tolist()), tuple(lo.tolist()), tuple(hi.tolist()), -q.token_axis, offset)
    return (lambda x: CentredCodesFunction.apply(x, *args)), scale, offset is not None


def _token_matmul_forward(mod: QMatMul):
    """``a @ b`` with per-token operands as centred codes, rescaled after the product by the
    outer product of their scales (q: one per row of the result, kᵀ: one per column)."""
    rescale = torch.ones(())
    operands = []
    for q, rows in ((mod.a_quant, True), (mod.b_quant, False)):
        if _is_per_token(q):
            codes, scale, _ = _centred_codes(q)
            operands.append(codes)
            rescale = rescale * (scale.reshape(-1, 1) if rows else scale.reshape(1, -1))
        else:
            operands.append(q)   # swapped for its own export form
    codes_a, codes_b = operands

    def forward(a, b):
        return torch.matmul(codes_a(a), codes_b(b)) * rescale.to(a.device)
    return forward


def _log2_forward(q: Log2Quantizer, mode: str, torch_rounding: bool):
    delta = float(q.scale.float().reshape(-1)[0])
    if mode == "emulate":
        return lambda x: Log2Function.apply(x, delta, q.bits, torch_rounding)
    if mode == "uint8":
        scale = float(torch.tensor(delta / 255, dtype=torch.float32))
        return lambda x: QDQFunction.apply(x, scale, 0, 0, 255, torch_rounding)
    return lambda x: x


def _identity(x):
    return x


def _weight_codes_buffers(mod: nn.Module, transpose: bool,
                          signed_max_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes in their 8-bit container, scale, zero point, axis) of ``mod.weight``, checked to
    dequantize bit for bit to the simulated weight; with ``transpose`` for a 2-D weight used
    as ``x @ W^T`` (codes [in, out], axis 1)."""
    wq: WeightQuantizer = mod.weight_quant
    weight = mod.weight.detach().float()
    codes = wq.int_weight(weight)
    expected = wq(weight)
    if not torch.equal(dequantize_codes(codes, wq.scale, wq.zero_point), expected):
        raise UserError("internal: weight codes do not dequantize to the simulated weight; please report")
    dtype, offset = weight_container(wq.bits, wq.symmetric, signed_max_bits)
    codes = codes + offset
    scale = wq.scale.detach().float().clone()
    zp = (wq.zero_point.detach().round() + offset).to(dtype)
    axis = 0
    if not wq.per_channel or scale.numel() == 1 and weight.shape[0] != 1:
        scale, zp = scale.reshape(()), zp.reshape(())
    codes = codes.to(dtype)
    if transpose:
        codes = codes.t().contiguous()
        axis = 1
    return codes, scale, zp, axis


def _is_patchify(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == conv.stride and conv.padding in ((0, 0), 0) and conv.dilation == (1, 1)
            and conv.groups == 1)


def _linear_forward(mod: QLinear):
    def forward(x):
        x = mod.input_quant(mod.input_fold(x))   # the fold (if set) is one Add and one Div
        w_t = DequantizeWeight.apply(mod._export_codes, mod._export_scale, mod._export_zp, 1)
        if x.ndim == 2:
            # [B, C] @ W^T + b would become a float Gemm in ONNX Runtime (its MatMul+Add → Gemm
            # fusion runs before the QDQ fusions); a 3-D matmul becomes MatMulIntegerToFloat.
            return (torch.matmul(x.unsqueeze(1), w_t) + mod.bias).squeeze(1)
        return torch.matmul(x, w_t) + mod.bias
    return forward


def _conv_forward(mod: QConv2d):
    def forward(x):
        x = mod.input_quant(x)
        w = DequantizeWeight.apply(mod._export_codes, mod._export_scale, mod._export_zp, 0)
        return mod._conv_forward(x, w, mod.bias)
    return forward


def _patch_matmul_forward(mod: QConv2d, quantize_weight: bool):
    """A patch-embedding conv (kernel == stride, no padding) as patchify + MatMul, so that the
    runtime can use its integer matmul kernels; the input quantizer (per tensor, element-wise)
    commutes with the patchify reshape."""
    kh, kw = mod.kernel_size
    cin, cout = mod.in_channels, mod.out_channels

    def forward(x):
        _, _, h, w = x.shape
        hp, wp = h // kh, w // kw
        x = x[:, :, : hp * kh, : wp * kw]
        p = x.reshape(-1, cin, hp, kh, wp, kw).permute(0, 2, 4, 1, 3, 5).reshape(-1, hp, wp, cin * kh * kw)
        p = mod.input_quant(p)
        if quantize_weight:
            w_t = DequantizeWeight.apply(mod._export_codes, mod._export_scale, mod._export_zp, 1)
        else:
            w_t = mod.weight.reshape(cout, -1).t()
        y = torch.matmul(p, w_t)
        if mod.bias is not None:
            y = y + mod.bias
        return y.permute(0, 3, 1, 2)
    return forward


def check_exportable(model: nn.Module) -> None:
    """Refuse models that are not quantized, not calibrated, or carry quantizers we cannot export."""
    qs = [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
    if not qs:
        raise UserError("the model is not quantized: quantize it first (`dfqvit quantize --out DIR`, "
                        "or dfqvit.quant.quantize), or use export_float_onnx for a float model")
    if not any(q.active for _, q in qs):
        raise UserError("the quantized model is not calibrated (no quantizer has a range): run calibration "
                        "(dfqvit.quant.quantize / calibrate) before exporting")
    for name, q in qs:
        if q.observing:
            raise UserError(f"quantizer {name} is still observing (calibration not finished)")
        if isinstance(q, WeightQuantizer):
            continue
        if type(q) not in (ActQuantizer, Log2Quantizer):
            raise UserError(f"cannot export quantizer {name} of type {type(q).__name__}")
        if q.active and q.scale.numel() != 1 and not _is_per_token(q):
            raise UserError(f"cannot export {name}: only per-tensor activation quantizers are supported")
    # per-token scales factor out of a matmul only along its rows (a) and columns (b)
    matmuls = [(n, m) for n, m in model.named_modules() if isinstance(m, QMatMul)]
    factorable = {id(m.a_quant) for _, m in matmuls if getattr(m.a_quant, "token_axis", None) == 2}
    factorable |= {id(m.b_quant) for _, m in matmuls if getattr(m.b_quant, "token_axis", None) == 1}
    for name, q in qs:
        if _is_per_token(q) and id(q) not in factorable:
            raise UserError(f"cannot export {name}: its per-token ranges do not factor out of a matmul")
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quant", None)
        if isinstance(wq, WeightQuantizer) and not isinstance(mod, (QLinear, QConv2d)):
            raise UserError(f"cannot export the weight quantizer of {name} ({type(mod).__name__})")


@contextlib.contextmanager
def export_mode(model: nn.Module, log2_mode: str = "emulate", patch_as_matmul: bool = True,
                torch_rounding: bool = False, signed_max_bits: int = SIGNED_CONTAINER_MAX_BITS):
    """Swap every quantizer (and quantized Linear / Conv forward) of ``model`` for its
    export-friendly form; yields an :class:`ExportPlan`. Everything is restored on exit.
    ``signed_max_bits``: the widest weight codes put in an int8 container (see :func:`weight_container`)."""
    if log2_mode not in LOG2_MODES:
        raise UserError(f"unknown log2 softmax export mode {log2_mode!r}; choose from {', '.join(LOG2_MODES)}")
    check_exportable(model)
    plan = ExportPlan()
    swapped: list[nn.Module] = []
    buffers: list[tuple[nn.Module, str]] = []

    def swap(mod, fwd):
        mod.forward = fwd
        swapped.append(mod)

    def add_buffer(mod, name, value):
        mod.register_buffer(name, value)  # persistent: the exporter names initializers after it
        buffers.append((mod, name))

    try:
        for name, q in model.named_modules():
            if not isinstance(q, Quantizer) or isinstance(q, WeightQuantizer):
                continue
            if P.is_float(q.bits) or not q.enabled:
                swap(q, _identity)
            elif not q.calibrated:
                plan.uncalibrated.append(name)
                swap(q, _identity)
            elif isinstance(q, Log2Quantizer):
                plan.log2[name] = q.bits
                swap(q, _log2_forward(q, log2_mode, torch_rounding))
            else:
                plan.act_bits[name] = q.bits
                if q.fractional_zero_point:
                    plan.rounded_zero_points.append(name)
                if not _is_per_token(q):   # exported by its matmul, below
                    swap(q, _act_forward(q, torch_rounding))
        for mod in model.modules():
            if isinstance(mod, QMatMul) and (_is_per_token(mod.a_quant) or _is_per_token(mod.b_quant)):
                swap(mod, _token_matmul_forward(mod))
        for name, mod in model.named_modules():
            if type(mod) in QUANT_MODULES:  # quantizable, but excluded from quantization
                plan.float_layers.append(name)
                continue
            if not isinstance(mod, (QLinear, QConv2d)):
                continue
            wq = mod.weight_quant
            quantized = wq.active
            if quantized:
                plan.weight_bits[name] = wq.bits
            elif not P.is_float(wq.bits) and wq.enabled and not wq.calibrated:
                plan.uncalibrated.append(f"{name}.weight_quant")
            if not quantized and not mod.input_quant.active:
                plan.float_layers.append(name)
            if isinstance(mod, QConv2d) and patch_as_matmul and _is_patchify(mod) and mod.padding_mode == "zeros":
                if quantized:
                    codes, scale, zp, _ = _weight_codes_buffers(mod, transpose=False, signed_max_bits=signed_max_bits)
                    codes = codes.reshape(codes.shape[0], -1).t().contiguous()
                    add_buffer(mod, "_export_codes", codes)
                    add_buffer(mod, "_export_scale", scale)
                    add_buffer(mod, "_export_zp", zp)
                    plan.codes[f"{name}._export_codes"] = wq.bits
                swap(mod, _patch_matmul_forward(mod, quantized))
                plan.patch_as_matmul.append(name)
            elif quantized:
                codes, scale, zp, _ = _weight_codes_buffers(mod, transpose=isinstance(mod, QLinear),
                                                             signed_max_bits=signed_max_bits)
                add_buffer(mod, "_export_codes", codes)
                add_buffer(mod, "_export_scale", scale)
                add_buffer(mod, "_export_zp", zp)
                plan.codes[f"{name}._export_codes"] = wq.bits
                swap(mod, _linear_forward(mod) if isinstance(mod, QLinear) else _conv_forward(mod))
        yield plan
    finally:
        for mod in swapped:
            mod.__dict__.pop("forward", None)
        for mod, name in buffers:
            mod._buffers.pop(name, None)
