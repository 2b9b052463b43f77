"""Fixtures for the quantization tests: tiny random-init DeiT, distilled DeiT and Swin.

The models are small enough that a forward pass on a handful of 32x32 images takes
milliseconds, so the whole quantization suite stays well under a minute on 2 CPU cores.
Use the ``tiny_model`` factory fixture (a fresh model each call, same weights for the same
seed) rather than importing from this file.
"""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

SMALL_DEIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10)
# patch 2 on 32x32 -> 16x16 tokens, windows of 4 -> the second block of each stage is shifted
SMALL_SWIN = dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 2), window_size=4,
                  num_classes=10)
TINY_MODELS = {
    "deit": ("deit_tiny_patch16_224", SMALL_DEIT),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", SMALL_DEIT),
    "swin": ("swin_tiny_patch4_window7_224", SMALL_SWIN),
}
# Exact module counts of the float models above (quantized coverage must match them).
EXPECTED_COUNTS = {
    "deit": {"attention": 2, "conv": 1, "linear": 2 * 4 + 1, "matmul": 4},
    "deit_distilled": {"attention": 2, "conv": 1, "linear": 2 * 4 + 2, "matmul": 4},
    "swin": {"attention": 4, "conv": 1, "linear": 4 * 4 + 1 + 1, "matmul": 8},  # + patch merging + head
}


def make_tiny(key: str, seed: int = 0, ln_outlier: float | None = None) -> nn.Module:
    """A tiny model in eval mode. ``ln_outlier``: multiply channel 3 of every LayerNorm's
    weight by this factor, so that post-LN activations have one channel with a much wider
    range than the rest (what RepQ-style reparameterization exists for)."""
    name, kwargs = TINY_MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    if ln_outlier is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight[3] *= ln_outlier
    return model


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(key, seed=0, ln_outlier=None)`` -> a fresh float model; keys: deit, deit_distilled, swin."""
    return make_tiny


@pytest.fixture(scope="session")
def tiny_images():
    """``tiny_images(n, seed)`` -> (n, 3, 32, 32) standard-normal images, deterministic per seed."""
    return images


@pytest.fixture(scope="session")
def tiny_specs():
    return TINY_MODELS


@pytest.fixture(scope="session")
def expected_counts():
    return EXPECTED_COUNTS
