"""Activation correction matrix: exact recovery, identity without quantization, error
reduction on calibration and held-out images, robustness to tiny sets, bad settings."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from dfqvit import acm as acm_module
from dfqvit.acm import (ACMConfig, ActivationCorrection, Corrected, correction_cost, correction_points,
                        fit_corrections, fit_images)
from dfqvit.calib.sources import noise_images
from dfqvit.errors import UserError
from dfqvit.quant import QuantConfig, quantize
from dfqvit.quant.primitives import sqnr_db

DEIT = ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2, num_classes=10))
SWIN = ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2),
                                             num_heads=(2, 2), window_size=4, num_classes=10))

# The ACM corrects what the quantizer leaves; measured on the uncompensated preset (the default,
# repq-comp, already folds a closed-form correction into the weights: docs/RESULTS.md).
PRESET = "repq"


def make(spec, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(spec[0], **spec[1]).eval()


def noise(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def block_outputs(model, x):
    outs = []
    hooks = [m.register_forward_hook(lambda _, __, o: outs.append(o.detach()))
             for _, m, _ in correction_points(model, "block")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def test_known_affine_distortion_is_recovered_exactly():
    fp = make(DEIT)
    distorted = copy.deepcopy(fp)
    g = torch.Generator().manual_seed(1)
    mat = torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g) / 48 ** 0.5
    shift = 0.1 * torch.randn(48, generator=g)
    distorted.blocks[1].register_forward_hook(lambda _, __, out: out @ mat.T + shift)
    x = noise(16, 2)
    fit_corrections(distorted, fp, x, ACMConfig(kind="full", ridge=1e-9), progress=False)
    acm = distorted.blocks[1].acm
    inverse = torch.linalg.inv(mat)
    assert torch.allclose(acm.weight, inverse, atol=2e-3)
    assert torch.allclose(acm.bias, -inverse @ shift, atol=2e-3)
    # the other blocks see no distortion, so their corrections stay the identity
    assert torch.allclose(distorted.blocks[0].acm.weight, torch.eye(48), atol=1e-3)
    held_out = noise(8, 3)
    with torch.no_grad():
        assert torch.allclose(distorted(held_out), fp(held_out), atol=1e-3)


def test_diagonal_distortion_recovered_by_diag():
    fp = make(DEIT)
    distorted = copy.deepcopy(fp)
    scale = torch.linspace(0.5, 2.0, 48)
    distorted.blocks[0].register_forward_hook(lambda _, __, out: out * scale + 0.2)
    fit_corrections(distorted, fp, noise(8, 4), ACMConfig(kind="diag", ridge=1e-9), progress=False)
    assert torch.allclose(distorted.blocks[0].acm.weight, 1 / scale, atol=1e-3)
    assert torch.allclose(distorted.blocks[0].acm.bias, -0.2 / scale, atol=1e-3)


@pytest.mark.parametrize("spec", [DEIT, SWIN], ids=["deit", "swin"])
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_identity_without_quantization(spec, kind):
    fp = make(spec)
    for m in fp.modules():  # the quantized attention computes q·kᵀ explicitly; compare like with like
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=32, a_bits=32, first_last_bits=None), noise(8, 0))
    fit_corrections(qmodel, fp, noise(8, 0), ACMConfig(kind=kind), progress=False)
    for m in qmodel.modules():
        if isinstance(m, ActivationCorrection):
            eye = torch.eye(m.bias.numel()) if kind == "full" else torch.ones(m.bias.numel())
            assert torch.allclose(m.weight, eye, atol=1e-5)
            assert torch.allclose(m.bias, torch.zeros_like(m.bias), atol=1e-5)


@pytest.mark.parametrize("spec", [DEIT, SWIN], ids=["deit", "swin"])
@pytest.mark.parametrize("where", ["block", "branch"])
def test_lowers_error_on_calibration_and_held_out(spec, where):
    fp = make(spec)
    calib, held_out = noise(48, 10), noise(32, 11)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=4), calib)
    plain = copy.deepcopy(qmodel)
    # held-out images from the calibration images' distribution: fit on those alone
    summary = fit_corrections(qmodel, fp, calib, ACMConfig(kind="full", where=where, noise_share=0.0), progress=False)
    assert len(summary["points"]) == (len(correction_points(fp, "block")) * (1 if where == "block" else 2))
    assert all(after < before for before, after in zip(summary["mse_before"], summary["mse_after"]))
    with torch.no_grad():
        ref = fp(held_out)
        # measured: block +1.2..+11 dB, branch +0.4..+2.9 dB on these models
        assert sqnr_db(ref, qmodel(held_out)) > sqnr_db(ref, plain(held_out)) + (0.5 if where == "block" else 0.2)
    if where == "block":  # the last block's output is closer to FP on held-out images
        err_plain = (block_outputs(plain, held_out)[-1] - block_outputs(fp, held_out)[-1]).pow(2).mean()
        err_acm = (block_outputs(qmodel, held_out)[-1] - block_outputs(fp, held_out)[-1]).pow(2).mean()
        assert err_acm < err_plain


@pytest.mark.parametrize("spec, where", [(DEIT, "branch"), (SWIN, "block")], ids=["deit-branch", "swin-block"])
def test_fp_targets_from_one_pass_match_a_pass_per_point(spec, where, monkeypatch):
    # the FP targets are gathered in one forward pass; running the FP model up to each point gives the same fit
    fp = make(spec)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=4), noise(24, 10))
    config = ACMConfig(kind="full", where=where, batch_size=10)
    fast, slow = copy.deepcopy(qmodel), copy.deepcopy(qmodel)
    fit_corrections(fast, fp, noise(24, 10), config, progress=False)
    monkeypatch.setattr(acm_module, "_outputs", lambda model, modules, images: [
        acm_module._run_until(model, m, images)["x"] for m in modules])
    fit_corrections(slow, fp, noise(24, 10), config, progress=False)
    for a, b in zip(fast.state_dict().values(), slow.state_dict().values()):
        assert torch.equal(a, b)


def test_fit_images_append_smooth_noise_inside_the_images_range():
    images = noise(8, 0).clamp(-1.0, 2.0)
    images[:, 1] *= 0.5                                     # a per-channel range
    widened = fit_images(images, 0.5, seed=3)
    assert len(widened) == 12 and torch.equal(widened[:8], images)
    extra = widened[8:]
    for c in range(3):
        assert images[:, c].min() <= extra[:, c].min() and extra[:, c].max() <= images[:, c].max()
    # smooth: neighbouring pixels are far more alike than in the white-noise images
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean() / x.std()
    assert roughness(extra) < 0.5 * roughness(images)
    assert torch.equal(fit_images(images, 0.5, seed=3), widened)
    assert not torch.equal(fit_images(images, 0.5, seed=4)[8:], extra)
    assert fit_images(images, 0.0) is images
    # not a copy of dfq's unoptimised starts, which come from the same seed
    starts = noise_images(torch.Generator().manual_seed(3), 4, (3, 32, 32), slope=2.0)
    assert not torch.allclose(extra, starts.clamp(images.amin((0, 2, 3), keepdim=True),
                                                  images.amax((0, 2, 3), keepdim=True)))


@pytest.mark.parametrize("kind, share, fitted", [("full", None, 12), ("diag", None, 8), ("full", 0.0, 8),
                                                 ("diag", 1.0, 16)])
def test_noise_share_defaults_by_kind(kind, share, fitted):
    fp = make(DEIT)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=8), noise(8, 0))
    summary = fit_corrections(qmodel, fp, noise(8, 0), ACMConfig(kind=kind, noise_share=share), progress=False)
    assert summary["fit_images"] == fitted
    assert summary["config"].noise_share == (share if share is not None else {"full": 0.5, "diag": 0.0}[kind])


def test_noise_changes_the_fit_only_through_its_images():
    """The seed draws the noise images: same seed, same map; no noise, no dependence on it."""
    fp = make(DEIT)
    calib = noise(8, 0)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=3, a_bits=8), calib)
    weights = {}
    for share, seed in ((0.5, 0), (0.5, 0), (0.5, 1), (0.0, 0), (0.0, 1)):
        q = copy.deepcopy(qmodel)
        fit_corrections(q, fp, calib, ACMConfig(kind="full", noise_share=share), progress=False, seed=seed)
        weights.setdefault((share, seed), []).append(q.blocks[0].acm.weight.clone())
    assert torch.equal(*weights[(0.5, 0)])
    assert not torch.allclose(weights[(0.5, 0)][0], weights[(0.5, 1)][0])
    assert torch.equal(weights[(0.0, 0)][0], weights[(0.0, 1)][0])
    assert not torch.allclose(weights[(0.5, 0)][0], weights[(0.0, 0)][0])


def test_fp_module_target():
    fp = make(DEIT)
    calib = noise(32, 5)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=4), calib)
    summary = fit_corrections(qmodel, fp, calib, ACMConfig(target="fp_module"), progress=False)
    assert all(a < b for b, a in zip(summary["mse_before"], summary["mse_after"]))


def test_tiny_calibration_set_is_stable():
    """One image gives fewer token rows than unknowns (17 < 49): the ridge keeps it sane."""
    fp = make(DEIT)
    one = noise(1, 6)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=8), one)
    fit_corrections(qmodel, fp, one, ACMConfig(kind="full"), progress=False)
    for m in qmodel.modules():
        if isinstance(m, ActivationCorrection):
            assert torch.isfinite(m.weight).all() and torch.isfinite(m.bias).all()
    with torch.no_grad():
        out = qmodel(noise(8, 7))
    assert torch.isfinite(out).all()
    assert sqnr_db(fp(noise(8, 7)).detach(), out) > 5


def test_cost_is_reported():
    fp = make(DEIT)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=8), noise(8, 0))
    fit_corrections(qmodel, fp, noise(8, 0), ACMConfig(kind="full"), progress=False)
    cost = correction_cost(qmodel)
    assert cost["params"] == 3 * (48 * 48 + 48)
    assert cost["flops_per_token"] == 3 * 2 * 48 * 48
    assert 0 < cost["params_pct"] < 100
    assert sum(isinstance(m, Corrected) for m in qmodel.modules()) == 3


@pytest.mark.parametrize("kwargs", [dict(kind="matrix"), dict(where="everywhere"), dict(target="real"),
                                    dict(ridge=0.0), dict(ridge=-1.0), dict(noise_share=-0.5),
                                    dict(noise_share=float("nan")),
                                    dict(noise_share=float("inf"))])
def test_bad_settings(kwargs):
    with pytest.raises(UserError):
        ACMConfig(**kwargs)


def test_model_without_blocks():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UserError, match="no transformer blocks"):
        fit_corrections(model, model, torch.randn(2, 4), ACMConfig(kind="diag"), progress=False)


@pytest.mark.parametrize("a_bits, kind, ridge", [(8, "full", 1.0), (6, "diag", 1e-2), (4, "diag", 1e-2)])
def test_auto_kind_follows_activation_bits(a_bits, kind, ridge):
    fp = make(DEIT)
    qmodel, _ = quantize(fp, QuantConfig(preset=PRESET, w_bits=4, a_bits=a_bits), noise(8, 0))
    summary = fit_corrections(qmodel, fp, noise(8, 0), ACMConfig(), progress=False)
    assert (summary["config"].kind, summary["config"].ridge) == (kind, ridge)
    assert {m.kind for m in qmodel.modules() if isinstance(m, ActivationCorrection)} == {kind}


def test_explicit_ridge_and_kind_are_kept():
    assert ACMConfig(kind="full", ridge=0.05).resolved(4) == ACMConfig(kind="full", ridge=0.05, noise_share=0.5)
    assert ACMConfig(kind="diag").resolved(8).ridge == 1e-2
    assert ACMConfig(ridge=3.0).resolved(8) == ACMConfig(kind="full", ridge=3.0, noise_share=0.5)
    assert ACMConfig(noise_share=2.0).resolved(4) == ACMConfig(kind="diag", ridge=1e-2, noise_share=2.0)


def test_auto_needs_a_quantized_model():
    fp = make(DEIT)
    with pytest.raises(UserError, match="quantize it first"):
        fit_corrections(copy.deepcopy(fp), fp, noise(4, 0), ACMConfig(), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [DEIT, SWIN], ids=["deit", "swin"])
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_quantize_and_fit_on_cuda_match_the_cpu(spec, kind):
    """Calibration and ACM fitting on a GPU give the CPU's quantized model (the same function)."""
    fp, x, held_out = make(spec), noise(16, 0), noise(8, 1)
    config = QuantConfig(preset=PRESET, w_bits=4, a_bits=8)
    outs = []
    for device in ("cpu", "cuda"):
        qmodel, _ = quantize(fp, config, x, device=device)
        fit_corrections(qmodel, copy.deepcopy(fp), x, ACMConfig(kind=kind), device=device, progress=False)
        with torch.no_grad():
            outs.append(qmodel(held_out.to(device)).cpu())
    quant_error_db = sqnr_db(fp(held_out).detach(), outs[0])
    device_error_db = sqnr_db(outs[0], outs[1])
    print(f"{spec[0]} {kind}: CPU vs FP32 {quant_error_db:.1f} dB, GPU vs CPU {device_error_db:.1f} dB")
    assert device_error_db > quant_error_db + 10   # the devices differ far less than quantization errs
