"""The quantization run shared by the CLI and the benchmarks, and a `dfqvit quantize` smoke test."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from dfqvit.acm import ActivationCorrection
from dfqvit.models import resolve_data_config
from dfqvit.pipeline import CalibSpec, EvalSet, run_quantization
from dfqvit.quant import QuantConfig, QLinear, load_quantized
from dfqvit.quant.serialize import CONFIG_FILE, WEIGHTS_FILE

VIT_NAME = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
VIT_CLI_KWARGS = ["img_size=28", "patch_size=7", "in_chans=1", "num_classes=10", "embed_dim=32",
                  "depth=2", "num_heads=2"]
ROW_KEYS = {"preset", "w_bits", "a_bits", "calib", "calib_size", "seed", "top1", "top5", "fp32_top1",
            "agreement", "kl", "weight_bytes", "fp32_weight_bytes", "seconds"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(VIT_NAME, **VIT_KWARGS).eval()


@pytest.fixture(scope="module")
def data_config(model):
    return resolve_data_config(model)


@pytest.fixture
def evalset():
    g = torch.Generator().manual_seed(3)
    return EvalSet(torch.randn(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g),
                   batch_size=100)


def _run(model, data_config, evalset=None, **config):
    return run_quantization(model, data_config, QuantConfig(**config), CalibSpec(source="noise", size=8),
                            evalset, progress=False)


def test_row(model, data_config, evalset):
    qmodel, row, images = _run(model, data_config, evalset, w_bits=8, a_bits=8)
    assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
    assert (row["preset"], row["w_bits"], row["a_bits"]) == ("repq-comp", 8, 8)
    assert (row["calib"], row["calib_size"], row["seed"]) == ("noise", 8, 0)
    assert images.shape == (8, 1, 28, 28)
    for key in ("top1", "top5", "fp32_top1", "agreement"):
        assert 0.0 <= row[key] <= 100.0, key
    assert row["top5"] >= row["top1"] and row["kl"] >= 0.0
    assert {"calibration_data", "quantize", "eval"} <= set(row["seconds"])
    json.dumps(row)                                               # a results file can hold it
    # W8A8 keeps the FP32 top-1 on random inputs for the large majority of images; measured
    # 96.5% on these 200 (a random-init model's logits are nearly tied, so not 100%)
    assert row["agreement"] >= 90.0
    assert isinstance(qmodel.blocks[0].attn.qkv, QLinear) and not isinstance(model.blocks[0].attn.qkv, QLinear)
    # the FP32 reference logits are computed once and reused
    assert evalset.fp_logits is not None
    reference = evalset.fp_logits
    _, row2, _ = _run(model, data_config, evalset, w_bits=4, a_bits=8)
    assert evalset.fp_logits is reference and row2["fp32_top1"] == row["fp32_top1"]


def test_weight_bytes(model, data_config):
    """Mostly Linear weights: W4 (first/last layers at 8 bits, per-channel float scales, float
    biases / LayerNorms / embeddings) is about a fifth of FP32 (measured 0.204)."""
    _, w4, _ = _run(model, data_config, w_bits=4, a_bits=8, preset="minmax")
    _, w8, _ = _run(model, data_config, w_bits=8, a_bits=8, preset="minmax")
    _, w32, _ = _run(model, data_config, w_bits=32, a_bits=32, first_last_bits=None, preset="minmax")
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert w4["fp32_weight_bytes"] == fp32
    assert w4["weight_bytes"] < 0.3 * fp32
    assert w4["weight_bytes"] < w8["weight_bytes"] < fp32
    assert w32["weight_bytes"] == fp32
    assert "top1" not in w4                                       # no evaluation set: no accuracy


def test_calibration_is_seeded_and_reusable(model, data_config):
    _, _, a = _run(model, data_config, w_bits=4, a_bits=8, preset="minmax")
    _, _, b = _run(model, data_config, w_bits=4, a_bits=8, preset="minmax")
    assert torch.equal(a, b)
    given = torch.randn(5, 1, 28, 28)
    _, row, images = run_quantization(model, data_config, QuantConfig(preset="minmax"),
                                      CalibSpec(source="noise", size=8, images=given), progress=False)
    assert images is given and row["calib_size"] == 5


def test_cli_quantize_smoke(tmp_path, run_cli, assert_one_line_error):
    out = tmp_path / "q"
    args = ["quantize", "--model", VIT_NAME, "--model-kwargs", *VIT_CLI_KWARGS,
            "--calib", "noise", "--synth-opts", "slope=2", "--calib-size", "8", "--no-eval", "--out", out]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert "saved to" in result.stdout and "weight bytes" in result.stdout
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["calibration"]["source"] == "noise" and meta["calibration"]["size"] == 8
    assert meta["calibration"]["options"] == {"slope": 2}      # enough to make the same images again
    assert meta["quantization"]["w_bits"] == 4 and meta["model"]["name"] == VIT_NAME
    # the default ACM is saved resolved: W4A8 (8-bit activations) gets the full map, ridge 1
    assert (meta["acm"]["kind"], meta["acm"]["ridge"]) == ("full", 1.0)
    qmodel, _ = load_quantized(out)
    assert any(isinstance(m, QLinear) for m in qmodel.modules())
    assert {m.kind for m in qmodel.modules() if isinstance(m, ActivationCorrection)} == {"full"}
    # the same --out again: refused, untouched
    before = (out / WEIGHTS_FILE).read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2
    assert_one_line_error(again.stderr)
    assert "--force" in again.stderr
    assert (out / WEIGHTS_FILE).read_bytes() == before


@pytest.mark.parametrize("flags,message", [(["--w-bits", "9"], "w_bits=9"), (["--a-bits", "1"], "a_bits=1"),
                                           (["--first-last-bits", "12"], "first_last_bits=12"),
                                           (["--include", "nothing.*"], "matches no quantizable module"),
                                           (["--acm-ridge", "0"], "ridge must be positive"),
                                           (["--acm-noise-share", "-1"], "noise share must be a number >= 0"),
                                           (["--synth-opts", "slope=-1"], "noise slope must be"),
                                           (["--synth-opts", "iterations=5"], "takes only the option slope"),
                                           (["--calib", "real", "--synth-opts", "slope=2"],
                                            "does not apply to --calib real")])
def test_cli_bad_settings(tmp_path, capsys, assert_one_line_error, flags, message):
    """In process (``main`` is what the console script runs): exit 2, one line, no traceback."""
    from dfqvit.cli import main

    code = main(["quantize", "--model", VIT_NAME, "--model-kwargs", *VIT_CLI_KWARGS, "--calib", "noise",
                 "--calib-size", "2", "--no-eval", *flags, "--out", str(tmp_path / "q")])
    assert code == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_cli_bad_bits_subprocess(tmp_path, run_cli, assert_one_line_error):
    result = run_cli("quantize", "--model", VIT_NAME, "--model-kwargs", *VIT_CLI_KWARGS, "--calib", "noise",
                     "--w-bits", "9", "--no-eval", "--out", tmp_path / "q")
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
    assert "w_bits=9" in result.stderr and "2..8" in result.stderr
    assert not (tmp_path / "q").exists()


def test_evalset_limit_loads_the_first_items_only():
    from torch.utils.data import TensorDataset

    images, targets = torch.randn(10, 1, 28, 28), torch.arange(10)
    head = EvalSet.from_dataset(TensorDataset(images, targets), limit=4)
    assert torch.equal(head.images, images[:4]) and torch.equal(head.targets, targets[:4])
    assert len(EvalSet.from_dataset(TensorDataset(images, targets), limit=50).targets) == 10
