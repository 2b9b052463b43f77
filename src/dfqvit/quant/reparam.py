"""RepQ-ViT scale reparameterization of post-LayerNorm activations, and our partial form.

Post-LayerNorm activations of ViTs have a few channels with far wider ranges than the rest,
which a per-tensor quantizer handles badly. With the per-channel range of the LN output
(scale ``s_c``, zero point ``z_c`` at the consumer's bit-width), RepQ-ViT picks
``r1 = s / mean(s)`` and ``r2 = z - round(mean(z))`` and folds them into the LN affine and the
next Linear, ``x' = (x + s·r2) / r1``:

    γ' = γ / r1,   β' = (β + s·r2) / r1,   W' = W·r1 (per input column),   b' = b − W·(s·r2)

so every channel of ``x'`` spans the same range and a per-tensor quantizer suffices, while the
float model computes exactly the same function.

The price is paid by the weights: the columns of wide channels grow by ``r1``, and the
zero-point shift leaks the weight rounding error through ``b'``. Both come from the calibration
images' per-channel extremes, which synthetic images get wrong. Ours (preset ``repq``): a
partial strength ``r1 = (s / mean(s))^α`` with ``α = 0.5`` — SmoothQuant's balance between
activation and weight difficulty — and no zero-point shift. ``α = 1`` with the shift
(preset ``repq-vit``) is RepQ-ViT as published. docs/DESIGN.md gives the measurements.
"""
from __future__ import annotations

import torch
from torch import nn

from . import primitives as P
from .modules import QLinear


def layernorm_consumers(model: nn.Module, include_head: bool = True) -> list[tuple[str, nn.LayerNorm, list[QLinear]]]:
    """(name, LayerNorm, Linear layers fed directly by it) for timm ViT / DeiT / Swin; with
    ``include_head`` also the final norm and the classifier(s)."""
    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(getattr(m, "norm1", None), nn.LayerNorm) and isinstance(getattr(getattr(m, "attn", None), "qkv", None), QLinear):
            pairs.append((prefix + "norm1", m.norm1, [m.attn.qkv]))
        if isinstance(getattr(m, "norm2", None), nn.LayerNorm) and isinstance(getattr(getattr(m, "mlp", None), "fc1", None), QLinear):
            pairs.append((prefix + "norm2", m.norm2, [m.mlp.fc1]))
        if isinstance(getattr(m, "norm", None), nn.LayerNorm) and isinstance(getattr(m, "reduction", None), QLinear):
            pairs.append((prefix + "norm", m.norm, [m.reduction]))  # Swin patch merging
    if not include_head:
        return pairs
    # The final norm feeds the classifier through token selection or average pooling, both
    # of which commute with a per-channel affine map.
    heads = classifiers(model)
    final_norm = getattr(model, "fc_norm", None)
    if not isinstance(final_norm, nn.LayerNorm):
        final_norm = getattr(model, "norm", None)
    no_attn_pool = getattr(model, "attn_pool", None) is None
    same_bits = len({h.input_quant.bits for h in heads if isinstance(h, QLinear)}) == 1
    if all(isinstance(h, QLinear) for h in heads) and same_bits and isinstance(final_norm, nn.LayerNorm) and no_attn_pool:
        name = "fc_norm" if final_norm is getattr(model, "fc_norm", None) else "norm"
        pairs.append((name, final_norm, heads))
    return pairs


def classifiers(model: nn.Module) -> list[nn.Module]:
    """The classifier layer(s) of a timm model (distilled DeiT: head and head_dist)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return list(head) if isinstance(head, (tuple, list)) else [head]


@torch.no_grad()
def channel_ranges(model: nn.Module, norms: list[nn.LayerNorm], batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of each LayerNorm's output over ``batches``."""
    stats: list[list[torch.Tensor | None]] = [[None, None] for _ in norms]

    def hook(i):
        def record(_, __, out):
            flat = out.detach().reshape(-1, out.shape[-1]).float()
            lo, hi = flat.amin(0), flat.amax(0)
            s = stats[i]
            s[0] = lo if s[0] is None else torch.minimum(s[0], lo)
            s[1] = hi if s[1] is None else torch.maximum(s[1], hi)
        return record

    handles = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return [(s[0], s[1]) for s in stats]


@torch.no_grad()
def reparameterize(model: nn.Module, batches, strength: float = 1.0, shift: bool = True) -> list[str]:
    """Reparameterize every LayerNorm → Linear pair (``strength`` α, with or without RepQ-ViT's
    zero-point shift); returns the LN names."""
    pairs = [p for p in layernorm_consumers(model) if p[1].elementwise_affine]
    ranges = channel_ranges(model, [p[1] for p in pairs], batches)
    done = []
    for (name, norm, consumers), (lo, hi) in zip(pairs, ranges):
        if lo is None:
            continue
        quantizer = consumers[0].input_quant
        if P.is_float(quantizer.bits):
            continue
        s, z = P.scale_zero_point(lo, hi, quantizer.bits, symmetric=False)
        s = s.clamp_min(1e-5 * float(s.max()))
        r1 = (s / s.mean()) ** strength
        offset = s * (z - torch.round(z.mean())) if shift else torch.zeros_like(s)
        norm.bias.copy_((norm.bias + offset) / r1)
        norm.weight.copy_(norm.weight / r1)
        for lin in consumers:
            lin.bias.sub_(lin.weight.double().matmul(offset.double()).to(lin.bias.dtype))
            lin.weight.mul_(r1[None, :])
        done.append(name)
    return done


def _fold_terms(scale: torch.Tensor, zero_point: torch.Tensor,
                round_zero_point: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset, r1, per-tensor scale, per-tensor zero point) of RepQ-ViT's reparameterization
    for the per-channel input range (``scale`` s_c, ``zero_point`` z_c); float64."""
    s, z = scale.double(), zero_point.double()
    r1 = s / s.mean()
    z_common = torch.round(z.mean()) if round_zero_point else z.mean()
    return s * (z - z_common), r1, s.mean(), z_common


@torch.no_grad()
def _absorb_into_consumer(lin: QLinear, offset: torch.Tensor, r1: torch.Tensor, scale: torch.Tensor,
                          zero_point: torch.Tensor) -> None:
    """``lin`` computes the same function of ``x' = (x + offset) / r1`` as before of ``x``
    (``W' = W·r1`` per column, ``b' = b − W·offset``); its input quantizer becomes per-tensor."""
    lin.bias.sub_(lin.weight.double().matmul(offset).to(lin.bias.dtype))
    lin.weight.mul_(r1[None, :].to(lin.weight.dtype))
    lin.input_quant.channel_wise = False
    lin.input_quant.set_scale_zero_point(scale, zero_point)


@torch.no_grad()
def fold_pair(norm: nn.LayerNorm, consumers: list[QLinear], scale: torch.Tensor, zero_point: torch.Tensor,
              round_zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's reparameterization of one LayerNorm → consumers pair from the per-channel
    input range (``scale`` s_c, ``zero_point`` z_c): the LN output becomes
    ``x' = (x + offset) / r1`` with ``r1 = s / mean(s)``, ``offset = s·(z - z̄)``, and the
    consumers' input quantizers become per-tensor with scale ``mean(s)``, zero point ``z̄``.

    ``z̄ = mean(z)`` as in RepQ-ViT's code (``round_zero_point=False``): the clamp ends of the
    folded input then fall half-way between grid points (up to ``2^b + 1`` levels; not an
    exact b-bit integer quantizer). ``z̄ = round(mean(z))`` makes the per-tensor quantizer
    compute exactly the per-channel quantization it replaces. Returns (offset, r1)."""
    offset, r1, s_mean, z_common = _fold_terms(scale, zero_point, round_zero_point)
    norm.bias.copy_(((norm.bias.double() + offset) / r1).to(norm.bias.dtype))
    norm.weight.copy_((norm.weight.double() / r1).to(norm.weight.dtype))
    for lin in consumers:
        _absorb_into_consumer(lin, offset, r1, s_mean, z_common)
    return offset.float(), r1.float()


@torch.no_grad()
def fold_into_linear(lin: QLinear, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """The same reparameterization for a Linear that no LayerNorm feeds (ours): the map
    ``x' = (x + offset) / r1`` becomes ``lin.input_fold`` (:class:`~dfqvit.quant.modules.InputFold`),
    with the rounded zero point, so the per-tensor quantizer of ``x'`` computes exactly the
    per-channel quantization of ``x`` at ``lin``'s bit-width. Channels whose scale is below
    1e-5 of the widest keep that floor (a near-constant channel must not blow up ``1 / r1``)."""
    scale = scale.clamp_min(1e-5 * float(scale.max()))
    offset, r1, s_mean, z_common = _fold_terms(scale, zero_point, round_zero_point=True)
    lin.input_fold.set(offset.to(lin.input_fold.shift.dtype), r1.to(lin.input_fold.divisor.dtype))
    _absorb_into_consumer(lin, offset, r1, s_mean, z_common)


@torch.no_grad()
def fold_channel_ranges(pairs: list[tuple[str, nn.LayerNorm, list[QLinear]]]) -> list[str]:
    """RepQ-ViT's reparameterization after its calibration pass: each pair folded from the
    consumers' calibrated per-channel input ranges (:func:`fold_pair`, fractional zero point
    as in its code); the consumers' weights changed, so their weight quantizers are
    calibrated again."""
    done = []
    for name, norm, consumers in pairs:
        quantizer = consumers[0].input_quant
        if not quantizer.channel_wise or not quantizer.calibrated:
            continue
        fold_pair(norm, consumers, quantizer.scale, quantizer.zero_point, round_zero_point=False)
        for lin in consumers:
            lin.weight_quant.calibrate(lin.weight)
        done.append(name)
    return done
