"""The two reference sources: Gaussian noise (weak baseline) and real training images."""
from __future__ import annotations

import torch

from ..data import make_dataset
from ..errors import UserError
from .base import CalibrationContext, CalibrationSource, register_source


@register_source("noise")
class NoiseSource(CalibrationSource):
    """Standard Gaussian images in the normalised input space."""

    def generate(self, model, num_images, ctx: CalibrationContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(ctx.seed)
        return torch.randn((num_images, *ctx.data_config["input_size"]), generator=generator)


@register_source("real")
class RealSource(CalibrationSource):
    """``num_images`` random images of a *training* split (never the evaluation split).

    ``data`` is a built-in dataset name (its train split), or ``data_dir`` an ImageFolder
    (its ``train/`` subfolder when there is one).
    """

    def __init__(self, data: str | None = None, data_dir=None):
        self.data, self.data_dir = data, data_dir

    def generate(self, model, num_images, ctx: CalibrationContext) -> torch.Tensor:
        dataset = make_dataset(self.data, ctx.data_config, split="train", data_dir=self.data_dir)
        if num_images > len(dataset):
            raise UserError(f"--calib-size {num_images} exceeds the {len(dataset)} images available")
        generator = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(len(dataset), generator=generator)[:num_images]
        return torch.stack([dataset[int(i)][0] for i in idx])
