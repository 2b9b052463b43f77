"""dfqvit.calib.dfq: the Easy-to-Hard stages, hard-example mining and unoptimised starts.

Tiny random-init timm models, a stand-in for the quantizer, a few steps per stage.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dfqvit.calib import make_source
from dfqvit.calib.base import valid_pixel_range
from dfqvit.calib.objectives import find_attention_taps
from dfqvit.calib.sources import noise_images

FAST = dict(progress=False)


def _fake_quantize(model, bits=3):
    """A stand-in for the quantizer: weight fake-quant with a straight-through input rounding."""
    calls = []

    def quantize(images):
        calls.append(images.shape[0])
        q = copy.deepcopy(model)
        with torch.no_grad():
            for m in q.modules():
                if isinstance(m, nn.Linear):
                    s = m.weight.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
                    m.weight.copy_((m.weight / s).round() * s)
                    m.register_forward_pre_hook(lambda mod, a: (a[0] + (a[0] * 4).round().div(4).sub(a[0]).detach(),))
        return q

    quantize.calls = calls
    return quantize


def test_hard_mining_uses_quantized_model(vit, synth_ctx):
    quantize = _fake_quantize(vit)
    src = make_source("dfq", iterations=10, start_share=0.0, **FAST)
    x = src.generate(vit, 9, synth_ctx(quantize=quantize))
    assert quantize.calls == [3, 6]                       # re-calibrated on all images made so far
    assert src.stats["stage_sizes"] == [3, 3, 3] and src.stats["mined_stages"] == [2, 3]
    assert src.stats["last_batch"]["kl"] > 0
    assert x.shape == (9, 1, 32, 32)
    assert all(not t.proj._forward_pre_hooks for t in find_attention_taps(vit))
    # the switch turns it off; without ctx.quantize there is nothing to mine against
    off = make_source("dfq", iterations=10, hard_mining=False, start_share=0.0, **FAST)
    off.generate(vit, 9, synth_ctx(quantize=quantize))
    assert off.stats["mined_stages"] == [] and quantize.calls == [3, 6]


def test_e2h_order_and_ablation_switches(vit, synth_ctx):
    src = make_source("dfq", iterations=5, local_crops=False, patch_entropy=False, tv_prior=False,
                      e2h_stages=2, start_share=0.0, **FAST)
    x = src.generate(vit, 5, synth_ctx())
    assert x.shape == (5, 1, 32, 32) and src.stats["stage_sizes"] == [3, 2]
    assert src.stats["last_batch"]["entropy"] == 0 and src.stats["last_batch"]["local_ce"] == 0
    # balanced labels: classes cycle over the whole set, stage by stage
    assert sorted(src.targets.tolist()) == [0, 1, 2, 3, 4]


def test_unoptimised_starts_come_first_and_are_seen_by_mining(vit, synth_ctx, synth_data_config):
    quantize = _fake_quantize(vit)
    src = make_source("dfq", iterations=5, start_share=0.25, **FAST)
    x = src.generate(vit, 12, synth_ctx(quantize=quantize))
    assert x.shape == (12, 1, 32, 32) and src.stats["unoptimised_starts"] == 3
    assert src.stats["stage_sizes"] == [3, 3, 3] and quantize.calls == [6, 9]
    assert src.targets[:3].tolist() == [-1] * 3 and (src.targets[3:] >= 0).all()
    # the starts are exactly the first images the same seed draws when nothing is synthesized
    lo, hi = valid_pixel_range(synth_data_config)
    assert torch.equal(x[:3], noise_images(torch.Generator().manual_seed(0), 3, (1, 32, 32), 2.0).clamp(lo, hi))
    # a tiny set still synthesizes one image
    one = make_source("dfq", iterations=2, start_share=0.9, **FAST)
    assert one.generate(vit, 2, synth_ctx()).shape[0] == 2 and one.stats["unoptimised_starts"] == 1
