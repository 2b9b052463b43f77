"""Quantization numerics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dfqvit.quant import primitives as P


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_qrange_and_is_float():
    assert P.qrange(8, symmetric=False) == (0, 255)
    assert P.qrange(8, symmetric=True) == (-127, 127)   # restricted: no extra negative level
    assert P.qrange(4, symmetric=False) == (0, 15)
    assert P.qrange(4, symmetric=True) == (-7, 7)
    assert P.qrange(3, symmetric=True) == (-3, 3)
    assert P.qrange(2, symmetric=True) == (-1, 1)
    assert P.is_float(None) and P.is_float(16) and P.is_float(32)
    assert not P.is_float(8) and not P.is_float(2)


def test_asymmetric_4bit_on_minus1_2():
    scale, zp = P.scale_zero_point(torch.tensor(-1.0), torch.tensor(2.0), 4, symmetric=False)
    assert scale.item() == pytest.approx(3 / 15)
    assert zp.item() == 5                       # 0 - round(-1 / 0.2)
    x = torch.tensor([-1.5, -1.0, -0.27, 0.0, 0.31, 1.0, 2.0, 2.7])
    # x / 0.2 + 5 = [-2.5, 0, 3.65, 5, 6.55, 10, 15, 18.5] -> round, clamp to [0, 15]
    codes = P.quantize_int(x, scale, zp, 0, 15)
    assert codes.tolist() == [0, 0, 4, 5, 7, 10, 15, 15]
    expected = (torch.tensor([0, 0, 4, 5, 7, 10, 15, 15]) - 5) * 0.2
    out = P.fake_quant(x, scale, zp, 0, 15)
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=0)
    assert out.dtype == x.dtype and out.shape == x.shape


def test_asymmetric_range_always_contains_zero():
    # [0.5, 2]: the grid is stretched down to 0 so that 0 is exactly representable
    scale, zp = P.scale_zero_point(torch.tensor(0.5), torch.tensor(2.0), 4, symmetric=False)
    assert scale.item() == pytest.approx(2 / 15) and zp.item() == 0
    scale, zp = P.scale_zero_point(torch.tensor(-3.0), torch.tensor(-1.0), 4, symmetric=False)
    assert scale.item() == pytest.approx(3 / 15) and zp.item() == 15
    assert P.fake_quant(torch.zeros(1), scale, zp, 0, 15).item() == 0.0


def test_symmetric_3bit():
    scale, zp = P.scale_zero_point(torch.tensor(-0.6), torch.tensor(1.5), 3, symmetric=True)
    assert scale.item() == pytest.approx(0.5)   # max(|lo|, |hi|) / 3
    assert zp.item() == 0
    x = torch.tensor([-2.0, -0.6, -0.2, 0.3, 0.8, 1.4, 3.0])
    # x / 0.5 = [-4, -1.2, -0.4, 0.6, 1.6, 2.8, 6] -> round, clamp to [-3, 3]
    assert P.quantize_int(x, scale, zp, -3, 3).tolist() == [-3, -1, 0, 1, 2, 3, 3]
    out = P.fake_quant(x, scale, zp, -3, 3)
    assert out.tolist() == [-1.5, -0.5, 0.0, 0.5, 1.0, 1.5, 1.5]


def test_scale_never_zero():
    scale, zp = P.scale_zero_point(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric=True)
    assert scale.item() > 0
    scale, zp = P.scale_zero_point(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric=False)
    assert scale.item() > 0
    assert P.fake_quant(torch.zeros(3), scale, zp, 0, 255).tolist() == [0.0, 0.0, 0.0]


def test_per_channel_axis0_uses_each_rows_scale():
    w = torch.tensor([[0.10, -0.05, 0.02, 0.07],
                      [10.0, -5.0, 2.0, 7.0]])
    lo, hi = P.minmax_range(w, channel_dim=0)
    assert lo.tolist() == pytest.approx([-0.05, -5.0]) and hi.tolist() == pytest.approx([0.10, 10.0])
    scale, zp = P.scale_zero_point(lo, hi, 4, symmetric=True)
    assert scale.tolist() == pytest.approx([0.10 / 7, 10.0 / 7])
    out = P.fake_quant(w, scale, zp, -7, 7, axis=0)
    for row in range(2):
        expected = P.fake_quant(w[row], scale[row], zp[row], -7, 7)
        assert torch.equal(out[row], expected)
        # 4-bit on a row with its own scale: error at most half a step
        assert (out[row] - w[row]).abs().max() <= scale[row] / 2 + 1e-7
    # with one (the large row's) scale for both rows, the small row would vanish entirely
    assert P.fake_quant(w[0], scale[1], zp[1], -7, 7).abs().max() == 0
    # the same along another axis: columns with their own scales
    cols = P.fake_quant(w.t().contiguous(), scale, zp, -7, 7, axis=1)
    assert torch.equal(cols, out.t())


def test_gradient_straight_through_inside_zero_outside():
    scale, zp = P.scale_zero_point(torch.tensor(-1.0), torch.tensor(2.0), 4, symmetric=False)
    x = torch.tensor([-2.0, -1.3, -0.5, 0.33, 1.9, 2.4, 5.0]).requires_grad_()
    P.fake_quant(x, scale, zp, 0, 15).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_gradient_per_channel():
    scale = torch.tensor([0.1, 1.0])
    zp = torch.zeros(2)
    w = torch.tensor([[0.05, 0.8, -0.9],      # row 0 clips beyond |0.7|
                      [0.05, 0.5, -9.0]]).requires_grad_()   # row 1 clips beyond |7|
    P.fake_quant(w, scale, zp, -7, 7, axis=0).sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("qmin, qmax", [(0, 15), (-7, 7), (0, 255), (-127, 127)])
def test_cpu_fake_quant_is_torchs_fused_kernel_bit_for_bit(qmin, qmax):
    """The CPU path's vectorised ops give torch's fused kernel's values and gradients exactly,
    rounding ties and clip edges included."""
    g = _gen(0)
    for trial in range(20):
        scale = torch.rand((), generator=g) * 0.1 + 1e-4
        zp = torch.randint(qmin, qmax + 1, (), generator=g).float()
        k = torch.randint(-300, 300, (2000,), generator=g).float()
        x = torch.cat([torch.randn(2000, generator=g) * 3, (k + 0.5) * scale, k * scale, (k + 0.5) * scale * (1 + 1e-7)])
        ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = P.fake_quant(ours, scale, zp, qmin, qmax)
        expected = torch.fake_quantize_per_tensor_affine(ref, scale, zp.int(), qmin, qmax)
        assert torch.equal(out, expected)
        weights = torch.arange(len(x), dtype=torch.float32)
        out.backward(weights)
        expected.backward(weights)
        assert torch.equal(ours.grad, ref.grad) and 0 < ours.grad.count_nonzero() < len(x)
    w = torch.randn(3, 64, 48, generator=g)
    scales, zps = torch.rand(64, generator=g) * 0.1 + 1e-3, torch.randint(qmin, qmax + 1, (64,), generator=g).float()
    for axis, tensor in ((1, w), (2, w.transpose(1, 2).contiguous())):
        ours, ref = tensor.clone().requires_grad_(), tensor.clone().requires_grad_()
        out = P.fake_quant(ours, scales, zps, qmin, qmax, axis=axis)
        expected = torch.fake_quantize_per_channel_affine(ref, scales, zps.int(), axis, qmin, qmax)
        assert torch.equal(out, expected)
        out.sum().backward()
        expected.sum().backward()
        assert torch.equal(ours.grad, ref.grad)


def test_log2_fake_quant_values():
    delta = torch.tensor(1.0)
    x = torch.tensor([1.0, 0.5, 1 / math.sqrt(2), 0.25, 0.09, 0.01, 1e-6, 0.0, 1.5])
    out = P.log2_fake_quant(x, delta, bits=3)
    # q = round(-2 log2 x): 0, 2, 1, 4, 7 (6.95), 13, 40, inf, -1 (saturates to 0)
    expected = [1.0, 0.5, 2 ** -0.5, 0.25, 2 ** -3.5, 0.0, 0.0, 0.0, 1.0]
    assert out.tolist() == pytest.approx(expected, abs=1e-7)
    assert P.log2_codes(x, delta, 3).tolist() == [0, 2, 1, 4, 7, 8, 8, 8, 0]   # 8 = 2^bits marks zero
    # more bits reach further down: at 4 bits, q=13 < 16 keeps 0.01 as 2^-6.5
    assert P.log2_fake_quant(torch.tensor([0.01]), delta, 4).item() == pytest.approx(2 ** -6.5)
    # delta scales the grid
    assert P.log2_fake_quant(torch.tensor([0.25]), torch.tensor(0.5), 3).item() == pytest.approx(0.25)


def test_log2_fake_quant_gradient_is_identity():
    x = torch.tensor([0.9, 0.3, 0.001]).requires_grad_()
    P.log2_fake_quant(x, torch.tensor(1.0), 3).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def _err(x, lo, hi, bits, symmetric, channel_dim=None):
    scale, zp = P.scale_zero_point(lo, hi, bits, symmetric)
    qmin, qmax = P.qrange(bits, symmetric)
    dims = tuple(d for d in range(x.ndim) if d != channel_dim) if channel_dim is not None else tuple(range(x.ndim))
    return (P.fake_quant(x, scale, zp, qmin, qmax, axis=channel_dim) - x).pow(2).mean(dim=dims)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_range_never_worse_than_minmax(bits, symmetric):
    x = torch.randn(4000, generator=_gen(0)) * 0.5 + 0.2
    lo, hi = P.mse_range(x, bits, symmetric)
    mlo, mhi = P.minmax_range(x)
    assert _err(x, lo, hi, bits, symmetric) <= _err(x, mlo, mhi, bits, symmetric)
    assert lo >= mlo and hi <= mhi


def test_mse_range_clips_an_outlier():
    x = torch.randn(4000, generator=_gen(1))
    x[17] = 50.0
    lo, hi = P.mse_range(x, 4, symmetric=False)
    mlo, mhi = P.minmax_range(x)
    assert hi < 0.5 * mhi                                    # clipped well below the outlier
    assert _err(x, lo, hi, 4, False) < 0.7 * _err(x, mlo, mhi, 4, False)   # measured 0.42 vs 0.79


def test_mse_range_per_channel():
    w = torch.randn(6, 2000, generator=_gen(2)) * torch.tensor([0.01, 0.1, 1, 3, 10, 100])[:, None]
    w[2, 5] = 40.0                                           # one outlier row
    lo, hi = P.mse_range(w, 4, symmetric=True, channel_dim=0)
    assert lo.shape == hi.shape == (6,)
    mlo, mhi = P.minmax_range(w, channel_dim=0)
    err, merr = _err(w, lo, hi, 4, True, 0), _err(w, mlo, mhi, 4, True, 0)
    assert (err <= merr).all()
    assert hi[2] < 0.5 * mhi[2]                              # the outlier row is clipped on its own
    assert err[2] < 0.7 * merr[2]


def test_percentile_range_is_repq_vits_search():
    x = torch.arange(100001, dtype=torch.float32)            # 0 .. 100000, uniform
    x[-1] = 1e7                                               # one outlier
    lo, hi = P.percentile_range(x, 4)
    # candidates (0.999, 0.9999, 0.99999): the best by squared error clips the outlier
    assert lo.item() == pytest.approx(P.quantile(x, 1 - 0.99999).item())
    assert hi.item() == pytest.approx(P.quantile(x, 0.99999).item())
    # one candidate: exactly that pair of quantiles (linear interpolation, like torch.quantile)
    lo, hi = P.percentile_range(x[:10001], 8, candidates=(0.99,))
    assert (lo.item(), hi.item()) == pytest.approx((100.0, 9900.0))
    # per channel: each row gets its own range
    w = torch.stack([torch.linspace(-1, 1, 1000), torch.linspace(-5, 5, 1000)])
    lo, hi = P.percentile_range(w, 4, channel_dim=0)
    assert lo.shape == hi.shape == (2,) and hi[1] > 4 * hi[0]


@pytest.mark.parametrize("shape, dim", [((1,), None), ((7,), None), ((20001,), None), ((3, 5000), 1), ((5000, 4), 0)])
def test_quantiles_match_numpys_linear_interpolation(shape, dim):
    # the tails go through topk, the middle through a sort: both must be numpy's definition
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) ** 3
    qs = (0.0, 1e-5, 1e-3, 0.3, 0.5, 0.999, 0.99999, 1.0)
    for q, got in zip(qs, P.quantiles(x, qs, dim)):
        ref = torch.as_tensor(np.quantile(x.double().numpy(), q, axis=dim))
        assert got.shape == ref.shape
        assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-6), q
        assert torch.equal(P.quantile(x, q, dim), got)


def test_quantile_of_more_values_than_torch_quantile_takes():   # torch.quantile stops at 2^24
    x = torch.rand(2 ** 24 + 10, generator=torch.Generator().manual_seed(0))
    assert P.quantile(x, 0.5).item() == pytest.approx(0.5, abs=1e-3)


def test_fractional_zero_point_matches_repq_vit_arithmetic():
    x = torch.linspace(-3, 3, 1001, requires_grad=True)
    s, z = torch.tensor([0.25]), torch.tensor([7.5])
    out = P.fake_quant_fractional(x, s, z, 0, 15)
    ref = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s     # RepQ-ViT's UniformQuantizer
    assert torch.equal(out.detach(), ref.detach())
    assert len(out.unique()) == 17                                # clamp ends between grid points
    out.sum().backward()                                          # straight-through inside the range
    inside = (x.detach() > -7.5 * 0.25) & (x.detach() < 7.5 * 0.25)
    assert torch.equal(x.grad, inside.float())


def test_log2_percentile_delta():
    probs = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    delta = P.log2_percentile_delta(probs, 4)
    assert any(delta.item() == pytest.approx(P.quantile(probs.flatten(), p).item()) for p in P.PERCENTILES)
    err = (P.log2_fake_quant(probs, delta, 4) - probs).pow(2).mean()
    for p in P.PERCENTILES:
        other = P.quantile(probs.flatten(), p)
        assert err <= (P.log2_fake_quant(probs, other, 4) - probs).pow(2).mean() + 1e-12


def test_sqnr_db():
    ref = torch.ones(100)
    assert P.sqnr_db(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-4)   # 1 / 0.01
    assert P.sqnr_db(ref, ref + 0.01) == pytest.approx(40.0, abs=1e-3)
    assert P.sqnr_db(2 * ref, 2 * ref - 0.2) == pytest.approx(20.0, abs=1e-4)
    assert P.sqnr_db(ref, ref) > 150                                     # exact: clamped, finite
    assert P.sqnr_db(ref, torch.zeros(100)) == pytest.approx(0.0, abs=1e-6)
