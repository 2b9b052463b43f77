"""Calibration steps: every active quantizer ends calibrated; the ``observing`` and
``quantization_disabled`` context managers."""
from __future__ import annotations

import copy

import pytest
import torch

from dfqvit.quant import (QuantConfig, calibrate, calibrate_weights, observing, quantization_disabled,
                          quantize_model, quantizers)
from dfqvit.quant import primitives as P
from dfqvit.quant.quantizers import ActQuantizer, Log2Quantizer, WeightQuantizer


@pytest.mark.parametrize("key,preset", [("deit", "repq"), ("deit", "minmax"), ("swin", "minmax"),
                                        ("deit_distilled", "minmax")])
def test_all_active_quantizers_calibrated(key, preset, tiny_model, tiny_images):
    config = QuantConfig(w_bits=4, a_bits=8, preset=preset)
    qmodel, _ = quantize_model(tiny_model(key), config)
    qs = quantizers(qmodel)
    assert qs and not any(q.active for _, q in qs)          # converted, not calibrated: float
    done = calibrate(qmodel, config, tiny_images(4, seed=1), batch_size=2, progress=False)
    assert bool(done["reparameterized"]) == (preset == "repq")
    active_bits = [(n, q) for n, q in qs if not P.is_float(q.bits)]
    assert active_bits
    for name, q in active_bits:
        assert bool(q.calibrated) and q.active, name
        assert q.scale.gt(0).all(), name
        assert not q.observing, name
    # minmax keeps the post-softmax probabilities float; repq uses the log-sqrt2 quantizer
    probs = [q for n, q in qs if n.endswith("matmul_av.a_quant")]
    assert probs and all(isinstance(q, Log2Quantizer) == (preset == "repq") for q in probs)
    assert all(P.is_float(q.bits) and not q.active for q in probs if preset == "minmax")


def test_observing_context(tiny_model, tiny_images):
    model = tiny_model("deit")
    qmodel, _ = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=8, a_bits=8, preset="minmax"))
    acts = [q for _, q in quantizers(qmodel) if isinstance(q, ActQuantizer) and not P.is_float(q.bits)]
    weights = [q for _, q in quantizers(qmodel) if isinstance(q, WeightQuantizer)]
    x = tiny_images(4, seed=1)
    with torch.no_grad(), observing(qmodel):
        assert all(q.observing for q in acts)
        out = qmodel(x)
        assert all(q._lo is not None for q in acts)       # every activation quantizer saw data
        assert not any(bool(q.calibrated) for q in acts)  # ranges are set only on exit
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=0)   # pass-through while observing
    assert all(bool(q.calibrated) and not q.observing for q in acts)
    assert all(q._lo is None and q._samples == [] for q in acts)
    assert not any(bool(q.calibrated) for q in weights)   # weights are calibrate_weights' job
    calibrate_weights(qmodel)
    assert all(bool(q.calibrated) for q in weights)
    with torch.no_grad():
        assert not torch.equal(qmodel(x), out)


def test_observing_context_on_error(tiny_model, tiny_images):
    qmodel, _ = quantize_model(tiny_model("deit"), QuantConfig(preset="minmax"))
    acts = [q for _, q in quantizers(qmodel) if isinstance(q, ActQuantizer)]
    with pytest.raises(RuntimeError, match="stop"), torch.no_grad(), observing(qmodel):
        qmodel(tiny_images(2, seed=1))
        raise RuntimeError("stop")
    assert not any(q.observing or bool(q.calibrated) for q in acts)
    assert all(q._lo is None and q._samples == [] for q in acts)


def test_quantization_disabled(tiny_model, tiny_images):
    model = tiny_model("deit")
    config = QuantConfig(w_bits=4, a_bits=4, preset="minmax")
    qmodel, _ = quantize_model(copy.deepcopy(model), config)
    calibrate(qmodel, config, tiny_images(4, seed=1), progress=False)
    x = tiny_images(4, seed=2)
    qs = [q for _, q in quantizers(qmodel)]
    qs[0].enabled = False                                    # a quantizer already off stays off
    with torch.no_grad():
        quantized = qmodel(x)
        with quantization_disabled(qmodel):
            assert not any(q.enabled for q in qs)
            float_out = qmodel(x)
        assert torch.equal(qmodel(x), quantized)
        torch.testing.assert_close(float_out, model(x), atol=1e-5, rtol=0)   # minmax: no reparam
    assert not qs[0].enabled and all(q.enabled for q in qs[1:])
    assert not torch.allclose(quantized, float_out, atol=1e-3)
