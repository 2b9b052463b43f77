"""Data-free calibration sources that synthesise images from the full-precision model.

``psaq``
    PSAQ-ViT (Li et al., ECCV 2022) reproduced after its public ``generate_data.py``, made
    model-agnostic (any timm ViT / DeiT / Swin, any input size, channels, mean/std, number of
    prefix tokens) and vectorised (no per-image loops, no host synchronisation in the loop).
``dfq`` (the default)
    Our reading of DFQ-ViT's Easy-to-Hard (E2H) synthesis (Tong et al., 2025). The paper's
    recipe is not public: global + local class evidence, stages of growing difficulty, and
    hard-example mining against the current quantized model are *our* design, built from the
    PSAQ-ViT machinery below. See ``DFQSynthConfig`` for every switch.

Both optimise the images directly (never a generator, never model weights) and return a
float tensor ``(N, C, H, W)`` on the CPU, in the model's normalised input space, clipped to
the range of normalised pixels in ``[0, 1]``.

Shared numerics (public, tested on their own):

* :func:`kde_differential_entropy` -- Gaussian-KDE differential entropy by the trapezoid rule,
  batched over any leading dimensions.
* :func:`patch_similarity` -- cosine-similarity matrices of token sets.
* :func:`total_variation` -- PSAQ's image prior (sum of four L2 norms of neighbour differences).
* :func:`tv_target_range` -- PSAQ's TV target U(2500, 3000) rescaled to another image size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .base import CalibrationContext, CalibrationSource, register_source, valid_pixel_range
from .sources import noise_images

__all__ = [
    "PSAQSynthConfig", "DFQSynthConfig", "PSAQSource", "DFQSource",
    "kde_differential_entropy", "similarity_entropy", "patch_similarity", "total_variation", "tv_target_range",
    "find_attention_taps", "AttentionTap",
]

# PSAQ-ViT's reference setting: ImageNet 224x224 RGB, batches of 32, ImageNet std.
_REF_SIDE = 224
_REF_ELEMENTS = 32 * 3 * 224 * 224
_REF_STD = (0.229 + 0.224 + 0.225) / 3


# =============================================================================== numerics

# exp(-z) for z > 60 is < 1e-26: negligible next to the pdf floor, and clamping keeps exp away
# from denormal results, which are ~7x slower on CPUs.
_EXP_CLAMP = 60.0


def _kernel_sums(grid: torch.Tensor, samples: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``sum_j exp(-(x_k - s_j)^2 / (2 h^2))`` for grid ``(..., R|1, P)`` and samples ``(..., R, M)``."""
    c = 1.0 / (math.sqrt(2.0) * bandwidth)                 # scale the small operands, not the big one
    z = (grid.unsqueeze(-1) * c - (samples * c).unsqueeze(-2)).square()   # (..., R, P, M)
    return torch.exp(-z.clamp_max(_EXP_CLAMP)).sum(-1)


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


def _smoothed_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: torch.Tensor | float) -> torch.Tensor:
    """Cross-entropy with label smoothing given as a (possibly 0-d tensor) value: no recompiles."""
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, target[:, None]).squeeze(-1)
    return ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()


def _kl_fp_q(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(softmax(fp) || softmax(q))."""
    logp = fp_logits.float().log_softmax(-1)
    logq = q_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def _cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """PSAQ-ViT's ``lr_cosine_policy``: linear warm-up for ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base


def _jitter_index(size_h: int, size_w: int, off: torch.Tensor, flip: torch.Tensor):
    """Row/column gather indices equal to ``torch.roll(x, (off, off), (2, 3))`` followed by an
    optional horizontal flip; ``off``/``flip`` are device tensors (no host sync, graph-friendly)."""
    rows = torch.remainder(torch.arange(size_h, device=off.device) - off, size_h)
    j = torch.arange(size_w, device=off.device)
    cols = torch.remainder(torch.where(flip, size_w - 1 - j, j) - off, size_w)
    return rows, cols


def _roll_flip(x: torch.Tensor, off: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    rows, cols = _jitter_index(x.shape[-2], x.shape[-1], off, flip)
    return x.index_select(-2, rows).index_select(-1, cols)


def _local_crops(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One random square crop per image, resized back to the input size (bilinear).

    ``params`` is ``(B, 3)``: side as a fraction of the image side, and the crop centre (x, y)
    in normalised [-1, 1] coordinates. Implemented as one batched ``affine_grid`` +
    ``grid_sample`` (the same bilinear resampling as cropping then ``F.interpolate``, but with
    a different box per image in a single call and no host sync).
    """
    b = x.shape[0]
    side, cx, cy = params.unbind(-1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=torch.float32)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


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


def _is_swin(model: nn.Module, taps: list[AttentionTap]) -> bool:
    return "swin" in type(model).__name__.lower() or any(t.windowed for t in taps)


# =============================================================================== configs

def _lerp(pair: Sequence[float], t: float) -> float:
    return float(pair[0]) + (float(pair[1]) - float(pair[0])) * t


class _ConfigChecks:
    """Validation shared by the two frozen configs: lists become tuples, mistakes raise UserError."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self._check()

    def _fail(self, msg: str):
        raise UserError(f"{type(self).__name__}: {msg}")

    def _int(self, name: str, low: int):
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            self._fail(f"{name} must be an integer >= {low}, got {v!r}")

    def _num(self, name: str, low: float, high: float = math.inf, *, allow_none=False, open_low=False,
             open_high=False):
        v = getattr(self, name)
        if v is None and allow_none:
            return
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        above_low = number and (low < v if open_low else low <= v)
        below_high = number and (v < high if open_high else v <= high)
        if not (above_low and below_high):
            self._fail(f"{name} must be a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}, "
                       f"got {v!r}")

    def _pair(self, name: str, low: float, high: float = math.inf):
        v = getattr(self, name)
        if (not isinstance(v, tuple) or len(v) != 2
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and low <= e <= high for e in v)):
            self._fail(f"{name} must be a pair of numbers in [{low}, {high}], got {v!r}")

    def _bool(self, *names: str):
        for name in names:
            if not isinstance(getattr(self, name), bool):
                self._fail(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _common_checks(self):
        self._int("iterations", 1)
        self._int("batch_size", 1)
        self._int("kde_points", 2)
        self._int("log_every", 1)
        self._num("lr", 0, allow_none=True, open_low=True)
        self._num("warmup_frac", 0, 1)
        self._num("kde_bandwidth", 0, open_low=True)
        self._pair("betas", 0, 0.999999)
        self._pair("tv_target", 0)
        if self.tv_target[0] > self.tv_target[1]:
            self._fail(f"tv_target must be (low, high) with low <= high, got {self.tv_target!r}")
        for name in ("ce_weight", "entropy_weight", "tv_weight"):
            self._num(name, 0)
        if self.kde_range not in ("batch", "sample"):
            self._fail(f"kde_range must be 'batch' or 'sample', got {self.kde_range!r}")
        if self.window_entropy not in ("mean", "pool"):
            self._fail(f"window_entropy must be 'mean' or 'pool', got {self.window_entropy!r}")
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            self._fail(f"compile_mode must be a torch.compile mode name or None, got {self.compile_mode!r}")
        self._bool("patch_entropy", "tv_prior", "flip", "amp", "cuda_graph", "compile", "progress")

    @classmethod
    def build(cls, config=None, **overrides):
        """``config`` (an instance, a dict or None) with ``overrides`` applied; UserError on mistakes."""
        if config is None:
            config = cls()
        elif isinstance(config, dict):
            overrides = {**config, **overrides}
            config = cls()
        elif not isinstance(config, cls):
            raise UserError(f"expected a {cls.__name__}, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PSAQSynthConfig(_ConfigChecks):
    """PSAQ-ViT's synthesis, defaults as in its ``generate_data.py``.

    Scaling to other inputs (PSAQ-ViT only states its ImageNet 224x224x3 / batch-32 setting):

    * jitter: ``jitter`` is in pixels at side 224, scaled by ``min(H, W) / 224`` and rounded
      (15, 30 px -> 2, 4 px at 28x28); one offset per step for the whole batch, applied to both
      axes (``torch.roll(img, (off, off))``), then a horizontal flip of the whole batch with p=0.5.
    * TV target: ``tau ~ U(tv_target)`` rescaled by :func:`tv_target_range`
      (``sqrt(B*C*H*W / (32*3*224*224)) * 0.226 / mean(std)``).
    * LR: as in the code, the cosine schedule restarts every round with a warm-up of
      ``warmup_frac`` of the round (100 of 500 steps); Adam's state is kept across rounds.
    * Swin: the entropy is computed per window (tokens of one window, no prefix tokens) and the
      window entropies are averaged (``window_entropy="mean"``). PSAQ-ViT's code instead pools
      the similarity entries of all windows of an image into one KDE (and drops each window's
      first token, an artefact of its ViT code path); ``window_entropy="pool"`` reproduces the
      pooling (without dropping a token).
    """

    iterations: int = 500                      # per round
    rounds: int = 2
    batch_size: int = 32
    lr: float | None = None                    # None: 0.20, 0.25 for Swin
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_frac: float = 0.2                   # of each round (PSAQ: 100 of 500)
    jitter: tuple[float, ...] = (15.0, 30.0)   # max roll per round, px at side 224 (last repeats)
    flip: bool = True
    ce_weight: float = 1.0
    patch_entropy: bool = True
    entropy_weight: float = 1.0
    tv_prior: bool = True
    tv_weight: float = 0.05
    tv_target: tuple[float, float] = (2500.0, 3000.0)  # at 224x224x3, batch 32, ImageNet std
    kde_bandwidth: float = 0.01
    kde_points: int = 10
    kde_range: str = "batch"                   # PSAQ: min/max over the whole batch of one block
    window_entropy: str = "mean"               # Swin: "mean" of per-window entropies, or "pool"
    amp: bool = True                           # bf16 autocast, CUDA only
    cuda_graph: bool = True                    # CUDA only: replay each step as a CUDA graph
    compile: bool = False                      # torch.compile the step (then no cuda_graph)
    compile_mode: str | None = None            # torch.compile mode, e.g. "reduce-overhead" on CUDA
    progress: bool = True
    log_every: int = 20

    def _check(self):
        self._common_checks()
        self._int("rounds", 1)
        v = self.jitter
        if not isinstance(v, tuple) or not v or not all(isinstance(e, (int, float)) and e >= 0 for e in v):
            self._fail(f"jitter must be a non-empty list of pixel offsets >= 0, got {v!r}")


@dataclass(frozen=True)
class DFQSynthConfig(_ConfigChecks):
    """Our reading of DFQ-ViT's Easy-to-Hard synthesis; every component is a switch.

    The ``N`` requested images are split into ``e2h_stages`` consecutive groups (stage 1 first,
    the output keeps that order); each group is optimised for ``iterations`` steps (in batches
    of ``batch_size``) with stage difficulty ``t = s / (stages - 1)`` (0.5 for a single stage)
    interpolating every ``(easy, hard)`` pair below: roll jitter grows, local crops shrink,
    label smoothing grows (lower target confidence). Loss per step::

        ce_weight * CE(global view) + local_weight * CE(local crops)       [local_crops]
        - entropy_weight * sum_blocks patch-similarity entropy              [patch_entropy]
        + tv_weight * |TV - tau|                                            [tv_prior]
        - hard_weight * KL(FP || Q) on the global view                      [hard_mining]

    Hard-example mining runs from stage ``hard_from_stage`` on when the context provides
    ``quantize``: before each such stage, ``Q = ctx.quantize(all images made so far)`` (a CPU
    tensor; Q is a quantized copy calibrated on them, with straight-through gradients) and the
    images are pushed to where FP and Q disagree most while CE keeps the FP prediction on the
    target. No weights ever move. With ``e2h_stages=1`` there are no earlier images, so no mining.
    Images start as noise with a ``1/f^init_slope`` amplitude spectrum (ours; PSAQ-ViT starts
    from white noise): smooth starts give activations closer to real images' (docs/DESIGN.md).
    ``iterations`` is per stage (= per image): 32 images in 3 stages cost 3 x 100 steps on
    batches of ~11 images (x2 with local crops, which share the forward pass).
    ``start_share`` (ours) keeps ``round(N * start_share)`` images as their smooth starts, with
    no optimisation at all: E2H's easiest level, placed first, seen by the mining stages' Q.
    """

    iterations: int = 100                      # per stage (each image sees this many steps)
    e2h_stages: int = 3
    batch_size: int = 32
    lr: float | None = None                    # None: 0.20, 0.25 for Swin (as PSAQ-ViT)
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_frac: float = 0.2
    init_slope: float = 2.0                    # start: noise with amplitude ~ 1/f^slope (0: white, as PSAQ)
    start_share: float = 0.25                  # share of the N images left as their starts, unoptimised
    balanced_labels: bool = True               # targets cycle through the classes (shuffled)
    ce_weight: float = 1.0
    label_smoothing: tuple[float, float] = (0.0, 0.1)   # easy -> hard
    jitter: tuple[float, float] = (8.0, 30.0)           # max roll, px at side 224, easy -> hard
    flip: bool = True
    local_crops: bool = True
    local_weight: float = 1.0
    crop_scale: tuple[float, float] = (0.7, 0.35)       # smallest crop side fraction, easy -> hard
    crop_max: float = 0.9                               # largest crop side fraction
    patch_entropy: bool = True
    entropy_weight: float = 1.0
    tv_prior: bool = True
    tv_weight: float = 0.05
    tv_target: tuple[float, float] = (2500.0, 3000.0)
    hard_mining: bool = True
    hard_weight: float = 1.0
    hard_from_stage: int = 2                   # 1-based first stage with mining
    kde_bandwidth: float = 0.01
    kde_points: int = 10
    kde_range: str = "batch"
    window_entropy: str = "mean"
    amp: bool = True
    cuda_graph: bool = True
    compile: bool = False
    compile_mode: str | None = None
    progress: bool = True
    log_every: int = 20

    def _check(self):
        self._common_checks()
        self._int("e2h_stages", 1)
        self._int("hard_from_stage", 1)
        self._pair("label_smoothing", 0, 0.99)
        self._pair("jitter", 0)
        self._pair("crop_scale", 0.05, 1)
        self._num("crop_max", 0.05, 1)
        if max(self.crop_scale) > self.crop_max:
            self._fail(f"crop_scale {self.crop_scale} must not exceed crop_max {self.crop_max}")
        for name in ("local_weight", "hard_weight", "init_slope"):
            self._num(name, 0)
        self._num("start_share", 0, 1, open_high=True)   # below 1: some images must be synthesized
        self._bool("balanced_labels", "local_crops", "hard_mining")


# =============================================================================== engine

@dataclass
class _Phase:
    """A stretch of optimisation steps with fixed settings (a PSAQ round, a DFQ stage)."""

    iterations: int
    jitter_px: int
    crop_range: tuple[float, float] | None = None  # (low, high) side fraction; None: no local crops
    smoothing: float = 0.0
    qmodel: nn.Module | None = None
    label: str = ""


class _FrozenModel:
    """Context: eval mode and ``requires_grad=False`` on the parameters; both restored on exit."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.state = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in self.models]
        for m in self.models:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for m, training, params in self.state:
            m.train(training)
            for p, rg in params:
                p.requires_grad_(rg)


class _Synthesizer:
    """Optimises one batch of images through a sequence of phases (the shared machinery)."""

    def __init__(self, model: nn.Module, cfg, ctx: CalibrationContext, name: str):
        self.model, self.cfg, self.ctx, self.name = model, cfg, ctx, name
        self.device = torch.device(ctx.device)
        dc = ctx.data_config
        try:
            self.input_size = tuple(int(v) for v in dc["input_size"])
            mean, std = tuple(dc["mean"]), tuple(dc["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"data config needs input_size (C, H, W), mean and std: {e}") from None
        if len(self.input_size) != 3 or len(mean) != self.input_size[0] or len(std) != self.input_size[0]:
            raise UserError(f"data config input_size {self.input_size} does not match mean {mean} / std {std}")
        self.std = std
        param = next(iter(model.parameters()), None)
        if param is not None and param.device.type != self.device.type:
            raise UserError(f"the model is on {param.device} but synthesis runs on {self.device}; "
                            f"move the model (model.to({str(self.device)!r})) or change the device")
        lo, hi = valid_pixel_range(dc)
        self.lo, self.hi = lo.to(self.device), hi.to(self.device)
        self.taps = find_attention_taps(model) if cfg.patch_entropy else []
        if cfg.patch_entropy and not self.taps:
            raise UserError(f"{type(model).__name__} has no attention module with a `proj` layer to read the "
                            "patch similarity from; set patch_entropy=False")
        self.lr = cfg.lr if cfg.lr is not None else (0.25 if _is_swin(model, self.taps) else 0.20)
        self.amp = bool(cfg.amp) and self.device.type == "cuda"
        self.graph = bool(cfg.cuda_graph) and self.device.type == "cuda" and not cfg.compile
        self.num_classes = self._num_classes()
        self._feats: list[torch.Tensor] = []
        self._objective_fn = self._objective
        if cfg.compile:
            kwargs = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
            self._objective_fn = torch.compile(self._objective, **kwargs)

    # -------------------------------------------------------------------- helpers
    def _num_classes(self) -> int:
        n = getattr(self.model, "num_classes", None)
        if isinstance(n, int) and n > 0:
            return n
        with torch.no_grad():
            return int(self.model(torch.zeros(1, *self.input_size, device=self.device)).shape[-1])

    def _hook(self, module, args):
        self._feats.append(args[0])

    def _entropy(self, batch: int, views: int) -> torch.Tensor:
        """Sum over blocks of the batch-mean patch-similarity entropy of the first ``batch`` images.

        Blocks whose similarity matrices have the same shape are stacked into one KDE call.
        """
        groups: dict[tuple, list[torch.Tensor]] = {}
        for tap, feat in zip(self.taps, self._feats):
            rows_total, tokens, channels = feat.shape
            per_image = rows_total // (batch * views)          # windows per image (1 without windows)
            f = feat[: batch * per_image]                       # the global view comes first
            f = f.reshape(batch * per_image, tokens, tap.num_heads, channels // tap.num_heads).mean(2)
            if tap.prefix:
                f = f[:, tap.prefix:]
            sims = patch_similarity(f)                          # (rows, T, T) fp32
            pool = per_image if tap.windowed and self.cfg.window_entropy == "pool" else 1
            groups.setdefault((tuple(sims.shape), pool), []).append(sims)
        total = torch.zeros((), device=self.device)
        for (_, pool), sims in groups.items():
            ent = similarity_entropy(torch.stack(sims), self.cfg.kde_bandwidth, self.cfg.kde_points,
                                     per_row_range=self.cfg.kde_range == "sample", pool=pool)
            total = total + ent.mean(-1).sum()                  # mean over images/windows, sum over blocks
        return total

    def _objective(self, x, y, off, flip, crop, tau, smoothing):
        """Everything in one step up to the loss (compiled when ``compile=True``)."""
        cfg = self.cfg
        b = x.shape[0]
        xj = _roll_flip(x, off, flip)
        inp = torch.cat([xj, _local_crops(xj, crop)]) if crop is not None else xj
        self._feats.clear()
        # autocast's cast cache must be off for graph capture (each replay recasts the weights)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.graph):
            logits = self.model(inp)
        logits = logits.float()
        with torch.autocast(self.device.type, enabled=False):
            ce = _smoothed_ce(logits[:b], y, smoothing)
            loss = cfg.ce_weight * ce
            zero = torch.zeros((), device=x.device)
            local = ent = tv = zero
            if crop is not None:
                local = _smoothed_ce(logits[b:], y, smoothing)
                loss = loss + cfg.local_weight * local
            if cfg.patch_entropy:
                ent = self._entropy(b, 2 if crop is not None else 1)
                loss = loss - cfg.entropy_weight * ent
            if cfg.tv_prior:
                tv = total_variation(xj)
                loss = loss + cfg.tv_weight * (tv - tau).abs()
        self._feats.clear()
        return loss, logits[:b], xj, torch.stack([ce, local, ent, tv])

    # -------------------------------------------------------------------- the loop
    def _step(self, opt, x, y, off, flip, crop, tau, smoothing, qmodel):
        """One optimisation step of the images (loss, backward, Adam, clip), with no host sync."""
        loss, logits, xj, parts = self._objective_fn(x, y, off, flip, crop, tau, smoothing)
        kl = torch.zeros((), device=x.device)
        if qmodel is not None:
            with torch.autocast(self.device.type, enabled=False):
                kl = _kl_fp_q(logits, qmodel(xj))
            loss = loss - self.cfg.hard_weight * kl
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(self.lo, self.hi)
        return loss, parts, kl

    def run(self, x0: torch.Tensor, y: torch.Tensor, phases: list[_Phase], tau: float,
            gen: torch.Generator, pbar) -> tuple[torch.Tensor, dict]:
        """Optimise ``x0`` through ``phases``.

        With ``self.graph`` (CUDA, ``cuda_graph=True``, no ``compile``) each phase's step is
        captured once as a CUDA graph after ``_GRAPH_WARMUP`` eager steps and replayed for the
        rest: eager PyTorch spends most of a small ViT's step launching kernels, a replay
        launches them all at once. The per-step inputs (jitter, flip, crop boxes, learning rate)
        are copied into the graph's static tensors; Adam runs ``capturable`` with a tensor
        learning rate. Phases with hard mining stay eager (the quantized model is not captured).
        """
        cfg, dev = self.cfg, self.device
        b = x0.shape[0]
        x = x0.to(dev).requires_grad_(True)  # like PSAQ-ViT: clipped after every step, not before
        y = y.to(dev)
        tau_t = torch.tensor(float(tau), device=dev)
        lr = torch.tensor(self.lr, device=dev) if self.graph else self.lr
        opt = torch.optim.Adam([x], lr=lr, betas=tuple(cfg.betas), eps=1e-8, capturable=self.graph)
        parts = torch.zeros(4, device=dev)
        kl = torch.zeros((), device=dev)
        loss = torch.zeros((), device=dev)
        # warm-up and capture share one side stream (autograd then keeps x's gradient on it)
        stream = torch.cuda.Stream(dev) if self.graph else None
        handles = [t.proj.register_forward_pre_hook(self._hook) for t in self.taps]
        try:
            for phase in phases:
                n = phase.iterations
                # Every random number of the phase is drawn up front on the CPU generator.
                offs = torch.randint(-phase.jitter_px, phase.jitter_px + 1, (n,), generator=gen)
                flips = (torch.rand(n, generator=gen) < 0.5) & cfg.flip
                crops = None
                if phase.crop_range is not None:
                    lo_s, hi_s = phase.crop_range
                    side = lo_s + (hi_s - lo_s) * torch.rand(n, b, generator=gen)
                    centre = (torch.rand(n, b, 2, generator=gen) * 2 - 1) * (1 - side)[..., None]
                    crops = torch.cat([side[..., None], centre], -1).to(dev)
                offs, flips = offs.to(dev), flips.to(dev)
                smoothing = torch.tensor(float(phase.smoothing), device=dev)
                warmup = int(round(cfg.warmup_frac * n))
                if phase.qmodel is not None:
                    phase.qmodel.to(dev)
                graphed = self.graph and phase.qmodel is None and n > _GRAPH_WARMUP
                # the graph's per-step inputs: static tensors that each replay reads
                step_inputs = (offs[0].clone(), flips[0].clone(),
                               None if crops is None else crops[0].clone()) if graphed else None
                graph = None
                for it in range(n):
                    lr_it = _cosine_lr(self.lr, it, n, warmup)
                    if self.graph:
                        opt.param_groups[0]["lr"].fill_(lr_it)
                    else:
                        opt.param_groups[0]["lr"] = lr_it
                    if graphed and it >= _GRAPH_WARMUP:
                        for static, per_step in zip(step_inputs, (offs, flips, crops)):
                            if static is not None:
                                static.copy_(per_step[it])
                        if graph is None:
                            graph, (loss, parts, kl) = self._capture(stream, opt, x, y, *step_inputs, tau_t,
                                                                     smoothing)
                        graph.replay()
                    else:
                        with _side_stream(stream if graphed else None):   # warm-up before a capture
                            opt.zero_grad(set_to_none=True)
                            loss, parts, kl = self._step(opt, x, y, offs[it], flips[it],
                                                         None if crops is None else crops[it], tau_t, smoothing,
                                                         phase.qmodel)
                    if pbar is not None:
                        pbar.update(1)
                        if it % cfg.log_every == 0 or it == n - 1:
                            p = parts.detach().tolist()  # host sync only every log_every steps
                            post = {"stage": phase.label, "loss": f"{loss.item():.3f}", "ce": f"{p[0]:.3f}"}
                            if cfg.patch_entropy:
                                post["ent"] = f"{p[2]:.3f}"
                            if phase.qmodel is not None:
                                post["kl"] = f"{kl.item():.3f}"
                            pbar.set_postfix(post, refresh=False)
                if graph is not None:   # its outputs live in its memory pool: keep copies, free the pool
                    loss, parts, kl = loss.detach().clone(), parts.detach().clone(), kl.detach().clone()
                    del graph
        finally:
            for hd in handles:
                hd.remove()
            self._feats.clear()
        p = parts.detach().float().cpu().tolist()
        stats = {"loss": float(loss.detach()), "ce": p[0], "local_ce": p[1], "entropy": p[2], "tv": p[3],
                 "kl": float(kl.detach())}
        return x.detach().clamp_(self.lo, self.hi).float().cpu(), stats

    def _capture(self, stream, opt, x, *step_args):
        """Capture one step as a CUDA graph on ``stream``; returns the graph and its (static) outputs."""
        opt.zero_grad(set_to_none=True)   # the gradient is then allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                outputs = self._step(opt, x, *step_args, None)
        except RuntimeError as e:   # e.g. a model whose forward waits on the host (.item(), .cpu())
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{type(self.model).__name__}'s synthesis step cannot be captured as a CUDA graph "
                            f"({first_line}); rerun with cuda_graph=False (CLI: --synth-opts cuda_graph=False)"
                            ) from None
        return graph, outputs


# eager steps before a phase's CUDA graph is captured (lazy initialisation: Adam's state, cuBLAS)
_GRAPH_WARMUP = 3


@contextlib.contextmanager
def _side_stream(stream: torch.cuda.Stream | None):
    """Run the block on ``stream`` (a CUDA side stream), or as it is when None."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def _progress(cfg, total: int, name: str):
    if not cfg.progress:
        return None
    return tqdm(total=total, desc=f"synthesis[{name}]", unit="step", leave=False, dynamic_ncols=True)


def _check_request(num_images: int):
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"number of calibration images must be a positive integer, got {num_images!r}")


def _scaled_px(px: float, input_size) -> int:
    return int(round(px * min(input_size[1:]) / _REF_SIDE))


# =============================================================================== sources

@register_source("psaq")
class PSAQSource(CalibrationSource):
    """PSAQ-ViT synthesis (``--calib psaq``); see :class:`PSAQSynthConfig`.

    ``PSAQSource(config=None, **overrides)``, e.g. ``PSAQSource(iterations=50, rounds=1)``.
    After ``generate``, ``self.targets`` holds each image's target class and ``self.stats`` the
    timings and the last batch's loss terms.
    """

    config_class = PSAQSynthConfig

    def __init__(self, config: PSAQSynthConfig | dict | None = None, **overrides):
        self.config = self.config_class.build(config, **overrides)
        self.stats: dict = {}
        self.targets: torch.Tensor | None = None   # the target class of every image, after generate

    def generate(self, model: nn.Module, num_images: int, ctx: CalibrationContext) -> torch.Tensor:
        _check_request(num_images)
        cfg = self.config
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(ctx.seed))
        with _FrozenModel(model):
            syn = _Synthesizer(model, cfg, ctx, self.name)
            size = syn.input_size
            sizes = [min(cfg.batch_size, num_images - i) for i in range(0, num_images, cfg.batch_size)]
            pbar = _progress(cfg, len(sizes) * cfg.rounds * cfg.iterations, self.name)
            out, targets, batch_stats = [], [], []
            try:
                for bi, b in enumerate(sizes):
                    x0 = noise_images(gen, b, size)
                    y = torch.randint(0, syn.num_classes, (b,), generator=gen)
                    lo, hi = tv_target_range(size, b, syn.std, cfg.tv_target)
                    tau = lo + (hi - lo) * float(torch.rand((), generator=gen))
                    phases = [_Phase(cfg.iterations, _scaled_px(cfg.jitter[min(r, len(cfg.jitter) - 1)], size),
                                     label=f"b{bi + 1}/{len(sizes)} r{r + 1}/{cfg.rounds}")
                              for r in range(cfg.rounds)]
                    images, stats = syn.run(x0, y, phases, tau, gen, pbar)
                    out.append(images)
                    targets.append(y)
                    batch_stats.append(stats)
            finally:
                if pbar is not None:
                    pbar.close()
        self.stats = {"seconds": time.perf_counter() - t0, "images": num_images, "batches": len(sizes),
                      "steps": len(sizes) * cfg.rounds * cfg.iterations, "last_batch": batch_stats[-1]}
        self.targets = torch.cat(targets)
        return torch.cat(out)


@register_source("dfq")
class DFQSource(CalibrationSource):
    """Easy-to-Hard synthesis, our reading of DFQ-ViT (``--calib dfq``, the default).

    ``DFQSource(config=None, **overrides)``, e.g. ``DFQSource(local_crops=False)`` for an
    ablation. Uses ``ctx.quantize`` (when given) for hard-example mining in the later stages.
    Images come back in E2H order: stage 1 (easiest) first.
    """

    config_class = DFQSynthConfig

    def __init__(self, config: DFQSynthConfig | dict | None = None, **overrides):
        self.config = self.config_class.build(config, **overrides)
        self.stats: dict = {}
        self.targets: torch.Tensor | None = None   # every image's target class (-1: a start), after generate

    @staticmethod
    def stage_sizes(num_images: int, stages: int) -> list[int]:
        """Images per stage: as equal as possible, earlier stages take the remainder."""
        base, rest = divmod(num_images, stages)
        return [base + (s < rest) for s in range(stages)]

    @staticmethod
    def _quantized(images: torch.Tensor, ctx: CalibrationContext) -> nn.Module:
        # Called with the model in its own state (our freezing undone, no hooks attached) so
        # that a deepcopy inside ``quantize`` neither inherits hooks nor frozen flags.
        # ``images``: every image made so far, on the CPU, in E2H order.
        qmodel = ctx.quantize(images)
        if not isinstance(qmodel, nn.Module):
            raise UserError(f"ctx.quantize must return a torch.nn.Module, got {type(qmodel).__name__}")
        return qmodel

    def generate(self, model: nn.Module, num_images: int, ctx: CalibrationContext) -> torch.Tensor:
        _check_request(num_images)
        cfg = self.config
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(ctx.seed))
        n_starts = min(round(num_images * cfg.start_share), num_images - 1)   # at least one image is synthesized
        stages = self.stage_sizes(num_images - n_starts, cfg.e2h_stages)
        n_batches = sum(math.ceil(n / cfg.batch_size) for n in stages)
        with _FrozenModel(model):
            syn = _Synthesizer(model, cfg, ctx, self.name)
        size = syn.input_size
        pbar = _progress(cfg, n_batches * cfg.iterations, self.name)
        out: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        batch_stats, quantize_s, mined = [], 0.0, []
        if n_starts:
            out.append(noise_images(gen, n_starts, size, cfg.init_slope).clamp(syn.lo.cpu(), syn.hi.cpu()))
            targets.append(torch.full((n_starts,), -1))   # no target class: never optimised
        try:
            for s, n_stage in enumerate(stages):
                if n_stage == 0:
                    continue
                t = s / (cfg.e2h_stages - 1) if cfg.e2h_stages > 1 else 0.5
                qmodel = None
                if cfg.hard_mining and ctx.quantize is not None and s + 1 >= cfg.hard_from_stage and out:
                    tq = time.perf_counter()
                    qmodel = self._quantized(torch.cat(out), ctx)
                    quantize_s += time.perf_counter() - tq
                    mined.append(s + 1)
                with _FrozenModel(model, qmodel):
                    crop_lo = _lerp(cfg.crop_scale, t)
                    for start in range(0, n_stage, cfg.batch_size):
                        b = min(cfg.batch_size, n_stage - start)
                        x0 = noise_images(gen, b, size, cfg.init_slope)
                        if cfg.balanced_labels:  # classes cycle over the whole set, shuffled per batch
                            done = sum(len(o) for o in out)
                            y = (torch.arange(done, done + b) % syn.num_classes)[torch.randperm(b, generator=gen)]
                        else:
                            y = torch.randint(0, syn.num_classes, (b,), generator=gen)
                        lo, hi = tv_target_range(size, b, syn.std, cfg.tv_target)
                        tau = lo + (hi - lo) * float(torch.rand((), generator=gen))
                        phase = _Phase(cfg.iterations, _scaled_px(_lerp(cfg.jitter, t), size),
                                       crop_range=(crop_lo, cfg.crop_max) if cfg.local_crops else None,
                                       smoothing=_lerp(cfg.label_smoothing, t), qmodel=qmodel,
                                       label=f"{s + 1}/{cfg.e2h_stages}" + ("+hard" if qmodel is not None else ""))
                        images, stats = syn.run(x0, y, [phase], tau, gen, pbar)
                        out.append(images)
                        targets.append(y)
                        batch_stats.append(stats)
                del qmodel
        finally:
            if pbar is not None:
                pbar.close()
        self.stats = {"seconds": time.perf_counter() - t0, "quantize_seconds": quantize_s, "images": num_images,
                      "unoptimised_starts": n_starts, "stage_sizes": stages, "mined_stages": mined,
                      "batches": len(batch_stats), "steps": len(batch_stats) * cfg.iterations, "last_batch": batch_stats[-1]}
        self.targets = torch.cat(targets)
        return torch.cat(out)
