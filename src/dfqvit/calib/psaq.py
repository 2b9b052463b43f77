"""``psaq``: PSAQ-ViT (Li et al., ECCV 2022) reproduced after its public ``generate_data.py``.

Made model-agnostic (any timm ViT / DeiT / Swin, any input size, channels, mean/std, number
of prefix tokens) and vectorised (no per-image loops, no host synchronisation in the loop).
Here: its config (:class:`PSAQSynthConfig`, the exact scaling to other inputs) and its source
(:class:`PSAQSource`, registered as ``--calib psaq``): random noise, then rounds of the shared
engine (calib/engine.py) on the objectives of calib/objectives.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .base import CalibrationContext, CalibrationSource, register_source
from .configs import ConfigChecks
from .engine import FrozenModel, Phase, Synthesizer, check_request, progress_bar, scaled_px
from .objectives import tv_target_range
from .sources import noise_images

__all__ = ["PSAQSynthConfig", "PSAQSource"]


# =============================================================================== config

@dataclass(frozen=True)
class PSAQSynthConfig(ConfigChecks):
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


# =============================================================================== source

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
        check_request(num_images)
        cfg = self.config
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(ctx.seed))
        with FrozenModel(model):
            syn = Synthesizer(model, cfg, ctx, self.name)
            size = syn.input_size
            sizes = [min(cfg.batch_size, num_images - i) for i in range(0, num_images, cfg.batch_size)]
            pbar = progress_bar(cfg, len(sizes) * cfg.rounds * cfg.iterations, self.name)
            out, targets, batch_stats = [], [], []
            try:
                for bi, b in enumerate(sizes):
                    x0 = noise_images(gen, b, size)
                    y = torch.randint(0, syn.num_classes, (b,), generator=gen)
                    lo, hi = tv_target_range(size, b, syn.std, cfg.tv_target)
                    tau = lo + (hi - lo) * float(torch.rand((), generator=gen))
                    phases = [Phase(cfg.iterations, scaled_px(cfg.jitter[min(r, len(cfg.jitter) - 1)], size),
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
