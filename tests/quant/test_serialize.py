"""Saving and reloading quantized models (``model.safetensors`` + ``quantization_config.json``)."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from dfqvit.errors import UserError
from dfqvit.models import ModelSpec
from dfqvit.quant import QuantConfig, load_quantized, quantize, save_quantized
from dfqvit.quant.config import CONFIG_VERSION
from dfqvit.quant.serialize import CONFIG_FILE, WEIGHTS_FILE, read_meta

serialize_module = importlib.import_module("dfqvit.quant.serialize")

CONFIGS = {"deit": QuantConfig(w_bits=4, a_bits=8, preset="repq"),
           "swin": QuantConfig(w_bits=4, a_bits=6, preset="repq"),
           # the default, and RepQ-ViT's fractional zero points (a flag restored on reload)
           "deit-comp": QuantConfig(w_bits=4, a_bits=4, preset="repq-comp"),
           "swin-repq-vit": QuantConfig(w_bits=4, a_bits=4, preset="repq-vit"),
           "deit-minmax": QuantConfig(w_bits=3, a_bits=8, preset="minmax")}


@pytest.fixture(scope="module")
def quantized(tiny_model, tiny_specs, tiny_images):
    """(spec, config, calibrated quantized model) for DeiT and Swin."""
    out = {}
    for key, config in CONFIGS.items():
        arch = key.split("-")[0]
        name, kwargs = tiny_specs[arch]
        qmodel, _ = quantize(tiny_model(arch), config, tiny_images(4, seed=1))
        out[key] = (ModelSpec(name=name, kwargs=dict(kwargs)), config, qmodel)
    return out


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_save_load_equal_outputs(key, quantized, tmp_path, tiny_images):
    spec, config, qmodel = quantized[key]
    out = save_quantized(qmodel, spec, config, tmp_path / "q", extra={"calibration": {"source": "noise"}})
    assert out == tmp_path / "q"
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert isinstance(meta["format_version"], int) and meta["format_version"] >= 1
    assert meta["quantization"]["version"] == CONFIG_VERSION
    assert QuantConfig.from_dict(meta["quantization"]) == config
    assert meta["model"]["name"] == spec.name and meta["calibration"] == {"source": "noise"}
    x = tiny_images(4, seed=2)
    reloaded, meta2 = load_quantized(out)
    assert meta2 == meta and not reloaded.training
    with torch.no_grad():
        assert torch.equal(reloaded(x), qmodel(x))
    # the reloaded quantizers are calibrated from the file, not re-derived
    for (n, a), (_, b) in zip(qmodel.named_buffers(), reloaded.named_buffers()):
        if n.endswith(("scale", "zero_point", "calibrated")):
            assert torch.equal(a, b), n


def test_existing_out_refused_unless_force(quantized, tmp_path):
    spec, config, qmodel = quantized["deit"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        save_quantized(qmodel, spec, config, out)
    assert (out / "keep.txt").read_text() == "mine" and not (out / WEIGHTS_FILE).exists()
    save_quantized(qmodel, spec, config, out, force=True)
    assert (out / WEIGHTS_FILE).is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]     # no temporary leftovers


def test_failing_save_leaves_no_directory(quantized, tmp_path, monkeypatch):
    spec, config, qmodel = quantized["deit"]

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:                             # half-written, then fail
            f.write(b"\0" * 16)
        raise OSError("No space left on device")

    monkeypatch.setattr(serialize_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space"):
        save_quantized(qmodel, spec, config, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    # with force on an existing directory, the old one survives a failed save
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("old")
    with pytest.raises(OSError):
        save_quantized(qmodel, spec, config, tmp_path / "old", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "old"


def test_failing_extra_file_leaves_no_directory(quantized, tmp_path):
    spec, config, qmodel = quantized["deit"]

    def boom(path):
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        save_quantized(qmodel, spec, config, tmp_path / "q", extra_files={"model.onnx": boom})
    assert list(tmp_path.iterdir()) == []


def test_load_non_dfqvit_dir(tmp_path):
    with pytest.raises(UserError, match="not a dfqvit quantized model"):
        load_quantized(tmp_path)
    with pytest.raises(UserError, match="not a dfqvit quantized model"):
        load_quantized(tmp_path / "missing")
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_meta(tmp_path)


def test_load_newer_format_refused(quantized, tmp_path):
    spec, config, qmodel = quantized["deit"]
    out = save_quantized(qmodel, spec, config, tmp_path / "q")
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["format_version"] = 999
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="newer dfqvit"):
        load_quantized(out)


def test_version1_configs_load_or_refuse():
    """Configs saved before version 2: ``psaq`` was the min-max preset's old name; ``repq-vit``
    was redefined, so an artifact of the old one is refused with a one-line error."""
    old = {**QuantConfig().to_dict(), "version": 1}
    assert QuantConfig.from_dict({**old, "preset": "psaq"}).preset == "minmax"
    assert QuantConfig.from_dict({**old, "preset": "repq"}).preset == "repq"
    with pytest.raises(UserError, match="quantize the FP32 model again"):
        QuantConfig.from_dict({**old, "preset": "repq-vit"})


def test_input_folds_survive_reload_and_files_without_them_load(quantized, tmp_path, tiny_images):
    """repq-comp's input folds (shift, divisor, and the flag that turns them on) come back from
    the file; a file written before input folds existed (no such keys) loads with identity folds."""
    from safetensors.torch import load_file, save_file

    from dfqvit.quant.modules import InputFold
    x = tiny_images(4, seed=2)
    spec, config, qmodel = quantized["deit-comp"]
    active = [n for n, m in qmodel.named_modules() if isinstance(m, InputFold) and m.active]
    assert active, "the default preset folded no input of the tiny DeiT at W4A4"
    reloaded, _ = load_quantized(save_quantized(qmodel, spec, config, tmp_path / "comp"))
    assert [n for n, m in reloaded.named_modules() if isinstance(m, InputFold) and m.active] == active
    spec, config, qmodel = quantized["deit-minmax"]
    out = save_quantized(qmodel, spec, config, tmp_path / "old")
    state = load_file(out / WEIGHTS_FILE)
    save_file({k: v for k, v in state.items() if ".input_fold." not in k}, out / WEIGHTS_FILE,
              metadata={"format": "pt"})
    reloaded, _ = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(reloaded(x), qmodel(x))
