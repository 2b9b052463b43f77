"""``dfq`` (the default source): our reading of DFQ-ViT's Easy-to-Hard (E2H) synthesis
(Tong et al., 2025).

The paper's recipe is not public: global + local class evidence, stages of growing
difficulty, and hard-example mining against the current quantized model are *our* design,
built from the PSAQ-ViT machinery in calib/engine.py and calib/objectives.py. Here: its
config (:class:`DFQSynthConfig`, every switch) and its source (:class:`DFQSource`,
registered as ``--calib dfq``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from .base import CalibrationContext, CalibrationSource, register_source
from .configs import ConfigChecks
from .engine import FrozenModel, Phase, Synthesizer, check_request, progress_bar, scaled_px
from .objectives import tv_target_range
from .sources import noise_images

__all__ = ["DFQSynthConfig", "DFQSource"]


# =============================================================================== config

def _lerp(pair: Sequence[float], t: float) -> float:
    return float(pair[0]) + (float(pair[1]) - float(pair[0])) * t


@dataclass(frozen=True)
class DFQSynthConfig(ConfigChecks):
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
    Adam then moves the images' ``1/f^init_slope``-weighted Fourier coefficients
    (``parameterization="spectral"``, ours), so every step is smooth like the start; with
    ``"pixel"`` every step adds white noise, which the fashion-scenes Swin turns into rough
    images that calibrate worse than the starts themselves (docs/DESIGN.md, zoo section).
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
    parameterization: str = "spectral"         # what Adam moves: 1/f^init_slope-weighted Fourier coefficients, or "pixel"
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
        if self.parameterization not in ("pixel", "spectral"):
            self._fail(f"parameterization must be 'pixel' or 'spectral', got {self.parameterization!r}")


# =============================================================================== source

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
        check_request(num_images)
        cfg = self.config
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(ctx.seed))
        n_starts = min(round(num_images * cfg.start_share), num_images - 1)   # at least one image is synthesized
        stages = self.stage_sizes(num_images - n_starts, cfg.e2h_stages)
        n_batches = sum(math.ceil(n / cfg.batch_size) for n in stages)
        with FrozenModel(model):
            syn = Synthesizer(model, cfg, ctx, self.name,
                              spectral_slope=cfg.init_slope if cfg.parameterization == "spectral" else None)
        size = syn.input_size
        pbar = progress_bar(cfg, n_batches * cfg.iterations, self.name)
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
                with FrozenModel(model, qmodel):
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
                        phase = Phase(cfg.iterations, scaled_px(_lerp(cfg.jitter, t), size),
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
