"""The two reference sources: noise (white, or smooth with a 1/f^slope spectrum) and real
training images."""
from __future__ import annotations

import torch

from ..data import make_dataset
from ..errors import UserError
from .base import CalibrationContext, CalibrationSource, register_source


def frequency_radius(height: int, width: int, device=None) -> torch.Tensor:
    """``|f|`` on the ``rfft2`` grid of a ``height x width`` image, for ``1/f^slope`` spectra; the
    lowest nonzero frequency stands in for DC so that ``1/f`` stays finite."""
    radius = torch.hypot(torch.fft.fftfreq(height, device=device)[:, None],
                         torch.fft.rfftfreq(width, device=device)[None, :])
    return radius.clamp_min(1.0 / max(height, width))


def noise_images(generator: torch.Generator, n: int, input_size, slope: float = 0.0) -> torch.Tensor:
    """Gaussian noise images in the normalised input space whose amplitude spectrum falls as
    ``1/f^slope``. ``slope = 0`` is white noise, standard normal per pixel. With ``slope > 0``
    each image is rescaled to zero mean and unit std. Natural images fall off at about
    ``1/f``–``1/f²``, so smooth noise is much closer to them than white noise is. It is dfq's
    starting point and, alone, a strong data-free baseline (docs/RESULTS.md)."""
    x = torch.randn((n, *input_size), generator=generator)
    if slope == 0:
        return x
    h, w = input_size[1:]
    x = torch.fft.irfft2(torch.fft.rfft2(x) / frequency_radius(h, w) ** slope, s=(h, w))
    x = x - x.mean((1, 2, 3), keepdim=True)
    return x / x.std((1, 2, 3), keepdim=True)


@register_source("noise")
class NoiseSource(CalibrationSource):
    """Noise images (:func:`noise_images`): white by default, smooth with ``slope`` > 0
    (CLI: ``--calib noise --synth-opts slope=2``)."""

    def __init__(self, slope: float = 0.0, **unknown):
        if unknown:
            raise UserError(f"--calib noise takes only the option slope=S (got {', '.join(unknown)})")
        if not isinstance(slope, (int, float)) or isinstance(slope, bool) or not slope >= 0:
            raise UserError(f"noise slope must be a number >= 0 (got {slope!r}); 0 is white noise, 2 is smooth")
        self.slope = float(slope)

    def generate(self, model, num_images, ctx: CalibrationContext) -> torch.Tensor:
        return noise_images(torch.Generator().manual_seed(ctx.seed), num_images,
                            ctx.data_config["input_size"], self.slope)


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
