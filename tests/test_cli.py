"""The ``dfqvit`` command line: eval/train smoke tests in subprocesses and the one-line error contract.

Every run uses a tiny random-init model and `tiny_fmnist_dir` (200 test / 256 train images in
Fashion-MNIST's IDX format), so a subprocess costs about its interpreter start-up.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from dfqvit.cli import main
from dfqvit.cli.output import write_results
from dfqvit.data import FASHION_MNIST, make_dataset, make_loader
from dfqvit.evaluate import evaluate
from dfqvit.models import count_params, load_model
from dfqvit.train import TrainConfig, augment, split_tensors, train

pytestmark = pytest.mark.needs_fashion_mnist

VIT = "vit_tiny_patch16_224"
VIT_KW = ["img_size=28", "patch_size=7", "in_chans=1", "num_classes=10", "embed_dim=32", "depth=2", "num_heads=2"]
SWIN = "swin_tiny_patch4_window7_224"
SWIN_KW = ["img_size=28", "patch_size=2", "in_chans=1", "num_classes=10", "embed_dim=16", "depths=(2,2)",
           "num_heads=(1,2)", "window_size=7"]
TIMM_KEYS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
             "interpolation"]


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(SWIN, img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16,
                              depths=(2, 2), num_heads=(1, 2), window_size=7)
    path = tmp_path_factory.mktemp("swin") / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _vit_kwargs():
    return dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def _read_results(path, fmt):
    if fmt == "json":
        return json.loads(path.read_text())
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    return rows[0]


def _check_row(row, fmt, model_name, params):
    assert list(row)[:len(TIMM_KEYS)] == TIMM_KEYS and "images_per_s" in row
    num = (lambda v: v) if fmt == "json" else float
    assert row["model"] == model_name
    assert 0 <= num(row["top1"]) <= num(row["top5"]) <= 100
    assert num(row["top1"]) + num(row["top1_err"]) == pytest.approx(100)
    assert num(row["top5"]) + num(row["top5_err"]) == pytest.approx(100)
    assert num(row["param_count"]) == round(params / 1e6, 3)  # timm reports millions
    assert int(num(row["img_size"])) == 28
    assert num(row["crop_pct"]) == pytest.approx(0.9)
    assert row["interpolation"] == "bicubic"
    assert num(row["images_per_s"]) > 0


# ----------------------------------------------------------------------------- eval
# A subprocess costs ~3 s of CPU (importing torch + timm), so each command runs as a real
# process once and through ``main()`` in-process otherwise.

def _cli(runner, args, run_cli, capsys):
    """Run the CLI as a subprocess or in-process; returns (exit status, stdout, stderr)."""
    args = [str(a) for a in args]
    if runner == "subprocess":
        proc = run_cli(*args)
        return proc.returncode, proc.stdout, proc.stderr
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("fmt,runner", [("json", "subprocess"), ("csv", "in-process")])
def test_eval_vit_by_flags(run_cli, capsys, tmp_path, tiny_checkpoint_session, tiny_fmnist_dir, fmt, runner):
    out = tmp_path / f"results.{fmt}"
    rc, stdout, stderr = _cli(runner, [
        "eval", "--model", VIT, "--model-kwargs", *VIT_KW, "--checkpoint", tiny_checkpoint_session.safetensors,
        "--mean", "0.286", "--std", "0.353", "--data", "fashion-mnist", "--data-dir", tiny_fmnist_dir,
        "-b", "500", "--results-file", out, "--results-format", fmt], run_cli, capsys)
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert f"{VIT}: top1" in stdout and "(200 images)" in stdout
    params = sum(p.numel() for p in tiny_checkpoint_session.model.parameters())
    row = _read_results(out, fmt)
    _check_row(row, fmt, VIT, params)
    # the CLI's number is the library's number
    model, cfg, _ = load_model(VIT, kwargs=_vit_kwargs(), checkpoint=str(tiny_checkpoint_session.safetensors),
                               data_overrides={"mean": [0.286], "std": [0.353]})
    loader = make_loader(make_dataset(FASHION_MNIST, cfg, data_dir=tiny_fmnist_dir), 500)
    expected = evaluate(model, loader, progress=False)
    assert float(row["top1"]) == round(expected.top1, 3)
    assert float(row["top5"]) == round(expected.top5, 3)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # atomic write: no temp files left


@pytest.mark.parametrize("fmt,runner", [("csv", "subprocess"), ("json", "in-process")])
def test_eval_swin_by_flags(run_cli, capsys, tmp_path, swin_checkpoint, tiny_fmnist_dir, fmt, runner):
    model, ckpt = swin_checkpoint
    out = tmp_path / f"results.{fmt}"
    rc, stdout, stderr = _cli(runner, [
        "eval", "--model", SWIN, "--model-kwargs", *SWIN_KW, "--checkpoint", ckpt, "--mean", "0.286",
        "--std", "0.353", "--data", "fashion-mnist", "--data-dir", tiny_fmnist_dir, "-b", "500",
        "--results-file", out, "--results-format", fmt], run_cli, capsys)
    assert rc == 0, stderr
    assert "(200 images)" in stdout
    _check_row(_read_results(out, fmt), fmt, SWIN, count_params(model))


def test_write_results_csv_multiple_rows(tmp_path):
    out = tmp_path / "r.csv"
    write_results(str(out), "csv", [{"model": "a", "top1": 1.0}, {"model": "b", "top1": 2.0, "extra": {"k": 1}}])
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["model"] for r in rows] == ["a", "b"] and json.loads(rows[1]["extra"]) == {"k": 1}
    write_results(None, "json", [{"x": 1}])  # no path: nothing written, no error


@pytest.mark.zoo("deit-fmnist")
def test_eval_default_zoo_model(run_cli, tmp_path, tiny_fmnist_dir):
    """Without --model the CLI evaluates zoo:deit-fmnist (runs once the zoo is trained)."""
    out = tmp_path / "r.json"
    proc = run_cli("eval", "--data", "fashion-mnist", "--data-dir", tiny_fmnist_dir, "--results-file", out)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())
    assert row["model"] == "zoo:deit-fmnist" and row["top1"] > 70  # 200 images of a >91% model


# ----------------------------------------------------------------------------- errors

ERROR_CASES = {
    "unknown-model": (["--model", "deit_tiny_patch16_22"], "deit_tiny_patch16_224"),
    "missing-dataset-dir": (["--model", VIT, "--model-kwargs", *VIT_KW, "--data", "fashion-mnist",
                             "--data-dir", "{tmp}/no-such-dir"], "apt-get install dataset-fashion-mnist"),
    "bad-kwargs-item": (["--model", VIT, "--model-kwargs", "depth"], "key=value"),
    "bad-kwargs-name": (["--model", VIT, "--model-kwargs", *VIT_KW, "bogus=1"], "bogus"),
    "unreadable-checkpoint": (["--model", VIT, "--model-kwargs", *VIT_KW, "--checkpoint", "{tmp}/garbage.safetensors"],
                              "cannot read checkpoint"),
    "mismatching-checkpoint": (["--model", VIT, "--model-kwargs", *VIT_KW[:-3], "embed_dim=48", "depth=2",
                                "num_heads=2", "--checkpoint", "{ckpt}"], "shape mismatches"),
    "wrong-mean-length": (["--model", VIT, "--model-kwargs", *VIT_KW, "--mean", "0.1", "0.2"], "--mean has 2 values"),
}


def _error_args(case, tmp_path, ckpt, data_dir):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x7f\x00garbage" * 40)
    args, expected = ERROR_CASES[case]
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    if "--data-dir" not in args:
        args += ["--data", "fashion-mnist", "--data-dir", str(data_dir)]
    return ["eval", *args], expected


# Every case in-process; the one that gets furthest (model built, checkpoint read) also as a
# real process: exit status 2 and nothing on stderr but the one line.
@pytest.mark.parametrize("case", ["mismatching-checkpoint"])
def test_error_exit_2_subprocess(run_cli, assert_one_line_error, tmp_path, tiny_checkpoint_session,
                                 tiny_fmnist_dir, case):
    args, expected = _error_args(case, tmp_path, tiny_checkpoint_session.safetensors, tiny_fmnist_dir)
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr)
    assert expected in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_exit_2_in_process(assert_one_line_error, tmp_path, tiny_checkpoint_session, tiny_fmnist_dir,
                                 capsys, case):
    args, expected = _error_args(case, tmp_path, tiny_checkpoint_session.safetensors, tiny_fmnist_dir)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert expected in err


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--eval-every", "-1"), ("--hflip", "1.5"),
                                         ("--label-smoothing", "1"), ("--warmup-epochs", "-1")])
def test_train_bad_settings(assert_one_line_error, tmp_path, tiny_fmnist_dir, capsys, flag, value):
    rc = main(["train", "--model", VIT, "--model-kwargs", *VIT_KW, "--data-dir", str(tiny_fmnist_dir),
               flag, value, "--out", str(tmp_path / "model.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert f"{flag} must be" in err
    assert list(tmp_path.iterdir()) == []


def test_train_out_must_be_safetensors(assert_one_line_error, tmp_path, tiny_fmnist_dir, capsys):
    rc = main(["train", "--model", VIT, "--model-kwargs", *VIT_KW, "--data-dir", str(tiny_fmnist_dir),
               "--out", str(tmp_path / "model.pth")])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_other_data_and_an_unresumed_state(assert_one_line_error, tmp_path, tiny_fmnist_dir, capsys):
    base = ["train", "--model", VIT, "--model-kwargs", *VIT_KW, "--data-dir", str(tiny_fmnist_dir),
            "--out", str(tmp_path / "model.safetensors")]
    assert main(base + ["--data", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "fashion-scenes" in err
    (tmp_path / "model.train-state.pt").write_bytes(b"x")
    assert main(base) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--resume" in err
    assert main(base + ["--resume"]) == 2               # a broken state: one line, nothing written
    assert_one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.train-state.pt"]


# ----------------------------------------------------------------------------- train

def test_train_smoke(run_cli, tmp_path, tiny_fmnist_dir, monkeypatch):
    """`dfqvit train` on 256 images writes a checkpoint and a zoo card that loads as zoo:NAME."""
    out = tmp_path / "tiny-fmnist.safetensors"
    proc = run_cli("train", "--model", VIT, "--model-kwargs", *VIT_KW, "--mean", "0.286", "--std", "0.353",
                   "--crop-pct", "1.0", "--data-dir", tiny_fmnist_dir, "--epochs", "2", "--seed", "3",
                   "--label-smoothing", "0", "--shift", "1", "--eval-every", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "trained" in proc.stdout and "Traceback" not in proc.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["timm_name"] == VIT and card["checkpoint"] == out.name
    assert card["model_kwargs"] == _vit_kwargs()
    assert card["training"]["seed"] == 3 and card["training"]["epochs"] == 2
    assert card["training"]["label_smoothing"] == 0 and card["training"]["shift"] == 1
    assert [h["epoch"] for h in card["training"]["history"]] == [1, 2]
    assert card["training"]["history"][-1]["test_top1"] is not None
    assert card["command"].startswith("dfqvit train --model vit_tiny_patch16_224")
    assert card["data_config"]["mean"] == [0.286] and card["data_config"]["crop_pct"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-fmnist.json", "tiny-fmnist.safetensors"]

    import dfqvit.models as models

    monkeypatch.setattr(models, "ZOO_DIR", tmp_path)
    model, cfg, spec = load_model("zoo:tiny-fmnist")
    assert count_params(model) == card["param_count"]
    assert cfg == {k: tuple(v) if isinstance(v, list) else v for k, v in card["data_config"].items()}
    loader = make_loader(make_dataset(FASHION_MNIST, cfg, data_dir=tiny_fmnist_dir), 500)
    result = evaluate(model, loader, progress=False)
    assert round(result.top1, 2) == card["top1"] and round(result.top5, 2) == card["top5"]


def _micro_dir(tmp_path, write_idx, fmnist_test_arrays, n=32):
    images, labels = fmnist_test_arrays
    for split, (xf, yf) in {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                            "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}.items():
        write_idx(tmp_path / xf, images[:n])
        write_idx(tmp_path / yf, labels[:n])
    return tmp_path


def _train_micro(data_dir, epochs=1, warmup_epochs=0.5, seed=0, eval_every=0):
    from dfqvit.models import ModelSpec

    spec = ModelSpec(VIT, kwargs=_vit_kwargs(), data_config={"mean": [0.286], "std": [0.353]})
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup_epochs, batch_size=16, seed=seed, eval_every=eval_every)
    return train(spec, cfg, data_dir=data_dir, progress=False)


def test_train_is_deterministic(tmp_path, write_idx, fmnist_test_arrays):
    data_dir = _micro_dir(tmp_path, write_idx, fmnist_test_arrays)
    a, cfg, _, history = _train_micro(data_dir)
    b, _, _, _ = _train_micro(data_dir)
    assert not a.training and cfg["input_size"] == (1, 28, 28)
    assert [h.epoch for h in history] == [1] and history[0].test_top1 is None and history[0].train_loss > 0
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_eval_every_logs_test_top1_without_changing_the_model(tmp_path, write_idx, fmnist_test_arrays):
    data_dir = _micro_dir(tmp_path, write_idx, fmnist_test_arrays)
    watched, _, _, history = _train_micro(data_dir, epochs=3, eval_every=2)
    plain, _, _, _ = _train_micro(data_dir, epochs=3)
    # checks on epoch 2 and on the last epoch; the weights are those of an unwatched run
    assert [h.test_top1 is not None for h in history] == [False, True, True]
    assert all(0 <= h.test_top1 <= 100 for h in history if h.test_top1 is not None)
    assert all(torch.equal(a, b) for a, b in zip(watched.state_dict().values(), plain.state_dict().values()))


def test_train_one_epoch_all_warmup(tmp_path, write_idx, fmnist_test_arrays):
    _train_micro(_micro_dir(tmp_path, write_idx, fmnist_test_arrays), epochs=1, warmup_epochs=1.0)


def test_augment_shape_and_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 10, 12, generator=g)
    assert augment(x, 2, 0.5, g).shape == x.shape
    assert torch.equal(augment(x, 0, 0.0, g), x)
    assert torch.equal(augment(x, 0, 1.0, g), x.flip(3))  # hflip=1: every image flipped


def test_augment_is_a_shift_with_zero_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 1 + 2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    y = augment(x, 1, 0.0, g)
    for i in range(2):  # each image is x shifted by some (dy, dx) in [-1, 1]^2, zeros at the border
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        assert any(torch.equal(y[i], padded[:, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))


def test_augment_deterministic_with_seeded_generator():
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    a = augment(x, 2, 0.5, torch.Generator().manual_seed(7))
    b = augment(x, 2, 0.5, torch.Generator().manual_seed(7))
    c = augment(x, 2, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_split_tensors(tiny_fmnist_dir, fmnist_test_arrays):
    cfg = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,)}
    x, y = split_tensors("test", cfg, data_dir=tiny_fmnist_dir)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = torch.from_numpy(fmnist_test_arrays[0][:200].astype("float32")) / 255
    torch.testing.assert_close(x[:, 0], (raw - 0.286) / 0.353)
    assert y.tolist() == fmnist_test_arrays[1][:200].tolist()
    # the same images as the eval pipeline gives at crop_pct 1.0
    ds = make_dataset(FASHION_MNIST, {**cfg, "crop_pct": 1.0, "interpolation": "bilinear"}, data_dir=tiny_fmnist_dir)
    torch.testing.assert_close(x[5], ds[5][0], atol=1e-5, rtol=0)


def test_split_tensors_resize_and_channels(tiny_fmnist_dir):
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}
    x, _ = split_tensors("test", cfg, data_dir=tiny_fmnist_dir)
    assert x.shape == (200, 3, 32, 32)
    torch.testing.assert_close(x[:, 0] * 0.2 + 0.5, x[:, 2] * 0.2 + 0.3)  # the same gray in every channel


@pytest.mark.parametrize("device, expected", [
    ("banana", "unknown device 'banana'"),
    pytest.param("cuda", "no usable CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                           reason="this machine has CUDA")),
])
def test_unavailable_device_is_refused_before_any_work(capsys, tmp_path, device, expected):
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--model", VIT, "--model-kwargs", *VIT_KW, "--device", device,
              "--out", str(tmp_path / "s.safetensors")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: " in err and expected in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
