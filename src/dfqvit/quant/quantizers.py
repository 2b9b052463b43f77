"""Quantizer modules: calibration state (observed statistics, chosen ranges) around the
numerics of :mod:`dfqvit.quant.primitives`.

A quantizer is in one of three states: *off* (identity; bits >= 16 or before calibration),
*observing* (records statistics, passes values through) and *calibrated* (fake-quantizes).
With ``calibrate_on_call`` an activation quantizer instead takes its range from the first
tensor it sees and quantizes it at once: RepQ-ViT's order, in which every quantizer is
calibrated on the already-quantized stream of the quantizers before it.
Scales and zero points are buffers, so they travel with ``state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from . import primitives as P

MAX_SAMPLES_PER_BATCH = 1 << 18  # values kept per observed batch for percentile / MSE search
MAX_SAMPLES = 1 << 18            # values the MSE search runs on (a uniform subsample)
RANGE_METHODS = ("minmax", "percentile", "mse")


class Quantizer(nn.Module):
    """Common state. ``enabled`` lets calibration steps switch quantization off temporarily."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.observing = False
        self.enabled = True
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def active(self) -> bool:
        return self.enabled and not P.is_float(self.bits) and bool(self.calibrated)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _subsample_rows(values: torch.Tensor, limit: int = MAX_SAMPLES) -> torch.Tensor:
    """At most ``limit`` elements' worth of rows of ``values``, drawn uniformly (fixed seed)."""
    rows = max(1, limit // max(1, values[0].numel())) if values.ndim > 1 else limit
    if values.shape[0] <= rows:
        return values
    idx = torch.randperm(values.shape[0], generator=torch.Generator().manual_seed(0))[:rows]
    return values[idx.to(values.device)]


class ActQuantizer(Quantizer):
    """Uniform activation quantizer, per tensor; range by min-max, percentile or MSE search.

    ``channel_wise`` (calibration only): the range is searched per channel (last dim) and
    applied per channel, until :func:`dfqvit.quant.reparam.fold_channel_ranges` folds the
    channel ranges into the LayerNorm before it and makes the quantizer per-tensor again.

    ``token_axis`` (counted from the end, e.g. 2 for q of shape ``(..., tokens, head_dim)``):
    one range per token position along that axis, searched in :meth:`calibrate_on`. Only for an
    operand whose token axis is not a matmul's reduction axis, where the scales factor out of the
    integer product exactly (q·kᵀ: a row rescale for q, a column rescale for kᵀ)."""

    def __init__(self, bits: int, symmetric: bool = False, method: str = "mse", token_axis: int | None = None):
        super().__init__(bits)
        self.symmetric, self.method = symmetric, method
        self.token_axis = token_axis
        self.calibrate_on_call = False
        self.channel_wise = False
        self.fractional_zero_point = False
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self._samples: list[torch.Tensor] = []
        self._lo = self._hi = None

    def samples(self) -> torch.Tensor:
        """The observed values (subsampled uniformly to at most ``MAX_SAMPLES``), plus the
        exact extremes so that min-max stays reachable."""
        values = _subsample_rows(torch.cat(self._samples))
        return torch.cat([values, self._lo.reshape(1).cpu(), self._hi.reshape(1).cpu()])

    def search_range(self, values: torch.Tensor, channel_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of ``values`` by this quantizer's method (per channel along ``channel_dim``)."""
        if self.method == "minmax":
            return P.minmax_range(values, channel_dim)
        if self.method == "percentile":
            return P.percentile_range(values, self.bits, self.symmetric, channel_dim)
        return P.mse_range(_subsample_rows(values), self.bits, self.symmetric, channel_dim)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = P.scale_zero_point(lo.reshape(-1), hi.reshape(-1), self.bits, self.symmetric)
        self.set_scale_zero_point(scale, zp)

    def set_scale_zero_point(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Per-tensor (one value each) or per-channel; a fractional per-tensor zero point is
        kept as it is (RepQ-ViT's reparameterized inputs, see :func:`P.fake_quant_fractional`)."""
        device = self.scale.device
        self.scale, self.zero_point = scale.reshape(-1).float().to(device), zero_point.reshape(-1).float().to(device)
        self.calibrated.fill_(True)
        self._sync_zero_point_kind()

    def _sync_zero_point_kind(self) -> None:
        # A Python flag, so that the forward never has to inspect the tensor (no device sync).
        self.fractional_zero_point = bool((self.zero_point != self.zero_point.round()).any())

    def fit_saved_ranges(self, state: dict, prefix: str = "") -> None:
        """A quantizer with ``token_axis`` is built with one range and calibrated with one per
        token: give its buffers the shape saved in ``state`` (one range or a vector) before loading."""
        if self.token_axis is None:
            return
        for name in ("scale", "zero_point"):
            saved = state.get(prefix + name)
            if saved is not None and saved.ndim == 1 and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.fit_saved_ranges(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_zero_point_kind()

    def calibrate_on(self, x: torch.Tensor) -> None:
        """Set the range from ``x`` itself (all of its values)."""
        x = x.detach().float()
        if self.token_axis is not None:
            axis = x.ndim - self.token_axis
            self.set_range(*self.search_range(x.movedim(axis, -1).reshape(-1, x.shape[axis]), channel_dim=1))
        elif self.channel_wise:
            self.set_range(*self.search_range(x.reshape(-1, x.shape[-1]), channel_dim=1))
        else:
            self.set_range(*self.search_range(x.flatten()))

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.method != "minmax":
            flat = x.flatten()
            if flat.numel() > MAX_SAMPLES_PER_BATCH:
                idx = torch.randint(0, flat.numel(), (MAX_SAMPLES_PER_BATCH,),
                                    generator=torch.Generator().manual_seed(flat.numel()), device="cpu")
                flat = flat[idx.to(flat.device)]
            self._samples.append(flat.cpu())

    def compute_range(self) -> None:
        """Turn the observed statistics into scale / zero point and mark calibrated."""
        if self._lo is None:
            return  # never reached by calibration data (e.g. an unused branch)
        if self.method == "minmax":
            self.set_range(self._lo.cpu(), self._hi.cpu())
        else:
            self.set_range(*self.search_range(self.samples()))
        self.reset_stats()

    def reset_stats(self) -> None:
        self._samples, self._lo, self._hi = [], None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if P.is_float(self.bits):
            return x
        if self.observing:
            self.observe(x)
            return x
        if self.calibrate_on_call and self.enabled and not self.calibrated:
            self.calibrate_on(x)
        return self.fake_quant(x) if self.active else x

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = P.qrange(self.bits, self.symmetric)
        if self.fractional_zero_point:
            return P.fake_quant_fractional(x, self.scale, self.zero_point, qmin, qmax)
        return P.fake_quant(x, self.scale, self.zero_point, qmin, qmax, axis=self.axis(x.ndim))

    def axis(self, ndim: int) -> int | None:
        """The axis of an ``ndim``-dimensional input that the scales run along (None: per tensor)."""
        if self.scale.numel() == 1:
            return None
        return ndim - (self.token_axis or 1)

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.token_axis is None else f"per token (axis -{self.token_axis})"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, {granularity}, {self.method}"


class Log2Quantizer(ActQuantizer):
    """Log-√2 quantizer for post-softmax attention; ``scale`` holds its ``delta``."""

    def __init__(self, bits: int, method: str = "mse"):
        super().__init__(bits, symmetric=False, method=method)

    def compute_range(self) -> None:
        if self._lo is None:
            return
        self.set_delta(self._hi.cpu() if self.method == "minmax" else self.samples())
        self.reset_stats()

    def calibrate_on(self, x: torch.Tensor) -> None:
        self.set_delta(x.detach().float().flatten())

    def set_delta(self, values: torch.Tensor) -> None:
        """``delta`` from ``values`` by the method: its max, RepQ-ViT's percentile search, or MSE."""
        if self.method == "percentile":
            delta = P.log2_percentile_delta(values, self.bits)
        elif self.method == "mse":
            delta = P.log2_mse_delta(_subsample_rows(values), self.bits)
        else:
            delta = values.max().clamp_min(1e-8)
        self.scale.copy_(delta.reshape(1))
        self.calibrated.fill_(True)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return P.log2_fake_quant(x, self.scale, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log-sqrt2, {self.method}"


class WeightQuantizer(Quantizer):
    """Per-output-channel (or per-tensor) uniform weight quantizer, calibrated from the weight itself."""

    def __init__(self, bits: int, channels: int, symmetric: bool = True, method: str = "mse",
                 per_channel: bool = True):
        super().__init__(bits)
        self.symmetric, self.method, self.per_channel = symmetric, method, per_channel
        n = channels if per_channel else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n))

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        if P.is_float(self.bits):
            return
        w = weight.detach().float()
        w2 = w.reshape(w.shape[0], -1) if self.per_channel else w.reshape(1, -1)
        if self.method == "mse":
            lo, hi = P.mse_range(w2, self.bits, self.symmetric, channel_dim=0)
        elif self.method == "percentile":
            lo, hi = P.percentile_range(w2, self.bits, self.symmetric, channel_dim=0)
        else:
            lo, hi = P.minmax_range(w2, channel_dim=0)
        scale, zp = P.scale_zero_point(lo, hi, self.bits, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.calibrated.fill_(True)

    def _view(self, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (weight.ndim - 1)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return weight
        qmin, qmax = P.qrange(self.bits, self.symmetric)
        if self.per_channel:
            return P.fake_quant(weight, self.scale, self.zero_point, qmin, qmax, axis=0)
        return P.fake_quant(weight, self.scale, self.zero_point, qmin, qmax)

    @torch.no_grad()
    def int_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes (int32) of ``weight``, such that ``(codes - zero_point) * scale``
        equals ``self(weight)`` bit for bit (for packing and export).

        The codes are read back from the fake-quantized weight (``round(ŵ / s) + z``), not
        recomputed from ``weight``: ``ŵ = q·s`` exactly, so the division recovers ``q`` whatever
        rounding the fake-quant kernel used at ties.
        """
        qmin, qmax = P.qrange(self.bits, self.symmetric)
        w = weight.float()
        return P.quantize_int(self(w), self._view(self.scale.float(), w), self._view(self.zero_point.round(), w),
                              qmin, qmax)

    def extra_repr(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, {gran}, {self.method}"
