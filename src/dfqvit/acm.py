"""Activation correction matrix (ACM): closed-form alignment of the quantized model's
intermediate activations with the full-precision model's, without gradient steps.

Our reading of DFQ-ViT's ACM (the paper gives no recipe): at each correction point (block
outputs by default; attention and MLP branch outputs as an option) an affine map
``y = x·Wᵀ + b`` (``full``) or ``y = x·s + t`` (``diag``) is fitted by ridge least squares so
that the quantized activation ``x`` maps onto the full-precision one. Points are fitted in
forward order, each on the stream already corrected by the points before it. Only the
Gram matrices ``AᵀA`` and ``AᵀY`` (float64) are accumulated over batches, so memory does not
grow with the calibration set. The ridge pulls toward the identity, so with quantization off
(``x == y``) the fit is exactly the identity, and tiny or singular calibration sets stay stable.

The default kind, ``auto``, picks by the activation bit-width (measured, docs/RESULTS.md):
with 8-bit activations what is left is mostly weight-quantization error ``x·ΔWᵀ``, which mixes
channels, so a ``full`` map pays off; with fewer bits the per-channel activation error
dominates and a ``full`` map fitted on synthetic images overfits them, so ``diag``.

A full map is fitted on the calibration images plus ``noise_share·N`` smooth ``1/f²`` noise
images (ours; dfq's starting point, kept inside the calibration images' pixel range). A map
fitted on synthetic images alone also learns their narrow statistics; the noise widens the
inputs it must hold on, so what it learns is more of the weights' error, which any input shows.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from .errors import UserError

ACM_KINDS = ("auto", "full", "diag", "off")
ACM_WHERE = ("block", "branch")
ACM_TARGETS = ("fp", "fp_module")
# Ridge strengths measured best when the map is fitted on synthetic (dfq) images: a full map
# needs strong shrinkage toward the identity to carry over to real images, a diag map does not.
DEFAULT_RIDGE = {"full": 1.0, "diag": 1e-2}
# Smooth-noise images added to the fit, as a share of the calibration images: measured to help
# the full map on synthetic images (W3A8) and to leave the diag map where it was, so 0 there.
DEFAULT_NOISE_SHARE = {"full": 0.5, "diag": 0.0}
# dfq draws its unoptimised starts from ``seed`` itself; the fit's noise must not repeat them.
NOISE_SEED_OFFSET = 1000
FULL_FROM_A_BITS = 8
MAX_QUANTIZED_BITS = 8   # 16 / 32 bits mean float activations


@dataclass(frozen=True)
class ACMConfig:
    """``target``: ``fp`` — the FP model's activation for the same image; ``fp_module`` — the
    FP module applied to the quantized model's (corrected) input of that module."""

    kind: str = "auto"           # full with 8-bit activations, diag below (see the module docstring)
    where: str = "block"
    target: str = "fp"
    ridge: float | None = None   # relative to the mean diagonal of AᵀA; None: DEFAULT_RIDGE[kind]
    noise_share: float | None = None   # smooth-noise images added to the fit per calibration image;
                                       # None: DEFAULT_NOISE_SHARE[kind]
    batch_size: int = 32

    def __post_init__(self):
        for name, value, allowed in (("kind", self.kind, ACM_KINDS), ("where", self.where, ACM_WHERE),
                                     ("target", self.target, ACM_TARGETS)):
            if value not in allowed:
                raise UserError(f"ACM {name} {value!r} is not one of {', '.join(allowed)}")
        if self.ridge is not None and not self.ridge > 0:
            raise UserError(f"ACM ridge must be positive (got {self.ridge})")
        if self.noise_share is not None and not 0 <= self.noise_share < math.inf:
            raise UserError(f"ACM noise share must be a number >= 0 and finite (got {self.noise_share}); 0 fits on "
                            "the calibration images alone")

    def resolved(self, a_bits: int | None) -> ACMConfig:
        """The concrete kind, ridge and noise share used for a model quantized with ``a_bits``
        activations (``a_bits`` matters only for ``auto``)."""
        if self.kind == "auto" and a_bits > MAX_QUANTIZED_BITS:
            return replace(self, kind="off")  # float activations: nothing to correct
        kind = self.kind if self.kind != "auto" else ("full" if a_bits >= FULL_FROM_A_BITS else "diag")
        ridge = self.ridge if self.ridge is not None else DEFAULT_RIDGE.get(kind)
        noise_share = self.noise_share if self.noise_share is not None else DEFAULT_NOISE_SHARE.get(kind, 0.0)
        return replace(self, kind=kind, ridge=ridge, noise_share=noise_share)

    def to_dict(self) -> dict:
        return asdict(self)


class ActivationCorrection(nn.Module):
    """An affine map on the last dimension, initialised to the identity."""

    def __init__(self, dim: int, kind: str = "full"):
        super().__init__()
        self.kind = kind
        if kind == "full":
            self.weight = nn.Parameter(torch.eye(dim), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "full":
            return nn.functional.linear(x, self.weight, self.bias)
        return x * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}, dim={self.bias.numel()}"


class Corrected(nn.Module):
    """``acm(module(...))``: a module whose output is corrected."""

    def __init__(self, module: nn.Module, acm: ActivationCorrection):
        super().__init__()
        self.module, self.acm = module, acm

    def forward(self, *args, **kwargs):
        return self.acm(self.module(*args, **kwargs))


def _is_block(m: nn.Module) -> bool:
    """A transformer block of timm ViT / DeiT / Swin: pre-norm attention + MLP."""
    return all(hasattr(m, a) for a in ("norm1", "attn", "norm2", "mlp"))


def correction_points(model: nn.Module, where: str) -> list[tuple[str, nn.Module, int]]:
    """(name, module, channels) of every place a correction goes, in forward order."""
    points = []
    for name, m in model.named_modules():
        if not _is_block(m) or isinstance(m, Corrected):
            continue
        dim = m.norm1.normalized_shape[0]
        if where == "block":
            points.append((name, m, dim))
        else:
            points.append((f"{name}.attn", m.attn, dim))
            points.append((f"{name}.mlp", m.mlp, m.mlp.fc2.out_features))
    if not points:
        raise UserError("the model has no transformer blocks to correct (expected timm ViT / DeiT / Swin)")
    return points


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def attach_corrections(model: nn.Module, config: ACMConfig) -> list[str]:
    """Wrap every correction point with an identity :class:`Corrected`; returns their names."""
    if config.kind == "auto":
        raise ValueError("resolve ACMConfig(kind='auto') with .resolved(a_bits) first")
    if config.kind == "off":
        return []
    names = []
    for name, module, dim in correction_points(model, config.where):
        _set_submodule(model, name, Corrected(module, ActivationCorrection(dim, config.kind)))
        names.append(name)
    return names


def correction_layout(model: nn.Module) -> dict | None:
    """``{"kind", "where"}`` of the corrections attached to ``model`` (None when it has none):
    what :func:`attach_corrections` needs to rebuild the same structure when reloading."""
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, Corrected)]
    if not wrappers:
        return None
    kinds = {m.acm.kind for _, m in wrappers}
    where = {"branch" if name.endswith((".attn", ".mlp")) else "block" for name, _ in wrappers}
    if len(kinds) != 1 or len(where) != 1:
        raise ValueError(f"mixed activation corrections ({sorted(kinds)}, {sorted(where)}) cannot be saved")
    return {"kind": kinds.pop(), "where": where.pop()}


class _Stop(Exception):
    pass


def _capture(module: nn.Module, want_input: bool = False):
    """Hook that records a module's output (or first input) and stops the forward pass."""
    box = {}

    def hook(_, args, kwargs, out):
        box["x"] = args[0] if want_input else out
        box["kwargs"] = kwargs
        raise _Stop

    return box, module.register_forward_hook(hook, with_kwargs=True)


def _run_until(model, module, images, want_input=False):
    box, handle = _capture(module, want_input)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box


def _outputs(model: nn.Module, modules: list[nn.Module], images: torch.Tensor) -> list[torch.Tensor]:
    """Each module's (first) output for ``images``, from one forward pass of ``model``."""
    outs: dict = {}
    handles = [m.register_forward_hook(lambda mod, _, out, i=i: outs.setdefault(i, out)) for i, m in enumerate(modules)]
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(modules))]


def _gram(x: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-equation terms of one batch (float64); a bias column is appended to ``x``."""
    if kind == "full":
        a = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        return a.T @ a, a.T @ y
    # diag: per channel a 2×2 system in (scale, shift): (C, 2, 2) and (C, 2)
    sx, n = x.sum(0), torch.full_like(x[0], len(x))
    g = torch.stack([torch.stack([(x * x).sum(0), sx], -1), torch.stack([sx, n], -1)], -2)
    return g, torch.stack([(x * y).sum(0), y.sum(0)], -1)


def _solve(ata: torch.Tensor, aty: torch.Tensor, kind: str, ridge: float) -> torch.Tensor:
    """Ridge least squares pulled toward the identity map (ridge relative to AᵀA's diagonal)."""
    if kind == "full":
        d = aty.shape[1]
        prior = torch.zeros_like(aty)
        prior[:d, :d] = torch.eye(d, dtype=aty.dtype, device=aty.device)
        lam = ridge * ata.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.solve(ata + lam * torch.eye(len(ata), dtype=ata.dtype, device=ata.device),
                                  aty + lam * prior)
    lam = ridge * ata[:, 0, 0].mean().clamp_min(1e-12)
    prior = torch.tensor([1.0, 0.0], dtype=aty.dtype, device=aty.device).expand_as(aty)
    return torch.linalg.solve(ata + lam * torch.eye(2, dtype=ata.dtype, device=ata.device), aty + lam * prior)


def _residual(sol: torch.Tensor, ata: torch.Tensor, aty: torch.Tensor, yy: float, kind: str) -> float:
    """``‖A·sol − Y‖²`` from the accumulated Gram terms (no second pass over the data)."""
    if kind == "full":
        return float((sol * (ata @ sol)).sum() - 2 * (sol * aty).sum() + yy)
    return float(torch.einsum("ci,cij,cj->", sol, ata, sol) - 2 * (sol * aty).sum() + yy)


def activation_bits(qmodel: nn.Module) -> int:
    """The most common bit-width of the quantized model's activation quantizers."""
    from .quant.primitives import is_float      # dfqvit.quant imports this module at load time
    from .quant.quantizers import ActQuantizer

    counts = Counter(m.bits for m in qmodel.modules() if isinstance(m, ActQuantizer) and not is_float(m.bits))
    if not counts:
        raise UserError("the model has no quantized activations to correct: quantize it first")
    return counts.most_common(1)[0][0]


def fit_images(images: torch.Tensor, noise_share: float, seed: int = 0) -> torch.Tensor:
    """The calibration images followed by ``round(noise_share·N)`` smooth ``1/f²`` noise images,
    clipped per channel to the calibration images' own range (for synthesized images, the
    valid pixel range); the noise depends only on ``seed``, drawn apart from dfq's starts."""
    from .calib.sources import noise_images   # dfqvit.quant imports this module at load time

    n = round(noise_share * len(images))
    if n == 0:
        return images
    dims = [0, *range(2, images.dim())]
    lo, hi = images.amin(dims, keepdim=True), images.amax(dims, keepdim=True)
    gen = torch.Generator().manual_seed(int(seed) + NOISE_SEED_OFFSET)
    noise = noise_images(gen, n, tuple(images.shape[1:]), slope=2.0)
    return torch.cat([images, noise.to(images).clamp(lo, hi)])


@torch.no_grad()
def fit_corrections(qmodel: nn.Module, fp_model: nn.Module, images: torch.Tensor, config: ACMConfig,
                    device: str = "cpu", progress: bool = True, seed: int = 0) -> dict:
    """Insert and fit the corrections of ``config`` into ``qmodel`` (in place), point by point.

    ``kind="auto"`` is resolved from the activation bit-width of ``qmodel``; ``seed`` draws the
    smooth-noise images a full map adds to ``images`` (:func:`fit_images`). Returns a summary:
    the resolved config, the corrected points, the number of images fitted on and, per point,
    the mean squared error to the target before and after its correction (on those images).
    """
    config = config.resolved(activation_bits(qmodel) if config.kind == "auto" else None)
    names = attach_corrections(qmodel, config)
    fp_model, qmodel = fp_model.eval().to(device), qmodel.eval().to(device)
    images = fit_images(images, config.noise_share, seed)
    batches = images.to(device).split(config.batch_size)
    summary = {"config": config, "points": names, "fit_images": len(images), "mse_before": [], "mse_after": []}
    # The FP targets do not change as corrections are fitted: one FP pass per batch gives all of them,
    # instead of one pass up to each point (the quantized side must be re-run, point after point).
    fp_targets = ([_outputs(fp_model, [fp_model.get_submodule(n) for n in names], b) for b in batches]
                  if config.target == "fp" else None)
    for p, name in enumerate(tqdm(names, desc="ACM", disable=not progress, leave=False)):
        wrapper: Corrected = qmodel.get_submodule(name)
        fp_module = fp_model.get_submodule(name)
        ata = aty = None
        sq_err = yy = count = 0.0
        for b, batch in enumerate(batches):
            x = _run_until(qmodel, wrapper.module, batch)["x"]
            if config.target == "fp":
                y = fp_targets[b][p]
            else:
                inp = _run_until(qmodel, wrapper.module, batch, want_input=True)
                y = fp_module(inp["x"], **inp["kwargs"])
            x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            g, h = _gram(x, y, config.kind)
            ata, aty = (g, h) if ata is None else (ata + g, aty + h)
            sq_err += float((x - y).pow(2).sum())
            yy += float(y.pow(2).sum())
            count += y.numel()
        sol = _solve(ata, aty, config.kind, config.ridge)
        if config.kind == "full":
            d = aty.shape[1]
            wrapper.acm.weight.copy_(sol[:d].T.float())
            wrapper.acm.bias.copy_(sol[d].float())
        else:
            wrapper.acm.weight.copy_(sol[:, 0].float())
            wrapper.acm.bias.copy_(sol[:, 1].float())
        summary["mse_before"].append(sq_err / count)
        summary["mse_after"].append(_residual(sol, ata, aty, yy, config.kind) / count)
    return summary


def correction_cost(model: nn.Module) -> dict:
    """Extra parameters and FLOPs per token of the corrections, absolute and as % of the model."""
    extra_params = extra_flops = 0
    for m in model.modules():
        if isinstance(m, ActivationCorrection):
            extra_params += m.weight.numel() + m.bias.numel()
            extra_flops += 2 * m.weight.numel() if m.kind == "full" else 2 * m.bias.numel()
    params = sum(p.numel() for p in model.parameters()) - extra_params
    return {"params": extra_params, "params_pct": 100.0 * extra_params / max(params, 1),
            "flops_per_token": extra_flops}
