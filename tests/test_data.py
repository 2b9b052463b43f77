"""dfqvit.data: the IDX reader, Fashion-MNIST discovery, ImageFolder and the model's preprocessing."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dfqvit.data import (
    DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST, FASHION_MNIST_ENV, FashionMNIST, make_dataset, read_idx,
)
from dfqvit.errors import UserError
from dfqvit.models import resolve_data_config

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def config(channels=1, size=28, mean=0.286, std=0.353, crop_pct=1.0, interpolation="bilinear"):
    return {"input_size": (channels, size, size), "mean": (mean,) * channels, "std": (std,) * channels,
            "crop_pct": crop_pct, "interpolation": interpolation, "crop_mode": "center"}


# ----------------------------------------------------------------------------- IDX reader

@pytest.mark.needs_fashion_mnist
def test_read_idx_real_files():
    d = DEBIAN_FASHION_MNIST_DIR
    train_x = read_idx(d / "train-images-idx3-ubyte.gz")
    train_y = read_idx(d / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(d / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(d / "t10k-labels-idx1-ubyte.gz")
    assert train_x.shape == (60000, 28, 28) and train_y.shape == (60000,)
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    for a in (train_x, train_y, test_x, test_y):
        assert a.dtype == np.uint8
    assert train_y.min() == 0 and train_y.max() == 9
    assert set(np.unique(test_y)) == set(range(10))
    assert np.bincount(test_y).tolist() == [1000] * 10  # Fashion-MNIST's test split is balanced
    assert train_x.max() == 255 and train_x.min() == 0


def test_read_idx_round_trip(tmp_path, write_idx):
    arr = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", arr))
    assert out.dtype == np.uint8 and out.shape == (5, 3, 4)
    np.testing.assert_array_equal(out, arr)
    labels = np.array([0, 9, 3], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "y-idx1-ubyte.gz", labels)), labels)


def test_read_idx_uncompressed(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    p = tmp_path / "x-idx2-ubyte"
    p.write_bytes(struct.pack(">HBBII", 0, 8, 2, 2, 3) + arr.tobytes())
    np.testing.assert_array_equal(read_idx(p), arr)


def _idx_bytes(arr):
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.mark.parametrize("how", ["content", "gzip-stream", "header", "not-gzip"])
def test_read_idx_truncated_or_corrupt_is_user_error(tmp_path, how):
    raw = _idx_bytes(np.zeros((4, 5, 5), dtype=np.uint8))
    data = {
        "content": gzip.compress(raw[:-7]),            # valid gzip, too few values
        "gzip-stream": gzip.compress(raw)[:-10],        # download cut off mid-stream
        "header": gzip.compress(raw[:3]),               # not even a header
        "not-gzip": b"<html>404 not found</html>",      # an error page saved as .gz
    }[how]
    p = tmp_path / "bad-idx3-ubyte.gz"
    p.write_bytes(data)
    with pytest.raises(UserError) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_wrong_dtype_is_user_error(tmp_path):
    p = tmp_path / "float-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 0x0D, 1, 1) + b"\0\0\0\0"))  # 0x0D: float32
    with pytest.raises(UserError, match="not an unsigned-byte IDX"):
        read_idx(p)


# ----------------------------------------------------------------------------- FashionMNIST

def test_fashion_mnist_data_dir_with_symlinks(tmp_path, tiny_fmnist_dir, fmnist_test_arrays):
    for f in TEST_FILES:
        (tmp_path / f).symlink_to(tiny_fmnist_dir / f)
    ds = FashionMNIST("test", data_dir=tmp_path)
    assert len(ds) == 200
    img, label = ds[3]
    assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), fmnist_test_arrays[0][3])
    assert label == int(fmnist_test_arrays[1][3]) and isinstance(label, int)
    assert ds.targets.dtype == torch.int64
    assert len(FashionMNIST.classes) == 10


def test_fashion_mnist_torchvision_layout(tmp_path, tiny_fmnist_dir):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in TEST_FILES:
        (raw / f).symlink_to(tiny_fmnist_dir / f)
    assert len(FashionMNIST("test", data_dir=tmp_path)) == 200


def test_fashion_mnist_env_var(tmp_path, tiny_fmnist_dir, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tiny_fmnist_dir))
    assert len(FashionMNIST("test")) == 200  # the env dir wins over /usr/share/datasets
    assert len(FashionMNIST("train")) == 256


@pytest.mark.needs_fashion_mnist
def test_fashion_mnist_debian_default(monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    ds = FashionMNIST("test")
    assert len(ds) == 10000


def test_fashion_mnist_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    with pytest.raises(UserError) as e:
        FashionMNIST("test", data_dir=tmp_path)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg and "--data-dir" in msg


def test_fashion_mnist_half_present_is_missing(tmp_path, tiny_fmnist_dir):
    (tmp_path / TEST_FILES[0]).symlink_to(tiny_fmnist_dir / TEST_FILES[0])  # images, no labels
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST("test", data_dir=tmp_path)


def test_fashion_mnist_unknown_split():
    with pytest.raises(UserError, match="split"):
        FashionMNIST("validation")


# ----------------------------------------------------------------------------- make_dataset

def test_make_dataset_grayscale_normalization(tiny_fmnist_dir, fmnist_test_arrays):
    cfg = config(mean=0.286, std=0.353)
    ds = make_dataset(FASHION_MNIST, cfg, data_dir=tiny_fmnist_dir)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    raw = fmnist_test_arrays[0][0].astype(np.float32) / 255
    i, j = np.unravel_index(np.argmax(raw), raw.shape)  # a bright pixel, not the black background
    assert raw[i, j] > 0.5
    assert x[0, i, j].item() == pytest.approx((raw[i, j] - 0.286) / 0.353, abs=1e-5)
    assert x[0, 0, 0].item() == pytest.approx((raw[0, 0] - 0.286) / 0.353, abs=1e-5)
    # crop_pct 1.0 at the native size is the identity resize: the whole image is exact
    torch.testing.assert_close(x[0], (torch.from_numpy(raw) - 0.286) / 0.353, atol=1e-5, rtol=0)
    assert y == int(fmnist_test_arrays[1][0])


def test_make_dataset_uses_config_mean_std(tiny_fmnist_dir):
    a = make_dataset(FASHION_MNIST, config(mean=0.5, std=0.5), data_dir=tiny_fmnist_dir)[7][0]
    b = make_dataset(FASHION_MNIST, config(mean=0.286, std=0.353), data_dir=tiny_fmnist_dir)[7][0]
    torch.testing.assert_close(a * 0.5 + 0.5, b * 0.353 + 0.286, atol=1e-5, rtol=0)


def test_make_dataset_three_channels_from_grayscale(tiny_fmnist_dir, fmnist_test_arrays):
    cfg = {**config(channels=3), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    x, _ = make_dataset(FASHION_MNIST, cfg, data_dir=tiny_fmnist_dir)[0]
    assert x.shape == (3, 28, 28)
    raw = torch.from_numpy(fmnist_test_arrays[0][0].astype(np.float32) / 255)
    for c in range(3):  # every channel is the grayscale image, normalised with its own mean/std
        torch.testing.assert_close(x[c], (raw - cfg["mean"][c]) / cfg["std"][c], atol=1e-5, rtol=0)


def test_make_dataset_three_channel_model_config(tiny_fmnist_dir):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=3,
                              num_classes=10, embed_dim=32, depth=1, num_heads=2)
    cfg = resolve_data_config(model)
    assert cfg["input_size"] == (3, 28, 28)
    x, _ = make_dataset(FASHION_MNIST, cfg, data_dir=tiny_fmnist_dir)[0]
    assert x.shape == (3, 28, 28)


@pytest.mark.parametrize("size", [32, 20])
def test_make_dataset_input_size_override(tiny_fmnist_dir, size):
    cfg = {**config(), "input_size": (1, size, size)}
    x, _ = make_dataset(FASHION_MNIST, cfg, data_dir=tiny_fmnist_dir)[0]
    assert x.shape == (1, size, size)


def test_make_dataset_train_transform_shape(tiny_fmnist_dir):
    x, _ = make_dataset(FASHION_MNIST, config(), data_dir=tiny_fmnist_dir, split="train",
                        train_transform=True)[0]
    assert x.shape == (1, 28, 28)


def test_make_dataset_unknown_name():
    with pytest.raises(UserError, match="unknown dataset 'cifar10'"):
        make_dataset("cifar10", config())


def test_make_dataset_nothing_given():
    with pytest.raises(UserError, match="--data-dir"):
        make_dataset(None, config())


# ----------------------------------------------------------------------------- ImageFolder

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _image_folder(root, size=(10, 12)):
    for cls, color in (("cat", RED), ("dog", BLUE)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", size, color).save(root / cls / f"{i}.png")
    return root


def test_image_folder_grayscale(tmp_path):
    _image_folder(tmp_path)
    cfg = config(mean=0.5, std=0.25)
    ds = make_dataset(None, cfg, data_dir=tmp_path)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and y == 0
    gray_red = Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0)) / 255  # PIL's luma, ~0.299
    torch.testing.assert_close(x, torch.full_like(x, (gray_red - 0.5) / 0.25), atol=2e-2, rtol=0)
    x, y = ds[5]
    assert y == 1
    gray_blue = Image.new("RGB", (1, 1), BLUE).convert("L").getpixel((0, 0)) / 255
    torch.testing.assert_close(x, torch.full_like(x, (gray_blue - 0.5) / 0.25), atol=2e-2, rtol=0)


def test_image_folder_rgb_and_split_subdir(tmp_path):
    _image_folder(tmp_path / "test")
    _image_folder(tmp_path / "train")
    (tmp_path / "train" / "dog" / "extra.png").write_bytes((tmp_path / "train" / "dog" / "0.png").read_bytes())
    cfg = config(channels=3, size=16, mean=0.0, std=1.0)
    test = make_dataset(None, cfg, split="test", data_dir=tmp_path)
    train = make_dataset(None, cfg, split="train", data_dir=tmp_path)
    assert len(test) == 6 and len(train) == 7
    x, _ = test[0]
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x.mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=1e-2, rtol=0)


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(UserError):
        make_dataset(None, config(), data_dir=tmp_path / "nope")
    with pytest.raises(UserError):
        make_dataset(None, config(), data_dir=tmp_path)  # exists but holds no class folders
