"""The optimisation engine shared by the data-free sources ``psaq`` and ``dfq``.

Both optimise the images directly (never a generator, never model weights) and return a
float tensor ``(N, C, H, W)`` on the CPU, in the model's normalised input space, clipped to
the range of normalised pixels in ``[0, 1]``. What they share lives here, once: the
:class:`Synthesizer` (one batch through a sequence of phases, :class:`Phase`; each step run
eagerly, replayed as a CUDA graph or compiled), the frozen-model context, the learning-rate
schedule, the jitter / flip / local-crop views, the progress bar and the request checks.
The loss terms themselves are in calib/objectives.py; each source's recipe in calib/psaq.py
and calib/dfq.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .base import CalibrationContext, valid_pixel_range
from .objectives import (
    REF_SIDE, find_attention_taps, is_swin, kl_fp_q, patch_similarity, similarity_entropy, smoothed_ce,
    total_variation,
)
from .sources import frequency_radius

__all__ = ["Phase", "FrozenModel", "Synthesizer", "SpectralBasis", "progress_bar", "check_request", "scaled_px",
           "roll_flip", "local_crops"]


# =============================================================================== views and schedule

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


def roll_flip(x: torch.Tensor, off: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    rows, cols = _jitter_index(x.shape[-2], x.shape[-1], off, flip)
    return x.index_select(-2, rows).index_select(-1, cols)


def local_crops(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
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


class SpectralBasis:
    """Images held as weighted Fourier coefficients: ``x = irfft2(z * w)``, ``w ~ 1/f^slope``.

    Adam moves every coordinate of what it optimises by about the learning rate per step, whatever
    the gradient's size. On pixels that adds white noise at every step, and a model with small
    patches turns it into rough images far from natural statistics (zoo:swin-scenes: dfq's pixel
    images ended 2x rougher than real scenes and calibrated worse than their own smooth starts).
    On these coefficients the same step is noise with a ``1/f^slope`` spectrum, like dfq's starts
    (dfq passes its ``init_slope``), as in feature visualisation's decorrelated parameterisation
    (Olah et al., 2017). ``w`` is scaled to unit RMS, so a step changes a pixel by about as much
    as in the pixel basis.
    """

    def __init__(self, height: int, width: int, device, slope: float):
        self.size = (height, width)
        weight = frequency_radius(height, width, device) ** -slope
        self.weight = weight / weight.square().mean().sqrt()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Real coefficients ``(B, C, H, W // 2 + 1, 2)`` of images ``(B, C, H, W)``."""
        return torch.view_as_real(torch.fft.rfft2(x.float(), norm="ortho") / self.weight).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.view_as_complex(z) * self.weight, s=self.size, norm="ortho")


# =============================================================================== engine

@dataclass
class Phase:
    """A stretch of optimisation steps with fixed settings (a PSAQ round, a DFQ stage)."""

    iterations: int
    jitter_px: int
    crop_range: tuple[float, float] | None = None  # (low, high) side fraction; None: no local crops
    smoothing: float = 0.0
    qmodel: nn.Module | None = None
    label: str = ""


class FrozenModel:
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


class Synthesizer:
    """Optimises one batch of images through a sequence of phases (the shared machinery)."""

    def __init__(self, model: nn.Module, cfg, ctx: CalibrationContext, name: str,
                 spectral_slope: float | None = None):
        """``spectral_slope``: optimise the images in :class:`SpectralBasis` with this slope
        (None: optimise the pixels, as PSAQ-ViT)."""
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
        self.lr = cfg.lr if cfg.lr is not None else (0.25 if is_swin(model, self.taps) else 0.20)
        self.basis = (None if spectral_slope is None
                      else SpectralBasis(*self.input_size[1:], self.device, slope=spectral_slope))
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
        xj = roll_flip(x, off, flip)
        inp = torch.cat([xj, local_crops(xj, crop)]) if crop is not None else xj
        self._feats.clear()
        # autocast's cast cache must be off for graph capture (each replay recasts the weights)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.graph):
            logits = self.model(inp)
        logits = logits.float()
        with torch.autocast(self.device.type, enabled=False):
            ce = smoothed_ce(logits[:b], y, smoothing)
            loss = cfg.ce_weight * ce
            zero = torch.zeros((), device=x.device)
            local = ent = tv = zero
            if crop is not None:
                local = smoothed_ce(logits[b:], y, smoothing)
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
    def _images(self, param: torch.Tensor) -> torch.Tensor:
        """The images that ``param`` (the tensor Adam moves) stands for."""
        return param if self.basis is None else self.basis.decode(param)

    def _clip(self, param: torch.Tensor):
        """Clip the images to the valid pixel range in place (in the spectral basis: re-encode the
        clipped images, so that either basis optimises the same constrained problem)."""
        if self.basis is None:
            param.clamp_(self.lo, self.hi)
        else:
            param.copy_(self.basis.encode(self.basis.decode(param).clamp(self.lo, self.hi)))

    def _step(self, opt, param, y, off, flip, crop, tau, smoothing, qmodel):
        """One optimisation step of the images (loss, backward, Adam, clip), with no host sync."""
        x = self._images(param)
        loss, logits, xj, parts = self._objective_fn(x, y, off, flip, crop, tau, smoothing)
        kl = torch.zeros((), device=x.device)
        if qmodel is not None:
            with torch.autocast(self.device.type, enabled=False):
                kl = kl_fp_q(logits, qmodel(xj))
            loss = loss - self.cfg.hard_weight * kl
        loss.backward()
        opt.step()
        with torch.no_grad():
            self._clip(param)
        return loss, parts, kl

    def run(self, x0: torch.Tensor, y: torch.Tensor, phases: list[Phase], tau: float,
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
        x0 = x0.to(dev)   # like PSAQ-ViT: clipped after every step, not before
        x = (x0 if self.basis is None else self.basis.encode(x0)).requires_grad_(True)
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
        with torch.no_grad():
            images = self._images(x.detach()).clamp_(self.lo, self.hi)
        return images.float().cpu(), stats

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


def progress_bar(cfg, total: int, name: str):
    if not cfg.progress:
        return None
    return tqdm(total=total, desc=f"synthesis[{name}]", unit="step", leave=False, dynamic_ncols=True)


def check_request(num_images: int):
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"number of calibration images must be a positive integer, got {num_images!r}")


def scaled_px(px: float, input_size) -> int:
    return int(round(px * min(input_size[1:]) / REF_SIDE))
