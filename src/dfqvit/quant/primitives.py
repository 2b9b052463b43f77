"""Quantization numerics, kept apart from modules: grids, fake-quant with straight-through
gradients, the log-√2 quantizer, and range search (min-max, RepQ-ViT's percentile search, MSE).

Conventions: ``bits >= 16`` means "keep float". Symmetric grids are signed and restricted
(``[-(2^(b-1) - 1), 2^(b-1) - 1]``, zero point 0, so they map onto int8 / int4 without the
extra negative level); asymmetric grids are unsigned ``[0, 2^b - 1]`` with an integer zero point.
"""
from __future__ import annotations

import math

import torch

FLOAT_BITS = 16  # at or above this a quantizer is off
MIN_BITS, MAX_BITS = 2, 8


def is_float(bits: int | None) -> bool:
    return bits is None or bits >= FLOAT_BITS


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


class _FakeQuantCPU(torch.autograd.Function):
    """Torch's fused fake-quant arithmetic as vectorised ops (its CPU kernel is scalar, about 10x
    slower): ``(clamp(round(x · (1/s)) + z, qmin, qmax) − z) · s``, bit for bit, and its
    straight-through gradient (1 where the unclamped code lies in ``[qmin, qmax]``, else 0)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        code = (x * torch.reciprocal(scale)).round_().add_(zero_point)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((code >= qmin) & (code <= qmax))
        return code.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize (per tensor, or per channel along ``axis``) with straight-through
    gradients that vanish outside the clipping range: torch's fused kernels on a GPU, the same
    arithmetic as vectorised ops on the CPU."""
    xf = x.float()
    zp = zero_point.round()
    if not xf.is_cuda:
        shape = () if axis is None else [-1 if d == axis % xf.ndim else 1 for d in range(xf.ndim)]
        return _FakeQuantCPU.apply(xf, scale.float().reshape(shape), zp.float().reshape(shape), qmin, qmax).to(x.dtype)
    zp = zp.to(torch.int32)
    if axis is None:
        out = torch.fake_quantize_per_tensor_affine(xf, scale.float().reshape(()), zp.reshape(()), qmin, qmax)
    else:
        out = torch.fake_quantize_per_channel_affine(xf, scale.float().flatten(), zp.flatten(), axis, qmin, qmax)
    return out.to(x.dtype)


def fake_quant_fractional(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                          qmax: int) -> torch.Tensor:
    """Per-tensor fake quantization with a *fractional* zero point, in RepQ-ViT's arithmetic:
    ``(clamp(round(x / s) + z, qmin, qmax) - z) · s``. Values inside the range land on
    multiples of ``s``; the clamp ends ``(qmin - z)·s`` and ``(qmax - z)·s`` fall between them,
    so the grid has up to ``2^b + 1`` levels. Straight-through gradients inside the range."""
    xf = x.float()
    s, z = scale.float().reshape(()), zero_point.float().reshape(())
    out = (torch.clamp(torch.round(xf / s) + z, qmin, qmax) - z) * s
    inside = torch.clamp(xf, (qmin - z) * s, (qmax - z) * s)
    return (inside + (out - inside).detach()).to(x.dtype)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integer codes (as int32) that :func:`fake_quant` dequantizes."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                     eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (element-wise tensors) onto the grid."""
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return (amax / qmax).clamp_min(eps), torch.zeros_like(amax)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def log2_fake_quant(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Log-√2 quantizer for values in [0, delta] (post-softmax attention, RepQ-ViT style).

    ``q = round(-2·log2(x/delta))``; ``x̂ = delta·2^(-q/2)`` for ``q < 2^bits``, else 0.
    STE: the gradient of the output w.r.t. ``x`` is the identity.
    """
    levels = 2 ** bits
    ratio = (x / delta).clamp_min(1e-30)
    q = torch.round(-2 * torch.log2(ratio))
    xq = torch.where(q < levels, delta * torch.exp2(-q.clamp(0, levels - 1) / 2), torch.zeros_like(x))
    return x + (xq - x).detach()


def log2_codes(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of :func:`log2_fake_quant` (``2^bits`` marks an exact zero)."""
    q = torch.round(-2 * torch.log2((x / delta).clamp_min(1e-30)))
    return q.clamp(0, 2 ** bits).to(torch.int32)


def _reduce_dims(x: torch.Tensor, channel_dim: int | None) -> tuple[int, ...]:
    return tuple(range(x.ndim)) if channel_dim is None else tuple(d for d in range(x.ndim) if d != channel_dim % x.ndim)


def minmax_range(x: torch.Tensor, channel_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    dims = _reduce_dims(x, channel_dim)
    return x.amin(dim=dims), x.amax(dim=dims)


# RepQ-ViT's candidate clipping percentiles (as fractions): the range is the best of these by L2 error.
PERCENTILES = (0.999, 0.9999, 0.99999)


def quantiles(x: torch.Tensor, qs: tuple[float, ...], dim: int | None = None) -> list[torch.Tensor]:
    """Quantiles of ``x`` (over all values, or along ``dim``) at each of ``qs``, by linear
    interpolation between order statistics at rank ``q (n - 1)`` (numpy's default; torch.quantile
    rounds that rank to float32 first, so the two differ by a rank fraction for large ``n``).

    The range searches ask for 0.001- or 0.9999-type quantiles of millions of activations. Those
    need only the few most extreme values, so each tail is read with one ``topk`` shared by all its
    quantiles, 4-15x faster than torch.quantile's full sort per call; nearer the middle, one sort."""
    v = (x.reshape(-1) if dim is None else x.movedim(dim, -1)).contiguous()
    n = v.shape[-1]
    ranks = [q * (n - 1) for q in qs]
    need_top = max((n - math.floor(r) for q, r in zip(qs, ranks) if q >= 0.5), default=0)
    need_bottom = max((math.floor(r) + 2 for q, r in zip(qs, ranks) if q < 0.5), default=0)
    sort = max(need_top, need_bottom) > max(64, n // 16)   # not only tails: one full sort is cheaper
    ascending = v.sort(dim=-1).values if sort else None
    top = torch.topk(v, min(need_top, n), dim=-1).values if need_top and not sort else None
    bottom = torch.topk(v, min(need_bottom, n), dim=-1, largest=False).values if need_bottom and not sort else None

    def order_statistic(i: int, q: float) -> torch.Tensor:   # the value of ascending rank i
        if sort:
            return ascending[..., i]
        return top[..., n - 1 - i] if q >= 0.5 else bottom[..., i]

    out = []
    for q, r in zip(qs, ranks):
        below = math.floor(r)
        out.append(torch.lerp(order_statistic(below, q), order_statistic(min(below + 1, n - 1), q), r - below))
    return out


def quantile(x: torch.Tensor, q: float, dim: int | None = None) -> torch.Tensor:
    """One quantile, as :func:`quantiles`."""
    return quantiles(x, (q,), dim)[0]


def percentile_range(x: torch.Tensor, bits: int, symmetric: bool = False, channel_dim: int | None = None,
                     candidates: tuple[float, ...] = PERCENTILES) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's range search: of the ranges ``[quantile(1 - p), quantile(p)]`` for the
    candidate fractions ``p``, the one whose quantization has the least mean squared error
    (per channel along ``channel_dim``, else per tensor). All values are used."""
    x2 = x.float().reshape(1, -1) if channel_dim is None else x.float().movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    qmin, qmax = qrange(bits, symmetric)
    best_err = best_lo = best_hi = None
    qs = quantiles(x2, tuple(q for p in candidates for q in (1.0 - p, p)), dim=1)
    for lo, hi in zip(qs[0::2], qs[1::2]):
        scale, zp = scale_zero_point(lo, hi, bits, symmetric)
        err = (fake_quant(x2, scale, zp, qmin, qmax, axis=0) - x2).pow(2).mean(dim=1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    if channel_dim is None:
        return best_lo.reshape(()), best_hi.reshape(())
    return best_lo, best_hi


def mse_range(x: torch.Tensor, bits: int, symmetric: bool, channel_dim: int | None = None,
              grid: int = 24, refine: int = 12, min_ratio: float = 0.2,
              p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range by the ratio (per channel if ``channel_dim``) that minimises
    the L_p quantization error of ``x``: a coarse grid of ratios in [min_ratio, 1], then a
    finer one around the best coarse ratio. Returns the chosen (lo, hi)."""
    lo, hi = minmax_range(x, channel_dim)
    qmin, qmax = qrange(bits, symmetric)
    dims = _reduce_dims(x, channel_dim)
    best_err = torch.full_like(lo, math.inf)
    best_ratio = torch.ones_like(lo)

    def search(ratios: torch.Tensor) -> None:  # ratios: (steps, channels) or (steps,)
        nonlocal best_err, best_ratio
        for ratio in ratios:
            scale, zp = scale_zero_point(lo * ratio, hi * ratio, bits, symmetric)
            err = (fake_quant(x, scale, zp, qmin, qmax, axis=channel_dim) - x).abs().pow(p).mean(dim=dims)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, ratio, best_ratio)

    coarse = torch.linspace(1.0, min_ratio, grid, device=lo.device)
    search(coarse[:, None].expand(-1, lo.numel()).reshape(grid, *lo.shape))
    step = (1.0 - min_ratio) / (grid - 1)
    offsets = torch.linspace(-step, step, refine + 2, device=lo.device)[1:-1]
    search((best_ratio[None] + offsets.view(-1, *[1] * lo.ndim)).clamp(min_ratio, 1.0))
    return lo * best_ratio, hi * best_ratio


def log2_mse_delta(x: torch.Tensor, bits: int, grid: int = 40) -> torch.Tensor:
    """The log-√2 quantizer's ``delta`` (at most ``max(x)``; above it values saturate) that
    minimises the squared error on ``x``."""
    top = x.max().clamp_min(1e-8)
    best, best_err = top, math.inf
    for ratio in torch.linspace(1.0, 0.5, grid).tolist():
        delta = top * ratio
        err = (log2_fake_quant(x, delta, bits) - x).pow(2).mean().item()
        if err < best_err:
            best, best_err = delta, err
    return best


def log2_percentile_delta(x: torch.Tensor, bits: int, candidates: tuple[float, ...] = PERCENTILES) -> torch.Tensor:
    """RepQ-ViT's log-√2 ``delta``: the candidate percentile of ``x`` with the least squared error."""
    flat = x.float().flatten()
    best, best_err = None, math.inf
    for delta in quantiles(flat, candidates):
        delta = delta.clamp_min(1e-8)
        err = (log2_fake_quant(flat, delta, bits) - flat).pow(2).mean().item()
        if err < best_err:
            best, best_err = delta, err
    return best


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference - approx).float().pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).mean() / noise.clamp_min(1e-20)))
