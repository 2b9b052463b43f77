"""Noise images and the noise source: white by default, smooth with a 1/f^slope spectrum."""
import pytest
import torch

from dfqvit.calib import make_source
from dfqvit.calib.base import CalibrationContext
from dfqvit.calib.sources import noise_images
from dfqvit.errors import UserError


def _radial_power(x: torch.Tensor) -> torch.Tensor:
    """Mean power of ``x``'s spectrum in 4 rings of growing frequency (DC left out)."""
    h, w = x.shape[-2:]
    radius = torch.hypot(torch.fft.fftfreq(h)[:, None], torch.fft.fftfreq(w)[None, :])
    power = torch.fft.fft2(x).abs().pow(2).mean((0, 1))
    edges = torch.linspace(0, radius.max() + 1e-6, 5)
    return torch.stack([power[(radius > lo) & (radius <= hi)].mean() for lo, hi in zip(edges, edges[1:])])


def test_noise_images_spectrum_slope():
    white = noise_images(torch.Generator().manual_seed(0), 16, (2, 32, 24))
    assert torch.equal(white, torch.randn((16, 2, 32, 24), generator=torch.Generator().manual_seed(0)))
    flat = _radial_power(white)
    assert flat.max() / flat.min() < 1.5                       # white noise: flat spectrum
    for slope in (1.0, 2.0):
        x = noise_images(torch.Generator().manual_seed(0), 16, (2, 32, 24), slope)
        assert x.shape == (16, 2, 32, 24)
        assert torch.allclose(x.mean((1, 2, 3)), torch.zeros(16), atol=1e-5)
        assert torch.allclose(x.std((1, 2, 3)), torch.ones(16), atol=1e-5)
        rings = _radial_power(x)
        assert (rings[1:] < rings[:-1]).all()                  # power falls with frequency ...
        # ... as 1/f^(2 slope): from ring 1 to ring 3 the frequency grows about 5x
        assert 4 ** (2 * slope) / 2 < rings[0] / rings[2] < 8 ** (2 * slope)


def test_noise_source_white_by_default_smooth_with_slope():
    ctx = CalibrationContext(data_config={"input_size": (1, 28, 28)}, seed=3)
    white = make_source("noise").generate(None, 8, ctx)
    assert torch.equal(white, torch.randn((8, 1, 28, 28), generator=torch.Generator().manual_seed(3)))
    smooth = make_source("noise", slope=2).generate(None, 8, ctx)
    assert torch.equal(smooth, noise_images(torch.Generator().manual_seed(3), 8, (1, 28, 28), 2.0))
    # smooth: neighbouring pixels are strongly correlated, white: not at all
    corr = lambda x: torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert corr(smooth) > 0.8 and abs(corr(white)) < 0.1


@pytest.mark.parametrize("options,message", [({"slope": -1}, "slope must be a number >= 0"),
                                             ({"slope": "x"}, "slope must be a number >= 0"),
                                             ({"iterations": 5}, "takes only the option slope")])
def test_noise_source_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        make_source("noise", **options)
