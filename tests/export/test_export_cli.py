"""``dfqvit export DIR --format onnx --out FILE`` and ``dfqvit eval --onnx FILE`` (``dfqvit.cli.export``,
``dfqvit.cli.evaluate``), run through the real parser in-process; one subprocess run checks the wiring."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from dfqvit.cli import build_parser
from dfqvit.errors import UserError
from dfqvit.export.ort import OnnxModel
from dfqvit.models import ModelSpec
from dfqvit.quant import QuantConfig, quantize, save_quantized

VIT_NAME = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny ViT W4A8 saved with `save_quantized`, its FP32 checkpoint next to it."""
    d = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, **VIT_KWARGS).eval()
    ckpt = d / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    config = QuantConfig(w_bits=4, a_bits=8)
    qmodel, _ = quantize(model, config, torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    spec = ModelSpec(name=VIT_NAME, kwargs=VIT_KWARGS, checkpoint=str(ckpt))
    return save_quantized(qmodel, spec, config, d / "w4a8"), qmodel


def run(argv):
    """The command's function, called directly: a UserError propagates to the test."""
    args = build_parser().parse_args([str(a) for a in argv])
    args.model_given = any(a in ("--model", "-m") for a in argv)
    return args.func(args)


def test_export_command(tmp_path, saved_dir, capsys):
    qdir, qmodel = saved_dir
    out = tmp_path / "model.onnx"
    assert run(["export", qdir, "--format", "onnx", "--out", out, "--results-file", tmp_path / "r.json"]) == 0
    text = capsys.readouterr().out
    assert "MatMulIntegerToFloat" in text and "integer kernels" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["integer_ops"]["MatMulIntegerToFloat"] == 12
    # the exported model computes what the saved (and reloaded) model computes
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        ref = qmodel(x)
    got = OnnxModel(out)(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    # refuses to overwrite without --force; --force replaces
    with pytest.raises(UserError, match="already exists"):
        run(["export", qdir, "--out", out])
    assert run(["export", qdir, "--out", out, "--force", "--opset", "13", "--no-check"]) == 0


@pytest.mark.parametrize("extra,match", [
    (["--format", "tflite"], "unknown export format"),
    (["--opset", "9"], "opset"),
    (["--log2-softmax", "nope"], "log2"),
    (["--weight-format", "int4"], "opset 21"),
])
def test_export_command_errors(tmp_path, saved_dir, extra, match):
    qdir, _ = saved_dir
    with pytest.raises(UserError, match=match):
        run(["export", qdir, "--out", tmp_path / "m.onnx", *extra])
    assert list(tmp_path.iterdir()) == []


def test_export_not_a_quantized_dir(tmp_path):
    with pytest.raises(UserError, match="not a dfqvit quantized model"):
        run(["export", tmp_path, "--out", tmp_path / "m.onnx"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.needs_fashion_mnist
def test_eval_onnx(tmp_path, saved_dir, tiny_fmnist_dir, capsys):
    qdir, _ = saved_dir
    out = tmp_path / "m.onnx"
    run(["export", qdir, "--out", out, "--no-check"])
    capsys.readouterr()
    res = tmp_path / "eval.json"
    assert run(["eval", "--onnx", out, "--data-dir", tiny_fmnist_dir, "-b", "64", "--results-file", res]) == 0
    row = json.loads(res.read_text())
    assert row["runtime"] == "onnxruntime-cpu" and 0 <= row["top1"] <= 100
    assert "agreement" in row  # the FP32 reference was found through the ONNX metadata
    assert "(onnxruntime-cpu)" in capsys.readouterr().out
    with pytest.raises(UserError, match="does not exist"):
        run(["eval", "--onnx", tmp_path / "missing.onnx", "--data-dir", tiny_fmnist_dir])


@pytest.mark.needs_fashion_mnist
def test_cli_subprocess(tmp_path, saved_dir, tiny_fmnist_dir, run_cli, assert_one_line_error):
    qdir, _ = saved_dir
    out = tmp_path / "m.onnx"
    r = run_cli("export", qdir, "--format", "onnx", "--out", out, "--no-check")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--onnx", out, "--data-dir", tiny_fmnist_dir, "-b", "100")
    assert r.returncode == 0, r.stderr
    assert "(onnxruntime-cpu)" in r.stdout
    r = run_cli("export", qdir, "--format", "tflite", "--out", tmp_path / "x")
    assert r.returncode == 2
    assert_one_line_error(r.stderr)
    assert not (tmp_path / "x").exists()
