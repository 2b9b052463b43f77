"""The synthesis objectives: the loss terms and the features they are computed on.

Kept apart from the optimisation loop (calib/engine.py) so that every term is a plain
function of tensors, tested on its own; the sources (calib/psaq.py, calib/dfq.py) weigh
and combine them through the engine.

Shared numerics (public, tested on their own):

* :func:`kde_differential_entropy` -- Gaussian-KDE differential entropy by the trapezoid rule,
  batched over any leading dimensions.
* :func:`similarity_entropy` -- the same on symmetric similarity matrices, at half the cost.
* :func:`patch_similarity` -- cosine-similarity matrices of token sets.
* :func:`total_variation` -- PSAQ's image prior (sum of four L2 norms of neighbour differences).
* :func:`tv_target_range` -- PSAQ's TV target U(2500, 3000) rescaled to another image size.
* :func:`smoothed_ce`, :func:`kl_fp_q` -- the class evidence and hard-example mining terms.
* :func:`find_attention_taps` -- where the patch tokens are read (attn·V before ``proj``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "kde_differential_entropy", "similarity_entropy", "patch_similarity", "total_variation", "tv_target_range",
    "smoothed_ce", "kl_fp_q", "find_attention_taps", "AttentionTap", "is_swin", "REF_SIDE",
]

# PSAQ-ViT's reference setting: ImageNet 224x224 RGB, batches of 32, ImageNet std.
REF_SIDE = 224
_REF_ELEMENTS = 32 * 3 * 224 * 224
_REF_STD = (0.229 + 0.224 + 0.225) / 3


# =============================================================================== numerics

# exp(-z) for z > 60 is < 1e-26: negligible next to the pdf floor, and clamping keeps exp away
# from denormal results, which are ~7x slower on CPUs.
_EXP_CLAMP = 60.0
# Rows of the (rows, points, samples) kernel tensor made at once: on the CPU a few MiB, so the
# intermediates stay in cache and in the allocator's pool (one tensor of the whole batch is
# ~100 MiB for DeiT-T at 224 px, freshly mapped and page-faulted at every op); on a GPU all.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}


class _GaussianKernelSums(torch.autograd.Function):
    """``sum_j exp(-min(z_kj, 60))`` with ``z_kj = (g_k - s_j)^2`` for grid ``g`` ``(N, P)`` and
    scaled samples ``s`` ``(N, M)``, a few rows at a time: nothing of size ``N·P·M`` is kept
    for the backward pass, which recomputes each chunk (``∂/∂s_j = Σ_k grad_k · 2(g_k − s_j) · e_kj``,
    zero where the clamp holds). The grid carries no gradient (it is a detached range)."""

    @staticmethod
    def _chunks(grid, samples):
        """(first row, d = g − s, z = d²) of each chunk of rows."""
        rows = max(1, _CHUNK_ELEMENTS.get(samples.device.type, 1 << 62) // (grid.shape[1] * samples.shape[1]))
        for start in range(0, samples.shape[0], rows):
            d = grid[start:start + rows].unsqueeze(-1) - samples[start:start + rows].unsqueeze(-2)   # (rows, P, M)
            yield start, d, d.square()

    @staticmethod
    def forward(ctx, grid, samples):
        ctx.save_for_backward(grid, samples)
        return torch.cat([z.clamp_max_(_EXP_CLAMP).neg_().exp_().sum(-1)
                          for _, _, z in _GaussianKernelSums._chunks(grid, samples)])

    @staticmethod
    def backward(ctx, grad):
        grid, samples = ctx.saved_tensors
        out = torch.empty_like(samples)
        for start, d, z in _GaussianKernelSums._chunks(grid, samples):
            clamped = z > _EXP_CLAMP        # clamp_max passes the gradient at z == 60
            e = z.clamp_max_(_EXP_CLAMP).neg_().exp_()
            e.mul_(grad[start:start + len(d)].unsqueeze(-1)).mul_(d).masked_fill_(clamped, 0.0)
            out[start:start + len(d)] = e.sum(-2) * 2
        return None, out


def _kernel_sums(grid: torch.Tensor, samples: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``sum_j exp(-(x_k - s_j)^2 / (2 h^2))`` for grid ``(..., R|1, P)`` and samples ``(..., R, M)``."""
    c = 1.0 / (math.sqrt(2.0) * bandwidth)                 # scale the small operands, not the big one
    lead, points = samples.shape[:-1], grid.shape[-1]
    g = (grid * c).expand(*lead, points).reshape(-1, points)
    s = (samples * c).reshape(-1, samples.shape[-1])
    return _GaussianKernelSums.apply(g, s).reshape(*lead, points)


def _entropy_from_sums(sums: torch.Tensor, count: float, grid: torch.Tensor, bandwidth: float,
                       pdf_floor: float) -> torch.Tensor:
    pdf = sums * (1.0 / (count * math.sqrt(2 * math.pi) * bandwidth)) + pdf_floor
    f = -pdf * torch.log(pdf)
    dx = grid[..., 1:] - grid[..., :-1]
    return (0.5 * (f[..., 1:] + f[..., :-1]) * dx).sum(-1)


def _grid(lo: torch.Tensor, hi: torch.Tensor, points: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.linspace(0, 1, points, device=lo.device, dtype=lo.dtype)


def kde_differential_entropy(samples: torch.Tensor, bandwidth: float = 0.01, points: int = 10,
                             per_row_range: bool = False, pdf_floor: float = 1e-4) -> torch.Tensor:
    """Differential entropy of a Gaussian KDE of each row of ``samples``, by the trapezoid rule.

    ``samples`` has shape ``(..., R, M)``: ``R`` sets of ``M`` scalar samples (e.g. R images, M
    entries of a similarity matrix). For each row, the KDE
    ``p(x) = mean_j N(x; s_j, bandwidth^2)`` is evaluated at ``points`` equally spaced points
    between the minimum and maximum, ``f = -(p + pdf_floor) log(p + pdf_floor)`` and
    ``H = trapz(f, x)`` (PSAQ-ViT's ``differential_entropy``). Returns ``(..., R)``.

    The evaluation range is, as in PSAQ-ViT's code, the min/max over all rows of one ``(R, M)``
    slice (``per_row_range=False``: one range per block and batch) or, optionally, per row. The
    range is detached (PSAQ-ViT takes it through ``.item()``); gradients flow through the KDE.
    Fully vectorised: one ``(..., R, points, M)`` tensor, no Python loop, no host sync.
    """
    if samples.dim() < 2:
        raise ValueError("samples must have shape (..., R, M)")
    s = samples.float()
    with torch.no_grad():
        dims = -1 if per_row_range else (-2, -1)
        grid = _grid(s.amin(dims, keepdim=True), s.amax(dims, keepdim=True), points)
    return _entropy_from_sums(_kernel_sums(grid, s, bandwidth), s.shape[-1], grid, bandwidth, pdf_floor)


def similarity_entropy(sims: torch.Tensor, bandwidth: float = 0.01, points: int = 10,
                       per_row_range: bool = False, pool: int = 1, pdf_floor: float = 1e-4) -> torch.Tensor:
    """:func:`kde_differential_entropy` of the entries of symmetric similarity matrices, at half the cost.

    ``sims`` is ``(..., R, T, T)`` and symmetric; the result equals
    ``kde_differential_entropy(sims.flatten(-2))`` (every entry, diagonal included, as PSAQ-ViT)
    but each off-diagonal pair is evaluated once with weight 2. ``pool > 1`` pools the entries
    of ``pool`` consecutive matrices into one KDE (Swin windows of one image): ``R`` must be a
    multiple of ``pool`` and the result has ``R // pool`` rows.
    """
    *lead, r, t, _ = sims.shape
    iu = torch.triu_indices(t, t, offset=1, device=sims.device)
    s = sims.float()
    upper = s[..., iu[0], iu[1]]                            # (..., R, T(T-1)/2)
    diag = s.diagonal(dim1=-2, dim2=-1)                     # (..., R, T)
    if pool > 1:
        upper = upper.reshape(*lead, r // pool, -1)
        diag = diag.reshape(*lead, r // pool, -1)
    with torch.no_grad():
        dims = -1 if per_row_range else (-2, -1)
        lo = torch.minimum(upper.amin(dims, keepdim=True), diag.amin(dims, keepdim=True))
        hi = torch.maximum(upper.amax(dims, keepdim=True), diag.amax(dims, keepdim=True))
        grid = _grid(lo, hi, points)
    sums = 2 * _kernel_sums(grid, upper, bandwidth) + _kernel_sums(grid, diag, bandwidth)
    return _entropy_from_sums(sums, pool * t * t, grid, bandwidth, pdf_floor)


def patch_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrices ``(R, T, T)`` of token sets ``(R, T, D)``, computed in fp32."""
    t = F.normalize(tokens.float(), dim=-1, eps=1e-8)
    return t @ t.transpose(-2, -1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """PSAQ-ViT's image prior: the sum of the L2 norms (over the whole batch) of the horizontal,
    vertical and two diagonal neighbour differences."""
    x = x.float()
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return d1.norm() + d2.norm() + d3.norm() + d4.norm()


def tv_target_range(input_size: Sequence[int], batch: int, std: Sequence[float],
                    reference: tuple[float, float] = (2500.0, 3000.0)) -> tuple[float, float]:
    """PSAQ-ViT's TV target range for another image size, channel count, batch and std.

    The TV is a sum of L2 norms over the whole batch, so at equal per-pixel roughness it grows
    with the square root of the number of elements ``B*C*H*W``; and a given roughness of the
    pixels in ``[0, 1]`` is ``1/std`` larger in normalised units. Hence::

        tau = tau_ref * sqrt(B*C*H*W / (32*3*224*224)) * (0.226 / mean(std))

    which is the identity for PSAQ-ViT's setting (ImageNet, 224x224x3, batch 32).
    """
    c, h, w = (int(v) for v in input_size)
    scale = math.sqrt(batch * c * h * w / _REF_ELEMENTS) * (_REF_STD / (sum(std) / len(std)))
    return reference[0] * scale, reference[1] * scale


def smoothed_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: torch.Tensor | float) -> torch.Tensor:
    """Cross-entropy with label smoothing given as a (possibly 0-d tensor) value: no recompiles."""
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, target[:, None]).squeeze(-1)
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()


def kl_fp_q(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(softmax(fp) || softmax(q))."""
    logp = fp_logits.float().log_softmax(-1)
    logq = q_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


# =============================================================================== attention taps

@dataclass
class AttentionTap:
    """An attention module whose projection input (attn·V of every head, concatenated) we read.

    ``windowed``: the module sees (B * windows, tokens, C) (Swin's ``WindowAttention``); its
    tokens have no prefix tokens. Otherwise the first ``prefix`` tokens (class / distillation /
    register tokens) are dropped.
    """

    name: str
    proj: nn.Module
    num_heads: int
    windowed: bool
    prefix: int


def find_attention_taps(model: nn.Module) -> list[AttentionTap]:
    """Every attention module of a timm model: it has an int ``num_heads``, a Linear ``proj`` and
    ``qkv`` (or ``q``). Covers timm ``Attention`` (ViT, DeiT, distilled DeiT, register tokens)
    and Swin's ``WindowAttention``.

    Note: where an attention applies a norm or a gate between attn·V and ``proj``
    (``scale_norm=True``, ``gated=True``), the tapped tensor is that normalised / gated output.
    """
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    taps = []
    for name, m in model.named_modules():
        proj, heads = getattr(m, "proj", None), getattr(m, "num_heads", None)
        if isinstance(proj, nn.Linear) and isinstance(heads, int) and (hasattr(m, "qkv") or hasattr(m, "q")):
            windowed = "window" in type(m).__name__.lower()
            taps.append(AttentionTap(name, proj, heads, windowed, 0 if windowed else prefix))
    return taps


def is_swin(model: nn.Module, taps: list[AttentionTap]) -> bool:
    return "swin" in type(model).__name__.lower() or any(t.windowed for t in taps)
