"""Calibration as explicit steps: reparameterize, set weight ranges, observe activations, freeze."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm import tqdm

from .config import QuantConfig
from .convert import quantizers
from .quantizers import ActQuantizer, WeightQuantizer
from .reparam import reparameterize


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
    acts = [q for _, q in quantizers(model) if isinstance(q, ActQuantizer)]
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


@torch.no_grad()
def calibrate(model: nn.Module, config: QuantConfig, images: torch.Tensor, batch_size: int = 32,
              device: str = "cpu", progress: bool = True) -> dict:
    """Calibrate a model converted by :func:`quantize_model` on ``images`` (normalised).

    1. (preset with reparam) per-channel LayerNorm output ranges → fold into LN and next Linear;
    2. weight ranges from the (reparameterized) weights;
    3. activation ranges observed with quantized weights and float activations.
    Returns what was done, for the report.
    """
    model.eval()
    images = images.to(device)
    done: dict = {"reparameterized": []}
    if config.scheme.reparam:
        with quantization_disabled(model):
            done["reparameterized"] = reparameterize(model, _batches(images, batch_size, "reparam", progress),
                                                     config.scheme.reparam_strength, config.scheme.reparam_shift)
    calibrate_weights(model)
    acts = [q for _, q in quantizers(model) if isinstance(q, ActQuantizer)]
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
