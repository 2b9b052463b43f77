"""Shared fixtures and helpers for the dfqvit test suite.

Test modules use the fixtures and markers below rather than ``from conftest import ...``:
with several ``conftest.py`` files (tests/calib, tests/quant) the module named ``conftest``
in ``sys.modules`` is whichever was imported last.

Markers:
  ``@pytest.mark.needs_fashion_mnist``  skip unless Debian's dataset-fashion-mnist files exist
  ``@pytest.mark.zoo("deit-fmnist")``   skip unless src/dfqvit/zoo/deit-fmnist.safetensors exists
Helpers (also usable as plain functions): ``run_cli(*args)``, ``zoo_available(name)``,
``write_idx(path, array)``.
"""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
ZOO_DIR = REPO / "src" / "dfqvit" / "zoo"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Tiny random-init models: a forward pass on a 28x28 batch takes milliseconds.
VIT_NAME = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
SWIN_NAME = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16,
                   depths=(2, 2), num_heads=(1, 2), window_size=7)
# The same kwargs as `--model-kwargs` items (timm validate.py style).
VIT_CLI_KWARGS = ["img_size=28", "patch_size=7", "in_chans=1", "num_classes=10", "embed_dim=32",
                  "depth=2", "num_heads=2"]
SWIN_CLI_KWARGS = ["img_size=28", "patch_size=2", "in_chans=1", "num_classes=10", "embed_dim=16",
                   "depths=(2,2)", "num_heads=(1,2)", "window_size=7"]

# One intra-op thread: the tiny models gain nothing from more, and on a small machine that is
# busy (e.g. training the zoo) several OpenMP threads per process slow everything down tenfold.
# DFQVIT_TEST_THREADS overrides; subprocesses started by run_cli inherit it via OMP_NUM_THREADS.
TEST_THREADS = int(os.environ.get("DFQVIT_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

TINY_TEST_IMAGES = 200   # images in the hand-written test split of `tiny_fmnist_dir`
TINY_TRAIN_IMAGES = 256  # images in its train split


# ----------------------------------------------------------------------------- helpers

def fashion_mnist_available() -> bool:
    return all((DEBIAN_FMNIST / f).is_file() for files in FMNIST_FILES.values() for f in files)


needs_fashion_mnist = pytest.mark.needs_fashion_mnist


def zoo_available(name: str) -> bool:
    """Whether the zoo checkpoint ``src/dfqvit/zoo/<name>.safetensors`` exists (still being trained)."""
    return (ZOO_DIR / f"{name.removeprefix('zoo:')}.safetensors").is_file()


def skip_unless_zoo(name: str):
    """A skip mark for tests on zoo model ``name``; e.g. ``pytest.param(n, marks=skip_unless_zoo(n))``."""
    return pytest.mark.skipif(not zoo_available(name), reason=f"zoo checkpoint {name} not trained yet")


def run_cli(*args, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m dfqvit.cli ARGS`` in a subprocess; text mode, output captured."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dfqvit.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


def write_idx(path: Path, array: np.ndarray, compresslevel: int = 1) -> Path:
    """Write ``array`` (uint8) as a gzipped IDX file, the Fashion-MNIST/MNIST format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=compresslevel))
    return path


def assert_one_line_error(stderr: str) -> None:
    """The CLI's contract for user mistakes: one line on stderr, `dfqvit: error: ...`, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dfqvit: error:"), stderr
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------- hooks

def pytest_configure(config):
    config.addinivalue_line("markers", "needs_fashion_mnist: needs Debian's dataset-fashion-mnist files")
    config.addinivalue_line("markers", "zoo(name): needs the trained zoo checkpoint src/dfqvit/zoo/NAME.safetensors")


def pytest_collection_modifyitems(config, items):
    have_fmnist = fashion_mnist_available()
    for item in items:
        if not have_fmnist and item.get_closest_marker("needs_fashion_mnist"):
            item.add_marker(pytest.mark.skip(
                reason=f"Fashion-MNIST not in {DEBIAN_FMNIST} (apt-get install dataset-fashion-mnist)"))
        for mark in item.iter_markers("zoo"):
            name = mark.args[0]
            if not zoo_available(name):
                item.add_marker(pytest.mark.skip(reason=f"zoo checkpoint {name} not trained yet"))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def vit_tiny():
    torch.manual_seed(0)
    return timm.create_model(VIT_NAME, **VIT_KWARGS).eval()


@pytest.fixture
def swin_tiny():
    torch.manual_seed(0)
    return timm.create_model(SWIN_NAME, **SWIN_KWARGS).eval()


class TinyCheckpoint:
    """A tiny ViT and its weights saved as ``.safetensors`` and ``.pth``."""

    name = VIT_NAME
    kwargs = VIT_KWARGS
    cli_kwargs = VIT_CLI_KWARGS

    def __init__(self, model, safetensors: Path, pth: Path):
        self.model, self.safetensors, self.pth = model, safetensors, pth


@pytest.fixture
def tiny_checkpoint(tmp_path, vit_tiny) -> TinyCheckpoint:
    state = {k: v.contiguous() for k, v in vit_tiny.state_dict().items()}
    st, pth = tmp_path / "tiny.safetensors", tmp_path / "tiny.pth"
    save_file(state, str(st))
    torch.save(state, pth)
    return TinyCheckpoint(vit_tiny, st, pth)


@pytest.fixture(scope="session")
def tiny_checkpoint_session(tmp_path_factory) -> TinyCheckpoint:
    """Session-wide variant for the subprocess tests (the subprocess never mutates it)."""
    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, **VIT_KWARGS).eval()
    d = tmp_path_factory.mktemp("ckpt")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "tiny.safetensors"))
    torch.save(state, d / "tiny.pth")
    return TinyCheckpoint(model, d / "tiny.safetensors", d / "tiny.pth")


@pytest.fixture(scope="session")
def fmnist_test_arrays():
    """The real Fashion-MNIST test split (images, labels) as read by dfqvit."""
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from dfqvit.data import read_idx

    images, labels = FMNIST_FILES["test"]
    return read_idx(DEBIAN_FMNIST / images), read_idx(DEBIAN_FMNIST / labels)


@pytest.fixture(scope="session")
def tiny_fmnist_dir(tmp_path_factory, fmnist_test_arrays) -> Path:
    """A directory in Fashion-MNIST's layout with a SMALL test split (first 200 real test
    images) and train split (the next 256), so that CLI runs take seconds."""
    images, labels = fmnist_test_arrays
    d = tmp_path_factory.mktemp("tiny-fmnist")
    n, m = TINY_TEST_IMAGES, TINY_TRAIN_IMAGES
    write_idx(d / FMNIST_FILES["test"][0], images[:n])
    write_idx(d / FMNIST_FILES["test"][1], labels[:n])
    write_idx(d / FMNIST_FILES["train"][0], images[n:n + m])
    write_idx(d / FMNIST_FILES["train"][1], labels[n:n + m])
    return d


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    return run_cli


@pytest.fixture(name="write_idx")
def write_idx_fixture():
    return write_idx


@pytest.fixture(name="assert_one_line_error")
def assert_one_line_error_fixture():
    return assert_one_line_error
