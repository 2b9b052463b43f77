"""Calibration as explicit steps: reparameterize, set weight ranges, observe activations, freeze."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from tqdm import tqdm

from . import primitives as P
from .compensate import compensate_linear
from .config import QuantConfig
from .convert import quantizers
from .modules import QLinear
from .quantizers import ActQuantizer, WeightQuantizer
from .reparam import classifiers, fold_channel_ranges, fold_into_linear, fold_pair, layernorm_consumers, reparameterize


# A smaller gain is within the calibration set's noise: folding on any gain cost KL at W4A8 and
# W6A6 on the zoo (docs/RESULTS.md), folding on >= 10 % did not.
FOLD_MIN_GAIN = 0.1


def activation_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [q for _, q in quantizers(model) if isinstance(q, ActQuantizer)]


@contextlib.contextmanager
def quantization_disabled(model: nn.Module):
    """Run the model in float (all quantizers pass values through)."""
    qs = [q for _, q in quantizers(model)]
    saved = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield model
    finally:
        for q, e in zip(qs, saved):
            q.enabled = e


@contextlib.contextmanager
def observing(model: nn.Module):
    """Activation quantizers record what flows through them; ranges are set on exit."""
    acts = activation_quantizers(model)
    for q in acts:
        q.observing = True
    try:
        yield model
        for q in acts:
            q.compute_range()
    finally:
        for q in acts:
            q.observing = False
            q.reset_stats()


@torch.no_grad()
def calibrate_weights(model: nn.Module) -> None:
    for mod in model.modules():
        wq = getattr(mod, "weight_quant", None)
        if isinstance(wq, WeightQuantizer):
            wq.calibrate(mod.weight)


def _batches(images: torch.Tensor, batch_size: int, desc: str, progress: bool):
    return tqdm(images.split(batch_size), desc=desc, disable=not progress, leave=False)


@contextlib.contextmanager
def calibrating_on_call(model: nn.Module):
    """Every activation quantizer takes its range from the first tensor it sees."""
    acts = activation_quantizers(model)
    for q in acts:
        q.calibrate_on_call = True
    try:
        yield model
    finally:
        for q in acts:
            q.calibrate_on_call = False


@torch.no_grad()
def linear_outputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every quantized Linear's output on ``images`` with all quantization off (the FP model)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _, __, out, n=n: outputs.__setitem__(n, out.detach()))
               for n, m in model.named_modules() if isinstance(m, QLinear)]
    try:
        with quantization_disabled(model):
            model(images)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _compensating_hook(name: str, scheme, targets: dict, fold: tuple | None, fold_input: bool, done: list, bar):
    """Forward pre-hook for one QLinear in the calibration pass: on its first call, fold its
    LayerNorm (from the per-channel range of this very input) or, with ``fold_input``, fold
    that range into its own input map where it pays; else set its input range. Then compensate its
    weights (:func:`compensate_linear`) against the FP output ``targets[name]``."""
    def hook(lin: QLinear, args):
        q = lin.input_quant
        if q.calibrated or P.is_float(q.bits) and P.is_float(lin.weight_quant.bits):
            return None
        (x, *rest) = args
        if fold is not None:
            pair_name, norm = fold
            q.channel_wise = True
            q.calibrate_on(x)                     # per-channel ranges of this very input
            offset, r1 = fold_pair(norm, [lin], q.scale, q.zero_point, round_zero_point=True)
            x = ((x + offset) / r1).to(x.dtype)
            done.append(pair_name)
        elif not P.is_float(q.bits) and fold_input:
            if _fold_if_it_pays(lin, x, targets.pop(name), scheme):
                done.append(name)
            bar.update()
            return None
        elif not P.is_float(q.bits):
            q.calibrate_on(x)
        _compensate(lin, x, targets.pop(name), scheme)
        bar.update()
        return (x, *rest)
    return hook


@torch.no_grad()
def _compensate(lin: QLinear, x: torch.Tensor, target: torch.Tensor, scheme) -> float:
    """:func:`compensate_linear` on ``lin``'s quantized input; returns the mean squared error
    of the compensated layer's output against ``target``."""
    x_quantized = lin.input_quant(lin.input_fold(x))
    compensate_linear(lin, x_quantized, target, scheme.ridge, scheme.weight_rounding == "gptq", scheme.ridge_cv)
    out = torch.nn.functional.linear(x_quantized, lin.weight_quant(lin.weight), lin.bias)
    return float((out - target.to(out.device)).pow(2).mean())


@torch.no_grad()
def _fold_if_it_pays(lin: QLinear, x: torch.Tensor, target: torch.Tensor, scheme) -> bool:
    """Calibrate and compensate ``lin`` twice, with its input's per-channel ranges folded
    (:func:`fold_into_linear`) and with one per-tensor range; keep the fold only if it cuts
    the compensated output's error against ``target`` by ``FOLD_MIN_GAIN``. The fold removes
    activation error but scales the weight's columns by the channel ranges, which can cost more
    than it saves (on the zoo it pays at A4, mostly in the first blocks, and loses at W3A8).
    Returns whether it folded."""
    folded = copy.deepcopy(lin)
    folded.input_quant.channel_wise = True
    folded.input_quant.calibrate_on(x)
    fold_into_linear(folded, folded.input_quant.scale, folded.input_quant.zero_point)
    error_folded = _compensate(folded, x, target, scheme)
    lin.input_quant.calibrate_on(x)
    if error_folded >= (1 - FOLD_MIN_GAIN) * _compensate(lin, x, target, scheme):
        return False
    lin.load_state_dict(folded.state_dict())
    return True


@torch.no_grad()
def calibrate_sequential(model: nn.Module, config: QuantConfig, images: torch.Tensor, progress: bool = True) -> dict:
    """Calibration in execution order on the quantized stream, as RepQ-ViT does: weights first;
    then one forward pass of *all* ``images`` (one batch, as RepQ-ViT's code does) in which
    each activation quantizer sets its range from the stream already quantized before it.

    Without compensation (RepQ-ViT): the LayerNorm consumers' inputs are quantized per channel
    in that pass; afterwards the channel ranges are folded into the LayerNorms and the
    consumers' weights quantized again. With compensation (``scheme.compensate``, ours): each
    Linear, at its first call, folds its LayerNorm from this input's channel ranges (rounded
    zero point: exact b-bit), sets its input range, and compensates its weights against the
    FP model's output (:mod:`dfqvit.quant.compensate`), so every later range is set on the
    compensated stream."""
    scheme = config.scheme
    calibrate_weights(model)
    pairs = [(name, norm, consumers) for name, norm, consumers in
             (layernorm_consumers(model, include_head=scheme.reparam_head) if scheme.reparam else [])
             if norm.elementwise_affine and not P.is_float(consumers[0].input_quant.bits)]
    if not scheme.compensate:
        for _, _, consumers in pairs:
            for lin in consumers:
                lin.input_quant.channel_wise = True
        with calibrating_on_call(model), tqdm(total=1, desc="calibrate", disable=not progress, leave=False) as bar:
            model(images)
            bar.update()
        return {"reparameterized": fold_channel_ranges(pairs)}

    targets = linear_outputs(model, images)
    folds = {id(consumers[0]): (name, norm) for name, norm, consumers in pairs if len(consumers) == 1}
    # The classifier sees one pooled token per image: too few rows to choose or fit a fold on.
    heads = {id(head) for head in classifiers(model)}
    done: list[str] = []
    with tqdm(total=len(targets), desc="calibrate + compensate", disable=not progress, leave=False) as bar:
        handles = [m.register_forward_pre_hook(_compensating_hook(n, scheme, targets, folds.get(id(m)),
                                                                  scheme.fold_inputs and id(m) not in heads, done, bar))
                   for n, m in model.named_modules() if isinstance(m, QLinear)]
        try:
            with calibrating_on_call(model):
                model(images)
        finally:
            for h in handles:
                h.remove()
    return {"reparameterized": done}


@torch.no_grad()
def calibrate(model: nn.Module, config: QuantConfig, images: torch.Tensor, batch_size: int = 32,
              device: str = "cpu", progress: bool = True) -> dict:
    """Calibrate a model converted by :func:`quantize_model` on ``images`` (normalised).

    Order "sequential": :func:`calibrate_sequential` (RepQ-ViT). Order "float":
    1. (preset with reparam) per-channel LayerNorm output ranges → fold into LN and next Linear;
    2. weight ranges from the (reparameterized) weights;
    3. activation ranges observed with quantized weights and float activations.
    Returns what was done, for the report.
    """
    model.eval()
    images = images.to(device)
    if config.scheme.order == "sequential":
        return calibrate_sequential(model, config, images, progress)
    done: dict = {"reparameterized": []}
    if config.scheme.reparam:
        with quantization_disabled(model):
            done["reparameterized"] = reparameterize(model, _batches(images, batch_size, "reparam", progress),
                                                     config.scheme.reparam_strength, config.scheme.reparam_shift)
    calibrate_weights(model)
    acts = activation_quantizers(model)
    for q in acts:
        q.enabled = False
    try:
        with observing(model):
            for batch in _batches(images, batch_size, "calibrate", progress):
                model(batch)
    finally:
        for q in acts:
            q.enabled = True
    return done
