"""Calibration sets on disk: images (safetensors) + JSON sidecar + a PNG grid to look at."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.utils import make_grid

from ..errors import UserError
from ..fileio import atomic_path, write_text_atomic

IMAGES_KEY = "images"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def grid_path(path) -> Path:
    return Path(path).with_suffix(".png")


def denormalize(images: torch.Tensor, data_config: dict) -> torch.Tensor:
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def save_grid(images: torch.Tensor, data_config: dict, path, upscale: int = 1) -> None:
    """A PNG grid of (normalised) images, in E2H order row by row."""
    from PIL import Image

    pixels = denormalize(images.detach().cpu().float(), data_config)
    if upscale > 1:
        pixels = torch.nn.functional.interpolate(pixels, scale_factor=upscale, mode="nearest")
    grid = make_grid(pixels, nrow=min(8, len(pixels)), padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_calibration_file(path, images: torch.Tensor, data_config: dict, meta: dict) -> None:
    """Write images + sidecar (+ grid). ``meta`` holds source, config, seed, checkpoint hash, timings."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {path.name})")
    with atomic_path(path) as tmp:
        save_file({IMAGES_KEY: images.detach().cpu().float().contiguous()}, str(tmp),
                  metadata={"data_config": json.dumps(data_config, default=list)})
    write_text_atomic(sidecar_path(path), json.dumps({**meta, "data_config": data_config,
                                                      "num_images": len(images)}, indent=2, default=list) + "\n")
    upscale = max(1, 96 // max(images.shape[-2:]))
    save_grid(images, data_config, grid_path(path), upscale=upscale)


def load_calibration_file(path, data_config: dict | None = None) -> torch.Tensor:
    """Read images written by :func:`save_calibration_file`, checking they fit the model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist; create it with `dfqvit synth --out {path}`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read calibration file {path}: {e}") from None
    if IMAGES_KEY not in tensors:
        raise UserError(f"{path} holds no '{IMAGES_KEY}' tensor; is it a dfqvit calibration file?")
    images = tensors[IMAGES_KEY]
    if data_config is not None and tuple(images.shape[1:]) != tuple(data_config["input_size"]):
        raise UserError(f"calibration images in {path} are {tuple(images.shape[1:])} but the model takes "
                        f"{tuple(data_config['input_size'])}; synthesize them for this model")
    return images
