"""Evaluation / training / calibration data in the model's own preprocessing.

Fashion-MNIST is read from its IDX gzip files (Debian's ``dataset-fashion-mnist`` package,
``--data-dir``, ``$DFQVIT_FASHION_MNIST`` or torchvision's download as the last resort); any
other data is an ImageFolder. Preprocessing always comes from the model's timm data config.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from .errors import UserError

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_ENV = "DFQVIT_FASHION_MNIST"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise UserError(f"{path} is not an unsigned-byte IDX file")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(bytearray(f.read()), dtype=np.uint8)  # writable: torch.from_numpy warns otherwise
    except (OSError, EOFError, struct.error, zlib.error) as e:
        # a cut-off gzip stream (EOFError), a non-gzip file (BadGzipFile), a short header...
        raise UserError(f"cannot read IDX file {path} (truncated or corrupt?): {e}. "
                        "Reinstall it, e.g. `apt-get install --reinstall dataset-fashion-mnist`.") from None
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def _fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = [Path(os.environ[FASHION_MNIST_ENV])] if os.environ.get(FASHION_MNIST_ENV) else []
    return dirs + [DEBIAN_FASHION_MNIST_DIR]


def find_idx_files(split: str, data_dir) -> tuple[Path, Path] | None:
    images, labels = _IDX_FILES[split]
    for d in _fashion_mnist_dirs(data_dir):
        for root in (d, d / "FashionMNIST" / "raw"):  # torchvision's download layout too
            if (root / images).is_file() and (root / labels).is_file():
                return root / images, root / labels
    return None


def _download_fashion_mnist(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(
            f"Fashion-MNIST not found and download failed ({e}). Install it with "
            "`apt-get install dataset-fashion-mnist`, or pass --data-dir DIR holding "
            "the four *-idx?-ubyte.gz files (or set $" + FASHION_MNIST_ENV + ")."
        ) from None


class FashionMNIST(Dataset):
    """Fashion-MNIST split as PIL grayscale images, transformed by ``transform``."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "test", transform=None, data_dir=None, download: bool = False):
        if split not in _IDX_FILES:
            raise UserError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
        files = find_idx_files(split, data_dir)
        if files is None and download:
            root = Path(data_dir) if data_dir else Path.home() / ".cache" / "dfqvit" / "fashion-mnist"
            _download_fashion_mnist(root)
            files = find_idx_files(split, root)
        if files is None:
            where = ", ".join(str(d) for d in _fashion_mnist_dirs(data_dir))
            raise UserError(
                f"Fashion-MNIST {split} files not found in {where}. Install them with "
                "`apt-get install dataset-fashion-mnist`, pass --data-dir DIR holding the "
                f"*-idx?-ubyte.gz files, set ${FASHION_MNIST_ENV}, or add --download."
            )
        self.images = read_idx(files[0])
        self.targets = torch.from_numpy(read_idx(files[1]).astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        return (self.transform(img) if self.transform else img), int(self.targets[i])


class _ImageFolder(Dataset):
    """torchvision ImageFolder that converts images to the model's channel count."""

    def __init__(self, root, transform, in_chans: int):
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root))
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"cannot use {root} as an image folder: {e}") from None
        self.classes = self.folder.classes
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        path, target = self.folder.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # PIL: UnidentifiedImageError (an OSError) for a non-image, OSError for a truncated one
            raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); fix or remove it") from None
        return self.transform(img), target


def make_transform(data_config: dict, train: bool = False):
    """timm's eval (or train) transform for ``data_config``; grayscale-aware."""
    cfg = dict(data_config)
    if train:
        return create_transform(
            cfg["input_size"], is_training=True, mean=cfg["mean"], std=cfg["std"],
            interpolation=cfg["interpolation"], hflip=0.5, scale=(0.7, 1.0), ratio=(0.9, 1.1),
            color_jitter=None,
        )
    return create_transform(
        cfg["input_size"], is_training=False, mean=cfg["mean"], std=cfg["std"],
        interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
        crop_mode=cfg.get("crop_mode", "center"),
    )


def make_dataset(data: str | None, data_config: dict, split: str = "test", data_dir=None,
                 train_transform: bool = False, download: bool = False) -> Dataset:
    """``data`` is a built-in dataset name; without it ``data_dir`` is an ImageFolder."""
    from .scenes import FASHION_SCENES, FashionScenes   # scenes are built on this module's Fashion-MNIST

    transform = make_transform(data_config, train=train_transform)
    if data == FASHION_SCENES:
        ds = FashionScenes(split, transform=transform, data_dir=data_dir)
        if data_config["input_size"][0] == 1:
            ds.transform = lambda img: transform(img.convert("L"))
        return ds
    if data == FASHION_MNIST:
        ds = FashionMNIST(split, transform=transform, data_dir=data_dir, download=download)
        if data_config["input_size"][0] != 1:
            ds.transform = lambda img: transform(img.convert("RGB"))
        return ds
    if data is not None:
        raise UserError(f"unknown dataset {data!r}; built-in: {FASHION_MNIST}, {FASHION_SCENES}. "
                        "For other data pass --data-dir with an ImageFolder directory.")
    if data_dir is None:
        raise UserError(f"no data given: pass --data {FASHION_MNIST} or --data-dir DIR (an ImageFolder)")
    root = Path(data_dir)
    if (root / split).is_dir():
        root = root / split
    return _ImageFolder(root, transform, data_config["input_size"][0])


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0,
                seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, drop_last=False)
