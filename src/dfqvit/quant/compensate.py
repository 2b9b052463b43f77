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

# Candidates of ridge_by_cross_validation (relative λ); one fixed λ = 10 was best among
# 0.01..1000 on the zoo (docs/RESULTS.md).
RIDGE_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)


def _augmented(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """``θ`` (``(in + 1) × out``, bias last) minimising ``||y − [x 1] θ||² + λ||θ_w − prior_w||²``
    from ``gram = [x 1]ᵀ[x 1]`` and ``cross = [x 1]ᵀ y``, with ``λ = ridge · mean(diag(xᵀx))``."""
    d = gram.shape[0] - 1
    penalty = torch.zeros(d + 1, dtype=gram.dtype, device=gram.device)
    penalty[:d] = ridge * float(torch.diagonal(gram)[:d].mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + torch.diag(penalty), cross + penalty[:, None] * prior)


def _prior(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([weight.double().T, bias.double()[None]], dim=0)


def ridge_towards(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` minimising ``||y − x W'ᵀ − b'||² + λ||W' − weight||²`` over the rows of ``x``
    (tokens × in) and ``y`` (tokens × out), with ``λ = ridge · mean(diag(xᵀx))``."""
    xa, y = _augmented(x), y.double()
    theta = _ridge_solve(xa.T @ xa, xa.T @ y, _prior(weight, bias), ridge)
    return theta[:-1].T.to(weight.dtype), theta[-1].to(bias.dtype)


def ridge_by_cross_validation(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              images: int, grid: tuple[float, ...] = RIDGE_GRID, folds: int = 4) -> float:
    """The ``ridge`` of ``grid`` whose :func:`ridge_towards` fit predicts held-out images best:
    ``folds``-fold cross-validation with the rows (``images`` blocks of tokens, in order) split
    by image, since tokens of one image are far from independent. The error tail of a fit on
    32 images is overfitting, and how much a layer can take differs from layer to layer.
    One Gram matrix per fold, so each candidate costs one small solve, not a pass over the data."""
    folds = min(folds, images)
    xa, y = _augmented(x), y.double()
    fold_of_row = torch.arange(xa.shape[0], device=xa.device) // (xa.shape[0] // images) * folds // images
    parts = [(xa[fold_of_row == f], y[fold_of_row == f]) for f in range(folds)]
    grams = [(a.T @ a, a.T @ b, float((b * b).sum())) for a, b in parts]
    gram, cross = sum(g for g, _, _ in grams), sum(c for _, c, _ in grams)
    prior = _prior(weight, bias)
    errors = []
    for ridge in grid:
        error = 0.0
        for g_held, c_held, yy_held in grams:
            theta = _ridge_solve(gram - g_held, cross - c_held, prior, ridge)
            # ||y − Aθ||² on the held-out fold, from its Gram matrix
            error += yy_held - 2 * float((theta * c_held).sum()) + float((theta * (g_held @ theta)).sum())
        errors.append(error)
    return grid[min(range(len(grid)), key=errors.__getitem__)]


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
                      weight_rounding: bool, ridge_cv: bool = False) -> None:
    """Compensate ``lin`` (a :class:`~dfqvit.quant.modules.QLinear`) in place: ridge update of its
    float weights towards ``target`` (FP outputs, images × tokens × out) from its quantized input
    (images × tokens × in), weight ranges calibrated on the result, then GPTQ rounding (or plain
    rounding) and a bias refit. Afterwards ``lin.weight`` lies on the quantizer's grid.
    With ``ridge_cv`` (and two images or more) the ridge is chosen for this layer by
    :func:`ridge_by_cross_validation` instead."""
    images = x_quantized.shape[0]
    x = x_quantized.reshape(-1, lin.in_features).float()
    y = target.reshape(-1, lin.out_features).float().to(x.device)
    if ridge_cv and images >= 2:
        ridge = ridge_by_cross_validation(x, y, lin.weight, lin.bias, images)
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
