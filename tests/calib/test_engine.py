"""dfqvit.calib.engine: the views, the synthesizer's step and its execution (eager, CUDA
graph, torch.compile), and both sources (``psaq``, ``dfq``) run end to end through it.

Tiny random-init timm models; every synthesis run is a few dozen steps (the file takes well
under a minute on 2 CPU cores).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqvit.calib import make_source
from dfqvit.calib.base import valid_pixel_range
from dfqvit.calib.engine import SpectralBasis, Synthesizer, local_crops, roll_flip
from dfqvit.calib.objectives import find_attention_taps, total_variation
from dfqvit.calib.psaq import PSAQSynthConfig
from dfqvit.calib.sources import noise_images
from dfqvit.errors import UserError

FAST = dict(progress=False)


def _ce(model, images, targets):
    with torch.no_grad():
        return F.cross_entropy(model(images), targets).item()


# ----------------------------------------------------------------------------- views

def test_jitter_is_roll_then_flip():
    x = torch.arange(2 * 1 * 5 * 7, dtype=torch.float32).reshape(2, 1, 5, 7)
    for off, flip in [(0, False), (2, False), (-3, True), (4, True)]:
        ref = torch.roll(x, shifts=(off, off), dims=(2, 3))
        ref = torch.flip(ref, dims=(3,)) if flip else ref
        assert torch.equal(roll_flip(x, torch.tensor(off), torch.tensor(flip)), ref)


def test_local_crop_is_crop_then_interpolate():
    x = torch.randn(2, 1, 32, 32)
    params = torch.tensor([[0.5, 0.0, 0.0], [0.5, -0.5, 0.5]])  # side 16 px; centre, and left-bottom
    crops = local_crops(x, params)
    ref0 = F.interpolate(x[:1, :, 8:24, 8:24], size=(32, 32), mode="bilinear", align_corners=False)
    ref1 = F.interpolate(x[1:, :, 16:32, 0:16], size=(32, 32), mode="bilinear", align_corners=False)
    # identical except the outermost output pixels: grid_sample reads the image pixels just
    # outside the box where interpolating the cut-out crop would replicate its edge
    inner = (..., slice(1, -1), slice(1, -1))
    assert torch.allclose(crops[:1][inner], ref0[inner], atol=1e-5)
    assert torch.allclose(crops[1:][inner], ref1[inner], atol=1e-5)
    edge = x[1:, :, 15:33, 0:17]   # the box plus one pixel on the sides that exist in the image
    assert crops[1:].amin() >= edge.amin() - 1e-6 and crops[1:].amax() <= edge.amax() + 1e-6


def test_spectral_basis_round_trips_and_steps_smoothly():
    basis = SpectralBasis(32, 24, "cpu", slope=2.0)
    x = torch.randn(3, 2, 32, 24)
    z = basis.encode(x)
    assert z.shape == (3, 2, 32, 13, 2)
    assert torch.allclose(basis.decode(z), x, atol=1e-5)
    # Adam's step: every coordinate moves by the same amount. In pixels that is white noise of that
    # size; here a change of about the same size whose energy sits in the low frequencies.
    step = 0.1 * torch.sign(torch.randn(z.shape, generator=torch.Generator().manual_seed(0)))
    change = basis.decode(z + step) - x
    assert 0.08 < change.square().mean().sqrt() < 0.16
    white = 0.1 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
    assert total_variation(change) < 0.5 * total_variation(white)


# ----------------------------------------------------------------------------- the step; both sources end to end

@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_gradients_reach_images(name, vit, synth_ctx):
    src = make_source(name, **FAST)
    syn = Synthesizer(vit, src.config, synth_ctx(), name)
    x = torch.randn(4, 1, 32, 32, requires_grad=True)
    handles = [t.proj.register_forward_pre_hook(syn._hook) for t in syn.taps]
    crop = torch.tensor([[0.5, 0.0, 0.0]] * 4) if name == "dfq" else None
    try:
        loss, _, _, parts = syn._objective(x, torch.arange(4), torch.tensor(1), torch.tensor(True), crop,
                                           torch.tensor(50.0), torch.tensor(0.0))
    finally:
        for hd in handles:
            hd.remove()
    (g_ent,) = torch.autograd.grad(parts[2], x, retain_graph=True)   # the entropy term alone reaches them
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 and g_ent.abs().sum() > 0


@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_model_left_as_found(name, synth_model, synth_ctx):
    model = synth_model("vit").train()
    model.blocks[1].attn.proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    make_source(name, iterations=2, **({"rounds": 1} if name == "psaq" else {}), **FAST).generate(model, 3, synth_ctx())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert all(not t.proj._forward_pre_hooks for t in find_attention_taps(model))


@pytest.mark.parametrize("name,kw", [("psaq", dict(iterations=20, rounds=1)), ("dfq", dict(iterations=20)),
                                     ("dfq", dict(iterations=20, parameterization="pixel"))])
def test_short_run_lowers_ce(name, kw, vit, synth_ctx):
    src = make_source(name, **kw, **FAST)
    images = src.generate(vit, 12, synth_ctx())
    optimised = src.targets >= 0                     # dfq keeps some starts unoptimised (target -1)
    noise = make_source("noise").generate(vit, 12, synth_ctx()).clamp(-1, 1)
    targets = src.targets[optimised]
    assert _ce(vit, images[optimised], targets) < _ce(vit, noise[optimised], targets) - 0.3


@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_deterministic_and_seeded(name, vit, synth_ctx):
    kw = dict(iterations=4, **({"rounds": 2} if name == "psaq" else {}), **FAST)
    a = make_source(name, **kw).generate(vit, 6, synth_ctx(seed=3))
    b = make_source(name, **kw).generate(vit, 6, synth_ctx(seed=3))
    c = make_source(name, **kw).generate(vit, 6, synth_ctx(seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name,kw", [("psaq", dict(rounds=1)), ("dfq", {}), ("dfq", dict(parameterization="pixel"))])
def test_output_shape_range_and_batching(name, kw, vit, synth_ctx, synth_data_config):
    src = make_source(name, iterations=3, batch_size=2, **kw, **FAST)
    x = src.generate(vit, 5, synth_ctx())
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert not x.requires_grad
    lo, hi = valid_pixel_range(synth_data_config)
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
    assert src.targets.shape == (5,)
    assert src.stats["images"] == 5 and src.stats["batches"] == 3


@pytest.mark.parametrize("kind", ["vit", "vit_reg", "swin"])
@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_models_and_prefix_tokens(kind, name, synth_model, synth_ctx):
    model = synth_model(kind)
    extra = {"window_entropy": "pool"} if (kind == "swin" and name == "psaq") else {}
    src = make_source(name, iterations=3, **({"rounds": 1} if name == "psaq" else {}), **extra, **FAST)
    x = src.generate(model, 4, synth_ctx())
    assert x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()
    assert math.isfinite(src.stats["last_batch"]["entropy"]) and src.stats["last_batch"]["entropy"] != 0


def test_spectral_images_are_smoother_than_pixel_ones(synth_model, synth_ctx, synth_data_config):
    """Same starts, same steps: optimising 1/f-weighted coefficients adds far less roughness
    than optimising pixels (what the spectral basis is for)."""
    model = synth_model("swin")
    kw = dict(iterations=30, start_share=0.0, e2h_stages=1, **FAST)
    lo, hi = valid_pixel_range(synth_data_config)
    start = noise_images(torch.Generator().manual_seed(0), 4, (1, 32, 32), 2.0).clamp(lo, hi)   # seed 0's starts
    pixel = make_source("dfq", parameterization="pixel", **kw).generate(model, 4, synth_ctx())
    spectral = make_source("dfq", **kw).generate(model, 4, synth_ctx())   # the default
    assert total_variation(spectral - start) < 0.5 * total_variation(pixel - start)


def test_swin_uses_swin_lr(synth_model, synth_ctx):
    assert Synthesizer(synth_model("swin"), PSAQSynthConfig(), synth_ctx(), "psaq").lr == 0.25
    assert Synthesizer(synth_model("vit"), PSAQSynthConfig(), synth_ctx(), "psaq").lr == 0.20


def test_compile_traces_the_step(vit, monkeypatch, synth_ctx):
    """compile=True goes through torch.compile; the 'eager' backend checks that dynamo traces
    the step (hooks, side effects) and matches eager, without paying inductor's C++ build."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    kw = dict(iterations=3, e2h_stages=1, **FAST)
    ref = make_source("dfq", **kw).generate(vit, 4, synth_ctx())
    out = make_source("dfq", compile=True, **kw).generate(vit, 4, synth_ctx())
    torch._dynamo.reset()
    assert torch.allclose(out, ref, atol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def captures(monkeypatch):
    """A list that gets one entry per CUDA-graph capture of the synthesis step."""
    calls, capture = [], Synthesizer._capture
    monkeypatch.setattr(Synthesizer, "_capture", lambda self, *a: calls.append(1) or capture(self, *a))
    return calls


@cuda
@pytest.mark.parametrize("name,model", [("psaq", "vit"), ("dfq", "vit"), ("dfq", "swin")])
def test_cuda_graph_replays_the_eager_step(name, model, captures, synth_model, synth_ctx):
    """The captured step computes what the eager step computes (same seed, same images), and
    it is really captured: once per phase (PSAQ round / DFQ batch), not silently skipped.

    Few steps, because replays differ from eager steps in the last bits (ViT psaq, 40 steps:
    two eager runs are bitwise equal, graph vs eager 7e-6) and the tiny Swin's entropy
    objective amplifies such differences several-fold per step: two eager dfq runs that
    differ only in atomic-add order end 0.3 apart after 20 steps (H100). After 2 replays the
    graph is 1.6e-4 from eager there, while a stale per-step input (jitter, crop box,
    learning rate) would move pixels by up to lr = 0.25 per step.
    """
    net = synth_model(model).cuda()
    kw = dict(iterations=5, amp=False, **FAST)   # 3 eager warm-up steps, then 2 replays per phase
    ref = make_source(name, cuda_graph=False, **kw).generate(net, 6, synth_ctx(device="cuda"))
    assert not captures
    out = make_source(name, cuda_graph=True, **kw).generate(net, 6, synth_ctx(device="cuda"))
    assert len(captures) == (2 if name == "psaq" else 3)      # psaq: 2 rounds; dfq: 3 stages, one batch each
    other_seed = make_source(name, cuda_graph=True, **kw).generate(net, 6, synth_ctx(seed=1, device="cuda"))
    diff, scale = (out - ref).abs().mean().item(), (other_seed - ref).abs().mean().item()
    print(f"{name}/{model}: graph vs eager {diff:.2e}, other seed {scale:.2e}")
    assert diff < 1e-2 * scale


@cuda
def test_cuda_graph_with_hard_mining_stays_eager_in_mined_stages(vit, captures, synth_ctx):
    """Stages that mine against a quantized model run eagerly (with the capturable Adam)."""
    net = copy.deepcopy(vit).cuda()
    ctx = synth_ctx(device="cuda", quantize=lambda images: copy.deepcopy(net))
    src = make_source("dfq", iterations=10, **FAST)
    images = src.generate(net, 6, ctx)
    assert src.stats["mined_stages"] == [2, 3] and len(captures) == 1
    assert images.shape == (6, 1, 32, 32) and torch.isfinite(images).all()


class _HostSyncing(nn.Module):
    """A model whose forward reads a value back to the host: it cannot be graph-captured."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_classes = net, 10

    def forward(self, x):
        return self.net(x) * (1.0 + 0.0 * x.mean().item())


@cuda
def test_cuda_graph_capture_failure_says_how_to_turn_it_off(vit, synth_ctx):
    net = _HostSyncing(copy.deepcopy(vit)).cuda()
    with pytest.raises(UserError, match="cuda_graph=False"):
        make_source("psaq", iterations=5, patch_entropy=False, **FAST).generate(net, 2, synth_ctx(device="cuda"))
