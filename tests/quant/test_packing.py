"""Packed integer weights: bit-exact pack/unpack, and bit-exact save/reload of quantized models."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dfqvit.models import ModelSpec
from dfqvit.quant import QuantConfig, load_quantized, quantize, save_quantized
from dfqvit.quant import primitives as P
from dfqvit.quant.packing import (PACK_SUFFIX, dequantize_codes, field_bits, pack_codes, packed_numel,
                                  unpack_codes)
from dfqvit.quant.serialize import CONFIG_FILE, WEIGHTS_FILE, read_meta

VIT_NAME = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_pack_unpack_round_trip(bits, signed, numel):
    qmin, qmax = P.qrange(bits, signed)
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(qmin, qmax + 1, (numel,), generator=g, dtype=torch.int32)
    codes[0] = qmin
    codes[-1] = qmax
    packed = pack_codes(codes, bits, signed)
    assert packed.numel() == packed_numel(numel, bits)
    assert packed.element_size() == 1
    assert torch.equal(unpack_codes(packed, bits, signed, (numel,)), codes)


def test_layout_and_density():
    assert [field_bits(b) for b in (2, 3, 4, 5, 8)] == [2, 4, 4, 8, 8]
    # two 4-bit codes per byte, low nibble first, two's complement (ONNX INT4 layout)
    assert pack_codes(torch.tensor([1, -2]), 4, True).tolist() == [0x01 | (0x0E << 4)]
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2, False).tolist() == [1 | 2 << 2 | 3 << 4]
    assert packed_numel(1000, 2) == 250 and packed_numel(1000, 3) == 500 and packed_numel(1000, 6) == 1000
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([8]), 4, True)  # outside the restricted signed grid [-7, 7]


@pytest.fixture(scope="module")
def calib_images():
    return torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _tiny_quantized(w_bits, a_bits, calib_images, preset="minmax", first_last_bits=8):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, **VIT_KWARGS).eval()
    qmodel, _ = quantize(model, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset,
                                            first_last_bits=first_last_bits), calib_images)
    return model, qmodel


@pytest.mark.parametrize("w_bits,preset", [(2, "minmax"), (3, "minmax"), (4, "repq"), (8, "minmax")])
def test_save_reload_bit_exact(tmp_path, calib_images, w_bits, preset):
    model, qmodel = _tiny_quantized(w_bits, 8, calib_images, preset=preset, first_last_bits=None)
    spec = ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS)
    config = QuantConfig(w_bits=w_bits, a_bits=8, preset=preset, first_last_bits=None)
    out = save_quantized(qmodel, spec, config, tmp_path / "q")
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = qmodel(x)
        reloaded, meta = load_quantized(out)
        got = reloaded(x)
    assert torch.equal(got, expected)
    # every active quantized weight is packed at its bit-width, the float weight is gone
    state = load_file(str(out / WEIGHTS_FILE))
    table = meta["packed_weights"]
    n_quant = sum(1 for m in qmodel.modules() if getattr(m, "weight_quant", None) is not None)
    assert len(table) == n_quant > 0
    for key, entry in table.items():
        assert key not in state and key + PACK_SUFFIX in state
        assert entry["bits"] == w_bits
        numel = 1
        for s in entry["shape"]:
            numel *= s
        assert state[key + PACK_SUFFIX].numel() == packed_numel(numel, w_bits)
    # reloaded weights are the dequantized codes: the fake-quant of the original weights
    for (name, m), m2 in zip(qmodel.named_modules(), reloaded.modules()):
        if getattr(m, "weight_quant", None) is not None:
            assert torch.equal(m2.weight, m.weight_quant(m.weight)), name
    assert meta["size"]["model_safetensors_bytes"] == (out / WEIGHTS_FILE).stat().st_size


def test_weight_codes_dequantize_exactly(calib_images):
    _, qmodel = _tiny_quantized(4, 8, calib_images)
    for m in qmodel.modules():
        wq = getattr(m, "weight_quant", None)
        if wq is not None:
            codes = wq.int_weight(m.weight)
            qmin, qmax = P.qrange(wq.bits, wq.symmetric)
            assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
            assert torch.equal(dequantize_codes(codes, wq.scale, wq.zero_point), wq(m.weight))


def test_w4_file_size_ratio(tmp_path, calib_images):
    """W4A8 with 8-bit first/last layers: file well under a third of the FP32 safetensors even
    on this tiny model (whose float biases / LayerNorms / headers weigh relatively more)."""
    _, qmodel = _tiny_quantized(4, 8, calib_images)
    out = save_quantized(qmodel, ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS), QuantConfig(w_bits=4, a_bits=8, preset="minmax"),
                         tmp_path / "q")
    meta = read_meta(out)
    size = meta["size"]
    assert size["model_safetensors_bytes"] < 0.35 * size["fp32_safetensors_bytes"], size
    bits = {k: v["bits"] for k, v in meta["packed_weights"].items()}
    assert bits.pop("patch_embed.proj.weight") == 8 and bits.pop("head.weight") == 8  # first / last layers
    assert set(bits.values()) == {4}
    assert all(v["zero_point"] == "zeros" for v in meta["packed_weights"].values())  # symmetric: not stored


def test_float_weights_are_not_packed(tmp_path, calib_images):
    """w_bits=32 (weights float, activations 8-bit): nothing to pack, reload still exact."""
    _, qmodel = _tiny_quantized(32, 8, calib_images, first_last_bits=None)
    out = save_quantized(qmodel, ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS),
                         QuantConfig(w_bits=32, a_bits=8, preset="minmax", first_last_bits=None), tmp_path / "q")
    reloaded, meta = load_quantized(out)
    assert meta["packed_weights"] == {}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded(x), qmodel(x))


def test_unpacked_format1_still_loads(tmp_path, calib_images):
    """A format-1 directory (float weights, no packing table) reloads with identical outputs."""
    from safetensors.torch import save_file

    _, qmodel = _tiny_quantized(4, 8, calib_images)
    spec = ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS)
    out = save_quantized(qmodel, spec, QuantConfig(w_bits=4, a_bits=8, preset="minmax"), tmp_path / "q")
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["format_version"] = 1
    del meta["packed_weights"]
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in qmodel.state_dict().items()}, str(out / WEIGHTS_FILE))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_quantized(out)[0](x), qmodel(x))


def test_failed_save_leaves_nothing(tmp_path, calib_images):
    _, qmodel = _tiny_quantized(4, 8, calib_images)

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_quantized(qmodel, ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS), QuantConfig(), tmp_path / "q",
                       extra_files={"x.bin": boom})
    assert list(tmp_path.iterdir()) == []


def test_save_reload_with_activation_correction(tmp_path, calib_images):
    """A model with fitted ACM (dfqvit.acm; saved with ``extra={"acm": ...}`` like `dfqvit
    quantize`) reloads bit-exactly: the corrections are re-attached before loading."""
    acm = pytest.importorskip("dfqvit.acm")
    fp, qmodel = _tiny_quantized(4, 8, calib_images)
    cfg = acm.ACMConfig(kind="full")
    acm.fit_corrections(qmodel, fp, calib_images, cfg, progress=False)
    out = save_quantized(qmodel, ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS),
                         QuantConfig(w_bits=4, a_bits=8, preset="minmax"), tmp_path / "q", extra={"acm": cfg.to_dict()})
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_quantized(out)[0](x), qmodel(x))
