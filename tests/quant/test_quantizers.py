"""Quantizer modules: the off -> observing -> calibrated life cycle, weight granularity,
float bit-widths, and state that travels with ``state_dict``."""
from __future__ import annotations

import pytest
import torch

from dfqvit.quant import primitives as P
from dfqvit.quant.quantizers import RANGE_METHODS, ActQuantizer, Log2Quantizer, WeightQuantizer


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _on_grid(out, scale, zp, qmin, qmax):
    codes = out / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax


@pytest.mark.parametrize("method", RANGE_METHODS)
def test_act_quantizer_life_cycle(method):
    q = ActQuantizer(4, method=method)
    a, b = _randn(2000, seed=1), 2 * _randn(2000, seed=2) + 1
    # off: uncalibrated -> identity, nothing recorded
    assert not q.active and not bool(q.calibrated)
    assert torch.equal(q(a), a)
    assert q._lo is None
    # observing: passes values through unchanged, records both batches
    q.observing = True
    assert torch.equal(q(a), a) and torch.equal(q(b), b)
    q.observing = False
    assert not q.active
    assert q._lo == torch.minimum(a.min(), b.min()) and q._hi == torch.maximum(a.max(), b.max())
    # calibrated: fake-quantizes on its 4-bit asymmetric grid
    q.compute_range()
    assert bool(q.calibrated) and q.active
    assert q._lo is None and q._samples == []        # statistics released
    x = torch.cat([a, b])
    out = q(x)
    assert not torch.equal(out, x)
    _on_grid(out, q.scale, q.zero_point, 0, 15)
    assert len(out.unique()) <= 16
    lo, hi = x.min(), x.max()
    full_scale = (hi - lo) / 15
    if method == "minmax":
        assert q.scale.item() == pytest.approx(full_scale.item(), rel=1e-6)
        assert q.zero_point.item() == torch.round(-lo / full_scale).item()
    else:   # percentile / MSE clip: never wider than min-max
        assert q.scale.item() <= full_scale.item() * (1 + 1e-6)
    if method == "mse":
        ref = ActQuantizer(4, method="minmax")
        ref.observing = True
        ref(x)
        ref.observing = False
        ref.compute_range()
        assert (out - x).pow(2).mean() <= (ref(x) - x).pow(2).mean()
    # disabled -> identity again, re-enabled -> quantizes
    q.enabled = False
    assert torch.equal(q(x), x)
    q.enabled = True
    assert torch.equal(q(x), out)


def test_act_quantizer_minmax_union_of_batches():
    q = ActQuantizer(4, method="minmax")
    q.observing = True
    q(torch.tensor([-1.0, 0.5, 1.0]))
    q(torch.tensor([0.0, 3.0]))
    q.observing = False
    q.compute_range()
    assert q.scale.item() == pytest.approx(4 / 15)     # range [-1, 3]
    assert q.zero_point.item() == 4                     # round(1 / (4/15)) = round(3.75)


def test_act_quantizer_never_observed_stays_off():
    q = ActQuantizer(8)
    q.compute_range()                                    # e.g. an unused branch
    assert not bool(q.calibrated)
    x = _randn(10)
    assert torch.equal(q(x), x)


def test_act_quantizer_symmetric():
    q = ActQuantizer(8, symmetric=True, method="minmax")
    q.observing = True
    q(torch.tensor([-0.5, 2.54]))
    q.observing = False
    q.compute_range()
    assert q.zero_point.item() == 0 and q.scale.item() == pytest.approx(2.54 / 127)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_log2_quantizer(method):
    probs = torch.softmax(3 * _randn(4, 2, 16, 16, seed=3), dim=-1)
    q = Log2Quantizer(4, method=method)
    assert torch.equal(q(probs), probs)
    q.observing = True
    assert torch.equal(q(probs), probs)
    q.observing = False
    q.compute_range()
    assert q.active
    delta = q.scale.item()
    top = probs.max().item()
    if method == "minmax":
        assert delta == pytest.approx(top)
    else:
        assert 0.5 * top - 1e-6 <= delta <= top + 1e-6
    out = q(probs)
    levels = torch.tensor([delta * 2 ** (-k / 2) for k in range(16)] + [0.0])
    # every output is one of the 16 log-sqrt2 levels below delta, or exactly 0
    dist = (out.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
    assert dist.max() < 1e-6
    assert (out == 0).any() and out.max() <= delta + 1e-7


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_weight_quantizer_per_channel(method):
    w = _randn(6, 20, seed=4) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 100.0])[:, None]
    q = WeightQuantizer(8, channels=6, method=method)
    assert torch.equal(q(w), w)                         # uncalibrated -> identity
    q.calibrate(w)
    assert q.active and q.scale.shape == (6,) and q.zero_point.abs().sum() == 0
    amax = w.abs().amax(dim=1)
    if method == "minmax":
        torch.testing.assert_close(q.scale, amax / 127)
    else:
        assert (q.scale <= amax / 127 * (1 + 1e-6)).all()
    out = q(w)
    for row in range(6):                                # each row on its own grid, at most half a step off
        _on_grid(out[row], q.scale[row], 0, -127, 127)
        assert (out[row] - w[row]).abs().max() <= q.scale[row] * 0.5 + 1e-6 or method == "mse"
    rel_err = ((out - w).norm(dim=1) / w.norm(dim=1))
    assert rel_err.max() < 0.02                         # small rows are not wiped out
    codes = q.int_weight(w)
    assert codes.dtype == torch.int32 and codes.abs().max() <= 127
    torch.testing.assert_close(codes.float() * q.scale[:, None], out)


def test_weight_quantizer_per_tensor_and_conv():
    w = _randn(6, 20, seed=5) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 100.0])[:, None]
    q = WeightQuantizer(8, channels=6, method="minmax", per_channel=False)
    q.calibrate(w)
    assert q.scale.shape == (1,)
    assert q.scale.item() == pytest.approx(w.abs().max().item() / 127)
    out = q(w)
    _on_grid(out, q.scale, 0, -127, 127)
    assert out[0].abs().max() == 0                       # the 0.01-row falls below one step
    # a conv weight (out, in, kh, kw): per output channel
    cw = _randn(4, 3, 2, 2, seed=6) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(4, 1, 1, 1)
    qc = WeightQuantizer(4, channels=4, method="minmax")
    qc.calibrate(cw)
    torch.testing.assert_close(qc.scale, cw.abs().amax(dim=(1, 2, 3)) / 7)
    assert qc(cw).shape == cw.shape
    for o in range(4):
        _on_grid(qc(cw)[o], qc.scale[o], 0, -7, 7)


def test_weight_quantizer_asymmetric():
    w = _randn(3, 50, seed=7) + torch.tensor([2.0, -1.0, 0.0])[:, None]
    q = WeightQuantizer(4, channels=3, symmetric=False, method="minmax")
    q.calibrate(w)
    assert q.zero_point.abs().sum() > 0
    out = q(w)
    for row in range(3):
        _on_grid(out[row], q.scale[row], q.zero_point[row], 0, 15)
    codes = q.int_weight(w)
    assert codes.min() >= 0 and codes.max() <= 15
    torch.testing.assert_close((codes.float() - q.zero_point[:, None]) * q.scale[:, None], out)


@pytest.mark.parametrize("bits", [16, 32])
def test_float_bits_are_identity(bits):
    x = _randn(100, seed=8)
    for q in (ActQuantizer(bits), Log2Quantizer(bits)):
        q.observing = True
        assert torch.equal(q(x.abs()), x.abs())
        q.observing = False
        q.compute_range()
        assert not q.active
        assert torch.equal(q(x.abs()), x.abs())
    wq = WeightQuantizer(bits, channels=10)
    w = x.reshape(10, 10)
    wq.calibrate(w)
    assert not wq.active and not bool(wq.calibrated)
    assert torch.equal(wq(w), w)


def test_state_dict_carries_scale_and_zero_point():
    x = _randn(500, seed=9) * 3 + 1
    q = ActQuantizer(6, method="mse")
    q.observing = True
    q(x)
    q.observing = False
    q.compute_range()
    state = q.state_dict()
    assert set(state) == {"calibrated", "scale", "zero_point"}
    fresh = ActQuantizer(6, method="mse")
    fresh.load_state_dict(state)
    assert fresh.active and torch.equal(fresh(x), q(x))

    w = _randn(8, 16, seed=10)
    wq = WeightQuantizer(3, channels=8)
    wq.calibrate(w)
    fresh_w = WeightQuantizer(3, channels=8)
    fresh_w.load_state_dict(wq.state_dict())
    assert set(wq.state_dict()) == {"calibrated", "scale", "zero_point"}
    assert torch.equal(fresh_w(w), wq(w))

    lq = Log2Quantizer(4)
    lq.observing = True
    lq(torch.softmax(x.reshape(20, 25), -1))
    lq.observing = False
    lq.compute_range()
    fresh_l = Log2Quantizer(4)
    fresh_l.load_state_dict(lq.state_dict())
    p = torch.softmax(x.reshape(20, 25), -1)
    assert torch.equal(fresh_l(p), lq(p))


def test_extra_repr_names_the_scheme():
    assert "bits=4" in repr(ActQuantizer(4)) and "per-tensor" in repr(ActQuantizer(4))
    assert "per-channel" in repr(WeightQuantizer(4, 3)) and "log-sqrt2" in repr(Log2Quantizer(4))
    assert P.is_float(ActQuantizer(32).bits)


@pytest.mark.parametrize("token_axis", [2, 1])
def test_token_ranges_are_each_tokens_own_per_tensor_range(token_axis):
    """With ``token_axis`` every token position gets the range a per-tensor quantizer would
    search on that token's values alone, and the scales run along that axis."""
    x = _randn(2, 3, 6, 5, seed=3) * torch.linspace(0.2, 5, 6).reshape(6, 1)   # tokens of different sizes
    if token_axis == 1:
        x = x.transpose(-2, -1)                                                 # kᵀ: (..., d, N)
    q = ActQuantizer(4, method="percentile", token_axis=token_axis)
    q.calibrate_on(x)
    assert q.scale.shape == (6,) and "per token" in repr(q)
    out = q(x)
    for n in range(6):
        own = ActQuantizer(4, method="percentile")
        token = x.select(x.ndim - token_axis, n)
        own.calibrate_on(token)
        assert torch.equal(out.select(x.ndim - token_axis, n), own(token))


def test_token_ranges_factor_out_of_the_scores_matmul():
    """q per token (rows) and kᵀ per token (columns): q̂·k̂ᵀ is an integer product rescaled by
    the outer product of the two scale vectors, which is what makes it exportable."""
    q_in, k_in = _randn(2, 7, 4, seed=4), _randn(2, 7, 4, seed=5).transpose(-2, -1)
    qq, kq = ActQuantizer(4, token_axis=2), ActQuantizer(4, token_axis=1)
    qq.calibrate_on(q_in)
    kq.calibrate_on(k_in)
    qmin, qmax = P.qrange(4, False)
    q_codes = P.quantize_int(q_in, qq.scale.reshape(7, 1), qq.zero_point.reshape(7, 1), qmin, qmax)
    k_codes = P.quantize_int(k_in, kq.scale, kq.zero_point, qmin, qmax)
    integer = (q_codes - qq.zero_point.reshape(7, 1)).double() @ (k_codes - kq.zero_point).double()
    expected = integer * qq.scale.double().reshape(7, 1) * kq.scale.double()
    assert torch.allclose(qq(q_in).double() @ kq(k_in).double(), expected, atol=1e-5)


def test_a_token_quantizer_loads_its_saved_ranges_into_a_fresh_one():
    q = ActQuantizer(4, token_axis=2)
    x = _randn(3, 9, 4, seed=6)
    q.calibrate_on(x)
    fresh = ActQuantizer(4, token_axis=2)          # built per-tensor, as load_quantized builds it
    fresh.load_state_dict(q.state_dict())
    assert fresh.scale.shape == (9,) and torch.equal(fresh(x), q(x))
