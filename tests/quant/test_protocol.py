"""The quantizer presets pinned to their measured figures on issue 18's protocol: the bundled
models, the 32 Fashion-MNIST train images at ``RandomState(0).permutation(60000)[:32]``, the
first 5000 test images, first/last layers at 8 bits.

``repq-vit`` must reproduce RepQ-ViT's public code (zkkli/RepQ-ViT, run outside the project on
the same model and images; docs/RESULTS.md): the reference figures below are that code's.
The tolerances (KL within 15 %, top-1 within 0.3 points) are the issue's bar; today's
figures sit well inside them, and the quantizer this preset replaced (KL 0.0824 at DeiT W4A4)
fails them by a factor of three.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfqvit.data import FASHION_MNIST, make_dataset
from dfqvit.evaluate import score
from dfqvit.models import load_model
from dfqvit.quant import QuantConfig, quantize

pytestmark = [pytest.mark.slow, pytest.mark.needs_fashion_mnist]
EVAL_IMAGES = 5000

# RepQ-ViT's own code on the protocol: (top-1 %, KL(FP32‖Q)).
REPQ_VIT_CODE = {
    ("deit-fmnist", "W4A4"): (91.44, 0.0230), ("deit-fmnist", "W6A6"): (92.06, 0.0049),
    ("deit-fmnist", "W4A8"): (92.08, 0.0054),
    ("swin-fmnist", "W4A4"): (91.62, 0.0280), ("swin-fmnist", "W6A6"): (92.40, 0.0021),
    ("swin-fmnist", "W4A8"): (92.30, 0.0053),
}


@pytest.fixture(scope="module", params=["deit-fmnist", "swin-fmnist"])
def protocol(request):
    name = request.param
    model, data_config, _ = load_model(f"zoo:{name}")
    train = make_dataset(FASHION_MNIST, data_config, split="train")
    calib = torch.stack([train[int(i)][0] for i in np.random.RandomState(0).permutation(len(train))[:32]])
    test = make_dataset(FASHION_MNIST, data_config, split="test")
    images, targets = zip(*(test[i] for i in range(EVAL_IMAGES)))
    images, targets = torch.stack(images), torch.tensor(targets)
    with torch.no_grad():
        fp_logits = model(images)
    return name, model, calib, images, targets, fp_logits


def _measure(protocol, preset: str, setting: str):
    _, model, calib, images, targets, fp_logits = protocol
    w_bits, a_bits = map(int, setting[1:].split("A"))
    qmodel, _ = quantize(model, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset), calib)
    with torch.no_grad():
        logits = torch.cat([qmodel(b) for b in images.split(1000)])
    return score(logits, targets, reference_logits=fp_logits)


@pytest.mark.parametrize("setting", ["W4A4", "W6A6", "W4A8"])
def test_repq_vit_reproduces_repq_vit_code(protocol, setting):
    top1, kl = REPQ_VIT_CODE[(protocol[0], setting)]
    result = _measure(protocol, "repq-vit", setting)
    assert abs(result.top1 - top1) <= 0.3, (result.top1, top1)
    assert abs(result.kl - kl) <= 0.15 * kl, (result.kl, kl)


# The default preset (repq-comp) on the same protocol, measured at the commit that chose the ridge
# per layer by cross-validation (0911529) on an Intel AVX-512 Xeon: (top-1 %, KL). It must stay
# below RepQ-ViT's code and near these figures. They move with the CPU's float kernels (near-tie
# decisions in the sequential calibration: DeiT W4A4 without the per-token ranges was 0.0170 on
# an AVX-512 EPYC, 0.0183 on an AVX2 one). 1.15x fails 0.0170 (a regression that loses the
# per-token ranges), and 0.8x RepQ-ViT's code fails `repq-vit` (0.0226) and the old `repq` (0.0911).
REPQ_COMP = {
    ("deit-fmnist", "W4A4"): (91.60, 0.0141), ("deit-fmnist", "W3A8"): (92.00, 0.0032),
    ("swin-fmnist", "W4A4"): (92.18, 0.0098), ("swin-fmnist", "W3A8"): (92.32, 0.0031),
}
REPQ_VIT_CODE.update({("deit-fmnist", "W3A8"): (91.40, 0.0138), ("swin-fmnist", "W3A8"): (90.24, 0.0600)})


@pytest.mark.parametrize("setting", ["W4A4", "W3A8"])
def test_default_preset_beats_repq_vit(protocol, setting):
    key = (protocol[0], setting)
    result = _measure(protocol, "repq-comp", setting)
    assert result.kl <= 1.15 * REPQ_COMP[key][1], (result.kl, REPQ_COMP[key])
    assert result.kl <= 0.8 * REPQ_VIT_CODE[key][1], (result.kl, REPQ_VIT_CODE[key])
    assert result.top1 >= REPQ_COMP[key][0] - 0.4, (result.top1, REPQ_COMP[key])
