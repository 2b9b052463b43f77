"""Closed-form error compensation for one Linear layer, no gradient steps (our default preset).

Two steps, each the exact minimiser of a least-squares problem on the calibration tokens:

1. **Activation-error reduction** (ERQ's idea, CVPR 2024 / ICML 2024): the float weights are
   moved so that, fed the layer's *quantized* input ``x̂``, the layer reproduces the full-precision
   model's output ``y`` at this layer:
   ``min ||y − (W' x̂ + b')||² + λ||W' − W||²`` (ridge towards the current weights; the bias is
   free). Because ``y`` is the FP model's output, this also absorbs the error that upstream
   layers left in ``x̂``: an activation correction folded into the weights at no inference cost.
2. **Weight rounding with error compensation** (GPTQ / OBQ, ICLR 2023): ``W'`` is quantized
   column by column on its fixed per-row grid, each column's rounding error spread over the
   columns not yet quantized through the inverse Hessian ``H = x̂ x̂ᵀ`` (minimises
   ``||(W' − Ŵ) x̂||²`` greedily), columns in order of decreasing ``diag(H)`` ("act order").
   The bias is then refitted to the mean residual.

The two objectives add up: ``y − Ŵx̂ − b = (y − W'x̂ − b') + (W' − Ŵ)x̂ + (b' − b)``, and the first
residual is orthogonal to ``x̂`` at the least-squares optimum.
"""
from __future__ import annotations

import torch

from . import primitives as P
from .quantizers import WeightQuantizer


def ridge_towards(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` minimising ``||y − x W'ᵀ − b'||² + λ||W' − weight||²`` over the rows of ``x``
    (tokens × in) and ``y`` (tokens × out), with ``λ = ridge · mean(diag(xᵀx))``."""
    x, y = x.double(), y.double()
    n, d = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    gram = xa.T @ xa
    lam = ridge * float(torch.diagonal(gram)[:d].mean().clamp_min(1e-12))
    penalty = torch.zeros(d + 1, dtype=x.dtype, device=x.device)
    penalty[:d] = lam
    prior = torch.cat([weight.double().T, bias.double()[None]], dim=0)      # (d + 1) × out
    theta = torch.linalg.solve(gram + torch.diag(penalty), xa.T @ y + penalty[:, None] * prior)
    return theta[:d].T.to(weight.dtype), theta[d].to(bias.dtype)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, quantizer: WeightQuantizer, damp: float = 0.01,
         block: int = 128) -> torch.Tensor:
    """GPTQ's quantized weight (dequantized values on ``quantizer``'s per-row grid, already
    calibrated) for ``weight`` (out × in) given ``hessian = xᵀx`` (in × in)."""
    qmin, qmax = P.qrange(quantizer.bits, quantizer.symmetric)
    scale = quantizer.scale.float().reshape(-1, 1).expand(weight.shape[0], 1)
    zero = quantizer.zero_point.round().float().reshape(-1, 1).expand(weight.shape[0], 1)

    def quant(col):  # col: (out, k); the same arithmetic as the quantizer's fake-quant
        return (torch.clamp(torch.round(col / scale) + zero, qmin, qmax) - zero) * scale

    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale, zero = scale.double(), zero.double()
    out = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        w_blk, err_blk, hinv_blk = w[:, start:end].clone(), torch.zeros_like(w[:, start:end]), h_inv[start:end, start:end]
        for i in range(end - start):
            col = w_blk[:, i:i + 1]
            q = quant(col)
            out[:, start + i:start + i + 1] = q
            err = (col - q) / hinv_blk[i, i]
            w_blk[:, i:] -= err * hinv_blk[i:i + 1, i:]
            err_blk[:, i:i + 1] = err
        w[:, end:] -= err_blk @ h_inv[start:end, end:]
    restored = torch.empty_like(out)
    restored[:, order] = out
    return restored.to(weight.dtype)


@torch.no_grad()
def compensate_linear(lin, x_quantized: torch.Tensor, target: torch.Tensor, ridge: float,
                      weight_rounding: bool) -> None:
    """Compensate ``lin`` (a :class:`~dfqvit.quant.modules.QLinear`) in place: ridge update of its
    float weights towards ``target`` (FP outputs, tokens × out) from its quantized input
    (tokens × in), weight ranges calibrated on the result, then GPTQ rounding (or plain
    rounding) and a bias refit. Afterwards ``lin.weight`` lies on the quantizer's grid."""
    x = x_quantized.reshape(-1, lin.in_features).float()
    y = target.reshape(-1, lin.out_features).float().to(x.device)
    weight, bias = ridge_towards(x, y, lin.weight, lin.bias, ridge)
    lin.weight.copy_(weight)
    lin.bias.copy_(bias)
    wq = lin.weight_quant
    wq.calibrate(lin.weight)
    if not wq.active:
        return
    if weight_rounding:
        xd = x.double()
        lin.weight.copy_(gptq(lin.weight, (xd.T @ xd).float(), wq))
    else:
        lin.weight.copy_(wq(lin.weight))
    lin.bias.copy_((y - x @ lin.weight.T).mean(dim=0))
