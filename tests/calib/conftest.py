"""Fixtures for the data-free synthesis tests (objectives, engine, configs, dfq).

Tiny random-init timm models on 32x32 single-channel images, and calibration contexts for
them. Use the fixtures rather than importing from this file (see tests/conftest.py):
``vit`` (one model per test module), ``synth_model(kind)`` (a fresh model, kind in
``vit`` / ``vit_reg`` / ``swin``, same weights every call), ``synth_ctx(seed=0, **kw)`` (a
``CalibrationContext``) and ``synth_data_config`` (the data config those contexts hold).
"""
from __future__ import annotations

import pytest
import timm
import torch

from dfqvit.calib import CalibrationContext

DATA_CONFIG = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}


def _vit(**kw):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                          num_heads=2, num_classes=10, in_chans=1, **kw).eval()
    with torch.no_grad():
        m.head.weight.mul_(10)  # a random-init head is nearly flat; make CE respond to the images
    return m


def _swin():
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, embed_dim=24,
                          depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        m.head.fc.weight.mul_(10)
    return m


MODELS = {"vit": _vit, "vit_reg": lambda: _vit(class_token=True, reg_tokens=1), "swin": _swin}


@pytest.fixture(scope="module")
def vit():
    return _vit()


@pytest.fixture
def synth_model():
    return lambda kind: MODELS[kind]()


@pytest.fixture
def synth_ctx():
    def _ctx(seed=0, **kw):
        return CalibrationContext(data_config=dict(DATA_CONFIG), seed=seed, **kw)
    return _ctx


@pytest.fixture
def synth_data_config():
    return dict(DATA_CONFIG)
