"""RepQ-style LayerNorm reparameterization: the float function is unchanged, the post-LN
per-channel ranges are equalised (``repq-vit``) or their spread square-rooted (``repq``,
strength 0.5), the classifier pair is included, and it pays off once a post-LN channel is an
outlier."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dfqvit.quant import PRESETS as SCHEMES
from dfqvit.quant import QuantConfig, calibrate, quantization_disabled, quantize, quantize_model
from dfqvit.quant.primitives import sqnr_db
from dfqvit.quant.reparam import layernorm_consumers


MODELS = ["deit", "deit_distilled", "swin"]
PRESETS = ["repq", "repq-vit"]   # presets that keep the float function (repq-comp also compensates the weights)
OUTLIER = 20.0   # LayerNorm weight of channel 3 scaled by this: one post-LN channel ~20x wider


@pytest.fixture(scope="module")
def outlier_models(tiny_model):
    return {k: tiny_model(k, ln_outlier=OUTLIER) for k in MODELS}


@pytest.fixture(scope="module")
def reparameterized(outlier_models, tiny_images):
    """(float model, calibrated W8A8 model, what calibrate reported) per (model, preset)."""
    calib = tiny_images(4, seed=1)
    out = {}
    for key, model in outlier_models.items():
        for preset in PRESETS:
            config = QuantConfig(w_bits=8, a_bits=8, preset=preset)
            qmodel, _ = quantize_model(copy.deepcopy(model), config)
            done = calibrate(qmodel, config, calib, progress=False)
            out[key, preset] = (model, qmodel, done)
    return out


def _ln_ranges(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel (max - min) of every LayerNorm output."""
    ranges, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            def hook(_, __, out, name=name):
                flat = out.reshape(-1, out.shape[-1])
                ranges[name] = flat.amax(0) - flat.amin(0)
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ranges


def test_consumer_pairs_deit(outlier_models):
    qmodel, _ = quantize_model(copy.deepcopy(outlier_models["deit"]), QuantConfig())
    pairs = {name: [id(c) for c in consumers] for name, _, consumers in layernorm_consumers(qmodel)}
    assert sorted(pairs) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert pairs["norm"] == [id(qmodel.head)]
    assert pairs["blocks.0.norm1"] == [id(qmodel.blocks[0].attn.qkv)]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("key", MODELS)
def test_float_function_unchanged(key, preset, reparameterized, tiny_images):
    model, qmodel, done = reparameterized[key, preset]
    assert done["reparameterized"]
    x = tiny_images(8, seed=2)
    with torch.no_grad(), quantization_disabled(qmodel):
        got = qmodel(x)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the LayerNorms really were changed (not a no-op)
    qmods = dict(qmodel.named_modules())
    changed = [n for n, a in model.named_modules()
               if isinstance(a, nn.LayerNorm) and not torch.equal(a.weight, qmods[n].weight)]
    assert sorted(changed) == sorted(done["reparameterized"])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("key", MODELS)
def test_post_ln_ranges_equalised(key, preset, reparameterized, tiny_images):
    model, qmodel, done = reparameterized[key, preset]
    x = tiny_images(4, seed=1)   # the calibration images: ranges are set from them
    before = _ln_ranges(model, x)
    with quantization_disabled(qmodel):
        after = _ln_ranges(qmodel, x)
    for name in done["reparameterized"]:
        spread_before = (before[name].max() / before[name].min()).item()
        spread_after = (after[name].max() / after[name].min()).item()
        assert spread_before > OUTLIER / 2, name           # measured 19.9 .. 250
        if preset == "repq-vit":
            # measured 1.01 .. 1.27 (a channel whose range excludes 0 keeps some spread)
            assert spread_after < 1.5, (name, spread_after)
        else:  # strength 0.5: each channel's range divided by the square root of its relative scale
            assert spread_after == pytest.approx(spread_before ** 0.5, rel=0.1), (name, spread_before, spread_after)


@pytest.mark.parametrize("key,heads", [("deit", ["head"]), ("deit_distilled", ["head", "head_dist"]),
                                       ("swin", ["head.fc"])])
def test_classifier_pair_included(key, heads, reparameterized):
    model, qmodel, done = reparameterized[key, "repq"]
    assert "norm" in done["reparameterized"]
    mods, qmods = dict(model.named_modules()), dict(qmodel.named_modules())
    for h in heads:
        assert not torch.equal(mods[h].weight, qmods[h].weight), h
    names = set(done["reparameterized"])
    n_blocks = 2 if key.startswith("deit") else 4
    assert len(names) == 2 * n_blocks + 1 + (key == "swin")      # norm1/norm2 per block, final norm, patch merging
    if key == "swin":
        assert "layers.1.downsample.norm" in names


def test_no_reparam_for_float_consumers(outlier_models, tiny_images):
    config = QuantConfig(w_bits=8, a_bits=32, first_last_bits=None)
    qmodel, _ = quantize_model(copy.deepcopy(outlier_models["deit"]), config)
    assert calibrate(qmodel, config, tiny_images(2, seed=1), progress=False)["reparameterized"] == []
    minmax = QuantConfig(w_bits=8, a_bits=8, preset="minmax")
    qmodel, _ = quantize_model(copy.deepcopy(outlier_models["deit"]), minmax)
    assert calibrate(qmodel, minmax, tiny_images(2, seed=1), progress=False)["reparameterized"] == []


SWIN_HALF_STRENGTH = pytest.mark.xfail(strict=True, reason=(
    "measured -3.1 dB: on this random-init Swin with one 20x LayerNorm channel, half strength loses "
    "to no reparameterization at W8A4 (on the trained zoo models it wins; see docs/DESIGN.md)"))


@pytest.mark.parametrize("key, preset", [(k, p) for p in PRESETS + ["repq-comp"] for k in MODELS if (k, p) != ("swin", "repq")]
                         + [pytest.param("swin", "repq", marks=SWIN_HALF_STRENGTH)])
def test_reparam_pays_off_on_outlier_channels(key, preset, outlier_models, tiny_images, monkeypatch):
    """Only the LN consumers quantized (qkv, fc1) at W8A4: with the outlier channel, folding the
    per-channel ranges into the LayerNorm beats a plain per-tensor quantizer by a wide margin
    (repq-vit: measured +13.7 deit, +13.3 deit_distilled, +9.4 swin dB)."""
    model = outlier_models[key]
    calib, x = tiny_images(8, seed=1), tiny_images(8, seed=2)
    config = QuantConfig(w_bits=8, a_bits=4, preset=preset, include=("*.qkv", "*.fc1"))
    with torch.no_grad():
        ref = model(x)
        with_reparam = sqnr_db(ref, quantize(model, config, calib)[0](x))
        monkeypatch.setitem(SCHEMES, preset, dataclasses.replace(SCHEMES[preset], reparam=False, fold_inputs=False))
        without = sqnr_db(ref, quantize(model, config, calib)[0](x))
    assert with_reparam > without + 5.0, (with_reparam, without)
