"""Fault injection: every file the tool reads damaged, non-finite values at each stage,
unwritable outputs, bad options, interrupted runs, and deterministic artifacts.

The contract (issue 19): a fault the user can fix is one ``dfqvit: error: ...`` line and exit
status 2, found before the expensive work where it can be known up front; nothing is left at
``--out``; what is saved loads back; the same seed writes the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfqvit.cli import main

pytestmark = pytest.mark.needs_fashion_mnist

VIT = "vit_tiny_patch16_224"
VIT_KW = ["img_size=28", "patch_size=7", "in_chans=1", "num_classes=10", "embed_dim=32", "depth=2", "num_heads=2"]
QUICK = ["--calib", "noise", "--calib-size", "8", "--acm", "off", "--no-eval"]


@pytest.fixture(scope="module")
def model_args(tiny_checkpoint_session, tiny_fmnist_dir):
    return ["--model", VIT, "--model-kwargs", *VIT_KW, "--checkpoint", str(tiny_checkpoint_session.safetensors),
            "--mean", "0.286", "--std", "0.353", "--data-dir", str(tiny_fmnist_dir)]


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, model_args):
    out = tmp_path_factory.mktemp("saved") / "q"
    assert main(["quantize", *model_args, *QUICK, "--calib-size", "8", "--out", str(out)]) == 0
    return out


def fails_with(capsys, argv, *needles) -> str:
    """Run the CLI in-process; assert exit 2 and one `dfqvit...: error:` line holding every needle."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:      # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    # a progress bar that was running ends in "\r" and is wiped by the next write
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith("note:")]
    assert rc == 2, err
    assert len(lines) == 1 and "error:" in lines[0] and lines[0].startswith("dfqvit"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test if calibration starts: the fault must be found before it."""
    import dfqvit.pipeline as pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("the fault was found only after calibration started")

    monkeypatch.setattr(pipeline, "calibration_images", forbidden)


# ----------------------------------------------------------------------------- checkpoints

def _damaged_checkpoint(tmp_path, tiny_checkpoint_session, how: str):
    state = {k: v.clone() for k, v in load_file(str(tiny_checkpoint_session.safetensors)).items()}
    path = tmp_path / "bad.safetensors"
    if how == "truncated":
        path.write_bytes(tiny_checkpoint_session.safetensors.read_bytes()[:5000])
    elif how == "garbage-pth":
        path = tmp_path / "bad.pth"
        path.write_bytes(b"not a checkpoint at all")
    else:
        key = "blocks.0.attn.qkv.weight" if how != "overflow" else "head.weight"
        state[key][0, 0] = {"nan": float("nan"), "inf": float("inf"), "overflow": 3e38}[how]
        if how == "overflow":
            state[key].fill_(3e38)
        save_file(state, str(path))
    return path


@pytest.mark.parametrize("how, needle", [
    ("truncated", "cannot read checkpoint"), ("garbage-pth", "cannot read checkpoint"),
    ("nan", "NaN or infinite values in blocks.0.attn.qkv.weight"), ("inf", "NaN or infinite"),
    ("overflow", "logits"),
])
def test_damaged_checkpoint_in_eval(capsys, tmp_path, model_args, tiny_checkpoint_session, how, needle):
    bad = _damaged_checkpoint(tmp_path, tiny_checkpoint_session, how)
    args = [a if a != str(tiny_checkpoint_session.safetensors) else str(bad) for a in model_args]
    fails_with(capsys, ["eval", *args], needle)


def test_nan_checkpoint_in_quantize_is_refused_before_work(capsys, tmp_path, model_args, tiny_checkpoint_session,
                                                           no_expensive_work):
    bad = _damaged_checkpoint(tmp_path, tiny_checkpoint_session, "nan")
    args = [a if a != str(tiny_checkpoint_session.safetensors) else str(bad) for a in model_args]
    fails_with(capsys, ["quantize", *args, *QUICK, "--out", tmp_path / "q"], "NaN")
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- data

def _image_folder(tmp_path, fault: str):
    from PIL import Image

    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (20 + i * 7, 30), color=40 * i).save(root / cls / f"{i}.png")
            Image.new("RGB", (33, 25), color=(9, 80, 200)).save(root / cls / f"{i}.jpg", quality=90)
    victim = root / "b" / "1.jpg"
    if fault == "not-an-image":
        victim.write_text("this is a text file named .jpg")
    else:
        victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    return root


@pytest.mark.parametrize("fault", ["not-an-image", "truncated"])
def test_bad_image_in_data_dir(capsys, tmp_path, tiny_checkpoint_session, fault):
    root = _image_folder(tmp_path, fault)
    fails_with(capsys, ["eval", "--model", VIT, "--model-kwargs", *VIT_KW, "--checkpoint",
                        tiny_checkpoint_session.safetensors, "--data-dir", root], "cannot read image", "1.jpg")


def test_mixed_size_image_folder_evaluates(capsys, tmp_path, tiny_checkpoint_session):
    root = _image_folder(tmp_path, "not-an-image")
    (root / "b" / "1.jpg").unlink()
    assert main(["eval", "--model", VIT, "--model-kwargs", *VIT_KW, "--checkpoint",
                 str(tiny_checkpoint_session.safetensors), "--data-dir", str(root)]) == 0
    assert "(11 images)" in capsys.readouterr().out


def test_input_size_the_model_cannot_take(capsys, model_args):
    fails_with(capsys, ["eval", *model_args, "--input-size", "1", "32", "32"], "built for 28x28")


def test_no_data_for_a_model_that_is_not_from_the_zoo(capsys, tiny_checkpoint_session):
    fails_with(capsys, ["eval", "--model", VIT, "--model-kwargs", *VIT_KW, "--checkpoint",
                        tiny_checkpoint_session.safetensors], "no evaluation data")


def test_eval_limit(capsys, model_args):
    assert main(["eval", *model_args, "--limit", "50"]) == 0
    assert "(50 images)" in capsys.readouterr().out
    fails_with(capsys, ["eval", *model_args, "--limit", "0"], "--limit")


# ----------------------------------------------------------------------------- calibration files

@pytest.mark.parametrize("fault, needle", [("truncated", "cannot read calibration file"), ("nan", "NaN")])
def test_damaged_calibration_file(capsys, tmp_path, model_args, fault, needle):
    from dfqvit.calib.cache import IMAGES_KEY

    path = tmp_path / "calib.safetensors"
    images = torch.randn(4, 1, 28, 28)
    if fault == "nan":
        images[1, 0, 3, 3] = float("nan")
    save_file({IMAGES_KEY: images}, str(path))
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    fails_with(capsys, ["quantize", *model_args, "--calib-file", path, "--acm", "off", "--no-eval",
                        "--out", tmp_path / "q"], needle)
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- saved models

def _tamper(saved_dir, tmp_path, fault: str):
    d = tmp_path / "tampered"
    shutil.copytree(saved_dir, d)
    cfg = d / "quantization_config.json"
    meta = json.loads(cfg.read_text())
    if fault == "format-version-string":
        meta["format_version"] = "2"
    elif fault in ("no-model", "no-quantization"):
        del meta[fault.removeprefix("no-")]
    elif fault == "w-bits-edited":
        meta["quantization"]["w_bits"] = 8
    elif fault == "a-bits-edited":
        meta["quantization"]["a_bits"] = 6
    elif fault == "acm-not-an-object":
        meta["acm"] = "full"
    elif fault == "bad-model-section":
        meta["model"]["colour"] = "red"
    if fault == "not-json":
        cfg.write_text("{ this is not json")
    else:
        cfg.write_text(json.dumps(meta))
    weights = d / "model.safetensors"
    if fault == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:4000])
    elif fault == "no-weights":
        weights.unlink()
    return d


@pytest.mark.parametrize("fault, needle", [
    ("format-version-string", "format_version must be an integer"),
    ("no-model", "no 'model' section"), ("no-quantization", "no 'quantization' section"),
    ("bad-model-section", "bad 'model' or 'quantization' section"),
    ("w-bits-edited", "does not match the weights"), ("a-bits-edited", "differs in: a_bits"),
    ("acm-not-an-object", "'acm' must be an object"), ("not-json", "not valid JSON"),
    ("truncated-weights", "truncated or damaged"), ("no-weights", "is missing"),
])
def test_tampered_quantized_directory(capsys, tmp_path, saved_dir, tiny_fmnist_dir, fault, needle):
    d = _tamper(saved_dir, tmp_path, fault)
    fails_with(capsys, ["eval", "--quantized", d, "--data-dir", tiny_fmnist_dir], needle)
    fails_with(capsys, ["export", d, "--out", tmp_path / "m.onnx"], needle)
    assert not (tmp_path / "m.onnx").exists()


def test_untampered_saved_model_reloads_and_exports_next_to_itself(capsys, tmp_path, saved_dir, tiny_fmnist_dir):
    d = tmp_path / "copy"
    shutil.copytree(saved_dir, d)
    assert main(["eval", "--quantized", str(d), "--data-dir", str(tiny_fmnist_dir)]) == 0
    assert main(["export", str(d), "--no-check"]) == 0          # --out defaults to DIR/model.onnx
    assert (d / "model.onnx").is_file()


# ----------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("fault", ["file-as-out-dir", "proc", "under-a-file", "results-file-is-dir"])
def test_unwritable_outputs_are_found_before_work(capsys, tmp_path, model_args, no_expensive_work, fault):
    (tmp_path / "afile").write_text("x")
    out = {"file-as-out-dir": tmp_path / "afile", "proc": "/proc/dfqvit-test/out",
           "under-a-file": tmp_path / "afile" / "q", "results-file-is-dir": tmp_path / "q"}[fault]
    extra = ["--results-file", tmp_path] if fault == "results-file-is-dir" else ["--force"]
    fails_with(capsys, ["quantize", *model_args, *QUICK, "--out", out, *extra])
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "q").exists()


def test_saved_files_have_the_same_permissions(saved_dir):
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved_dir.iterdir()}
    assert len(set(modes.values())) == 1, modes


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv, needle", [
    (["quantize", "--first-last-bits", "x"], "expected a bit-width"),
    (["quantize", "--synth-opts", "iterations"], "bad --synth-opts item 'iterations'"),
    (["eval", "-b", "0"], "--batch-size"),
    (["synth", "--calib", "real", "--out", "x.safetensors"], "invalid choice: 'real'"),
    (["quantize", "--calib-size", "100000000", "--no-eval"], "needs about"),
    (["synth", "--calib-size", "100000000", "--out", "{tmp}/x.safetensors"], "needs about"),
    (["quantize", "--w-bits", "5", "--a-bits", "7", "--preset", "nope"], "invalid choice: 'nope'"),
])
def test_bad_options_are_one_line(capsys, tmp_path, no_expensive_work, argv, needle):
    fails_with(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], needle)


def test_float_activations_get_no_correction(capsys, tmp_path, model_args):
    results = tmp_path / "r.json"
    assert main(["quantize", *model_args, "--calib", "noise", "--calib-size", "4", "--w-bits", "16",
                 "--a-bits", "16", "--no-eval", "--results-file", str(results)]) == 0
    assert json.loads(results.read_text())["acm"] == "off"


# ----------------------------------------------------------------------------- interrupted runs

@pytest.mark.parametrize("sig, after", [(signal.SIGINT, 0.5), (signal.SIGKILL, 0.5), (signal.SIGKILL, 3.0)])
def test_interrupted_quantize_leaves_nothing_and_reruns(tmp_path, model_args, sig, after):
    """Stopped ``after`` seconds into the synthesis (its progress bar has started)."""
    out = tmp_path / "q"
    argv = [sys.executable, "-m", "dfqvit.cli", "quantize", *model_args, "--calib", "dfq", "--calib-size", "8",
            "--synth-opts", "iterations=400", "--acm", "off", "--no-eval", "--out", str(out)]
    # A suite started as a background job (`make test &`, nohup) inherits SIGINT ignored, and so would
    # the child: give it the default disposition, so that Python's KeyboardInterrupt handler is installed.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = proc.stderr.read(1)          # the first byte of the first progress bar
    time.sleep(after)
    proc.send_signal(sig)
    err = (started + proc.communicate(timeout=60)[1]).decode()
    assert proc.returncode != 0 and "Traceback" not in err
    assert not out.exists()
    # the rerun (short) is not confused by whatever a SIGKILL left next to --out
    assert main(["quantize", *model_args, *QUICK, "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- determinism

def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes(tmp_path, model_args):
    for name in ("a", "b"):
        assert main(["quantize", *model_args, "--calib", "noise", "--calib-size", "8", "--acm", "diag",
                     "--no-eval", "--seed", "3", "--out", str(tmp_path / name)]) == 0
        assert main(["synth", *model_args[:-2], "--calib", "dfq", "--calib-size", "4", "--seed", "3",
                     "--synth-opts", "iterations=2", "progress=False", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert _sha(tmp_path / "a.safetensors") == _sha(tmp_path / "b.safetensors")
