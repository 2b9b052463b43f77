"""dfqvit.calib.synthesis: the data-free sources ``psaq`` and ``dfq`` and their numerics.

Tiny random-init timm models; every synthesis run is a few dozen steps (the file takes well
under a minute on 2 CPU cores).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dfqvit.calib import CALIBRATION_SOURCES, CalibrationContext, make_source
from dfqvit.calib.base import valid_pixel_range
from dfqvit.calib.sources import noise_images
from dfqvit.calib.synthesis import (
    DFQSource, DFQSynthConfig, PSAQSource, PSAQSynthConfig, _local_crops, _roll_flip, _Synthesizer,
    find_attention_taps, kde_differential_entropy, patch_similarity, similarity_entropy,
    total_variation, tv_target_range,
)
from dfqvit.errors import UserError

DATA_CONFIG = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}
FAST = dict(progress=False)


def _vit(**kw):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                          num_heads=2, num_classes=10, in_chans=1, **kw).eval()
    with torch.no_grad():
        m.head.weight.mul_(10)  # a random-init head is nearly flat; make CE respond to the images
    return m


def _swin():
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, embed_dim=24,
                          depths=(2, 2), num_heads=(2, 2), window_size=4, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        m.head.fc.weight.mul_(10)
    return m


MODELS = {"vit": _vit, "vit_reg": lambda: _vit(class_token=True, reg_tokens=1), "swin": _swin}


@pytest.fixture(scope="module")
def vit():
    return _vit()


def _ctx(seed=0, **kw):
    return CalibrationContext(data_config=dict(DATA_CONFIG), seed=seed, **kw)


def _ce(model, images, targets):
    with torch.no_grad():
        return F.cross_entropy(model(images), targets).item()


# ----------------------------------------------------------------------------- numerics

def _reference_entropy(values: np.ndarray, lo: float, hi: float, points: int, h: float = 0.01) -> float:
    """PSAQ-ViT's KDE differential entropy written independently: plain loops, float64."""
    xs = [lo + (hi - lo) * k / (points - 1) for k in range(points)]
    f = []
    for x in xs:
        p = 0.0
        for v in values:
            p += math.exp(-((x - v) ** 2) / (2 * h * h)) / math.sqrt(2 * math.pi * h * h)
        p = p / len(values) + 1e-4
        f.append(-p * math.log(p))
    return sum((xs[k + 1] - xs[k]) * (f[k] + f[k + 1]) / 2 for k in range(points - 1))


HAND_SIMS = np.array([[1.00, 0.95, 0.97, 0.20],
                      [0.95, 1.00, 0.96, 0.25],
                      [0.97, 0.96, 1.00, 0.22],
                      [0.20, 0.25, 0.22, 1.00]])


@pytest.mark.parametrize("points", [10, 201])
def test_kde_entropy_matches_loop_reference(points):
    values = HAND_SIMS.ravel()
    ref = _reference_entropy(values, values.min(), values.max(), points)
    sims = torch.tensor(HAND_SIMS, dtype=torch.float32)
    ours = kde_differential_entropy(sims.reshape(1, -1), points=points)
    assert ours.shape == (1,)
    assert ours.item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # the symmetric fast path gives the same number
    assert similarity_entropy(sims[None], points=points).item() == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_kde_entropy_ranges_batch_vs_row():
    a = HAND_SIMS.ravel()
    b = 0.5 * HAND_SIMS.ravel() + 0.1
    x = torch.tensor(np.stack([a, b]), dtype=torch.float32)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    batch = kde_differential_entropy(x)            # PSAQ: one range for the whole batch
    assert batch.tolist() == pytest.approx([_reference_entropy(a, lo, hi, 10), _reference_entropy(b, lo, hi, 10)],
                                           rel=1e-4, abs=1e-5)
    row = kde_differential_entropy(x, per_row_range=True)
    assert row.tolist() == pytest.approx([_reference_entropy(a, a.min(), a.max(), 10),
                                          _reference_entropy(b, b.min(), b.max(), 10)], rel=1e-4, abs=1e-5)


def test_similarity_entropy_equals_flat_kde_and_pools():
    g = torch.Generator().manual_seed(0)
    sims = patch_similarity(torch.randn(3, 8, 9, 5, generator=g).reshape(24, 9, 5)).reshape(3, 8, 9, 9)
    flat = kde_differential_entropy(sims.flatten(-2))
    assert torch.allclose(similarity_entropy(sims), flat, atol=1e-5)
    pooled = kde_differential_entropy(sims.reshape(3, 2, 4 * 81))   # 2 images x 4 windows each
    assert torch.allclose(similarity_entropy(sims, pool=4), pooled, atol=1e-5)
    assert torch.allclose(similarity_entropy(sims, per_row_range=True),
                          kde_differential_entropy(sims.flatten(-2), per_row_range=True), atol=1e-5)


def test_patch_similarity_is_cosine():
    t = torch.randn(2, 6, 4)
    ref = torch.cosine_similarity(t.unsqueeze(1), t.unsqueeze(2), dim=3)  # PSAQ-ViT's expression
    assert torch.allclose(patch_similarity(t), ref, atol=1e-6)


def test_tv_and_target_scaling():
    x = torch.zeros(1, 1, 3, 3)
    x[..., 1, 1] = 1.0
    # each of the 4 neighbour-difference maps holds one +1 and one -1
    assert total_variation(x).item() == pytest.approx(4 * 2 ** 0.5, rel=1e-6)
    imagenet_std = (0.229, 0.224, 0.225)
    assert tv_target_range((3, 224, 224), 32, imagenet_std) == pytest.approx((2500, 3000))
    lo, _ = tv_target_range((1, 32, 32), 8, (0.5,))
    assert lo == pytest.approx(2500 * math.sqrt(8 * 32 * 32 / (32 * 3 * 224 * 224)) * (sum(imagenet_std) / 3) / 0.5)


def test_jitter_is_roll_then_flip():
    x = torch.arange(2 * 1 * 5 * 7, dtype=torch.float32).reshape(2, 1, 5, 7)
    for off, flip in [(0, False), (2, False), (-3, True), (4, True)]:
        ref = torch.roll(x, shifts=(off, off), dims=(2, 3))
        ref = torch.flip(ref, dims=(3,)) if flip else ref
        assert torch.equal(_roll_flip(x, torch.tensor(off), torch.tensor(flip)), ref)


def test_local_crop_is_crop_then_interpolate():
    x = torch.randn(2, 1, 32, 32)
    params = torch.tensor([[0.5, 0.0, 0.0], [0.5, -0.5, 0.5]])  # side 16 px; centre, and left-bottom
    crops = _local_crops(x, params)
    ref0 = F.interpolate(x[:1, :, 8:24, 8:24], size=(32, 32), mode="bilinear", align_corners=False)
    ref1 = F.interpolate(x[1:, :, 16:32, 0:16], size=(32, 32), mode="bilinear", align_corners=False)
    # identical except the outermost output pixels: grid_sample reads the image pixels just
    # outside the box where interpolating the cut-out crop would replicate its edge
    inner = (..., slice(1, -1), slice(1, -1))
    assert torch.allclose(crops[:1][inner], ref0[inner], atol=1e-5)
    assert torch.allclose(crops[1:][inner], ref1[inner], atol=1e-5)
    edge = x[1:, :, 15:33, 0:17]   # the box plus one pixel on the sides that exist in the image
    assert crops[1:].amin() >= edge.amin() - 1e-6 and crops[1:].amax() <= edge.amax() + 1e-6


# ----------------------------------------------------------------------------- attention taps

@pytest.mark.parametrize("kind,prefix", [("vit", 1), ("vit_reg", 2)])
def test_tap_is_attn_times_v_and_prefix(kind, prefix):
    model = MODELS[kind]()
    taps = find_attention_taps(model)
    assert len(taps) == 2 and all(t.prefix == prefix and not t.windowed for t in taps)
    attn = model.blocks[0].attn
    seen = []
    h = attn.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(3, 1 + 16, 48) if prefix == 1 else torch.randn(3, 2 + 16, 48)
    with torch.no_grad():
        attn(x)
    h.remove()
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    ref = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1) @ v          # (B, heads, N, hd)
    ours = seen[0].reshape(b, n, attn.num_heads, -1)
    assert torch.allclose(ours.mean(2), ref.mean(1), atol=1e-5)          # heads averaged


def test_swin_taps_are_windowed():
    taps = find_attention_taps(_swin())
    assert len(taps) == 4 and all(t.windowed and t.prefix == 0 for t in taps)


# ----------------------------------------------------------------------------- sources

def test_registered():
    assert {"psaq", "dfq"} <= set(CALIBRATION_SOURCES)
    assert isinstance(make_source("psaq"), PSAQSource) and isinstance(make_source("dfq"), DFQSource)
    assert make_source("dfq").config == DFQSynthConfig()


@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_gradients_reach_images(name, vit):
    src = make_source(name, **FAST)
    syn = _Synthesizer(vit, src.config, _ctx(), name)
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
def test_model_left_as_found(name):
    model = _vit().train()
    model.blocks[1].attn.proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    make_source(name, iterations=2, **({"rounds": 1} if name == "psaq" else {}), **FAST).generate(model, 3, _ctx())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert all(not t.proj._forward_pre_hooks for t in find_attention_taps(model))


@pytest.mark.parametrize("name,kw", [("psaq", dict(iterations=20, rounds=1)), ("dfq", dict(iterations=20))])
def test_short_run_lowers_ce(name, kw, vit):
    src = make_source(name, **kw, **FAST)
    images = src.generate(vit, 12, _ctx())
    optimised = src.targets >= 0                     # dfq keeps some starts unoptimised (target -1)
    noise = make_source("noise").generate(vit, 12, _ctx()).clamp(-1, 1)
    targets = src.targets[optimised]
    assert _ce(vit, images[optimised], targets) < _ce(vit, noise[optimised], targets) - 0.3


@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_deterministic_and_seeded(name, vit):
    kw = dict(iterations=4, **({"rounds": 2} if name == "psaq" else {}), **FAST)
    a = make_source(name, **kw).generate(vit, 6, _ctx(seed=3))
    b = make_source(name, **kw).generate(vit, 6, _ctx(seed=3))
    c = make_source(name, **kw).generate(vit, 6, _ctx(seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_output_shape_range_and_batching(name, vit):
    src = make_source(name, iterations=3, batch_size=2, **({"rounds": 1} if name == "psaq" else {}), **FAST)
    x = src.generate(vit, 5, _ctx())
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert not x.requires_grad
    lo, hi = valid_pixel_range(DATA_CONFIG)
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()
    assert src.targets.shape == (5,)
    assert src.stats["images"] == 5 and src.stats["batches"] == 3


@pytest.mark.parametrize("kind", ["vit", "vit_reg", "swin"])
@pytest.mark.parametrize("name", ["psaq", "dfq"])
def test_models_and_prefix_tokens(kind, name):
    model = MODELS[kind]()
    extra = {"window_entropy": "pool"} if (kind == "swin" and name == "psaq") else {}
    src = make_source(name, iterations=3, **({"rounds": 1} if name == "psaq" else {}), **extra, **FAST)
    x = src.generate(model, 4, _ctx())
    assert x.shape == (4, 1, 32, 32) and torch.isfinite(x).all()
    assert math.isfinite(src.stats["last_batch"]["entropy"]) and src.stats["last_batch"]["entropy"] != 0


def test_swin_uses_swin_lr():
    assert _Synthesizer(_swin(), PSAQSynthConfig(), _ctx(), "psaq").lr == 0.25
    assert _Synthesizer(_vit(), PSAQSynthConfig(), _ctx(), "psaq").lr == 0.20


def _fake_quantize(model, bits=3):
    """A stand-in for the quantizer: weight fake-quant with a straight-through input rounding."""
    calls = []

    def quantize(images):
        calls.append(images.shape[0])
        q = copy.deepcopy(model)
        with torch.no_grad():
            for m in q.modules():
                if isinstance(m, nn.Linear):
                    s = m.weight.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
                    m.weight.copy_((m.weight / s).round() * s)
                    m.register_forward_pre_hook(lambda mod, a: (a[0] + (a[0] * 4).round().div(4).sub(a[0]).detach(),))
        return q

    quantize.calls = calls
    return quantize


def test_hard_mining_uses_quantized_model(vit):
    quantize = _fake_quantize(vit)
    src = make_source("dfq", iterations=10, start_share=0.0, **FAST)
    x = src.generate(vit, 9, _ctx(quantize=quantize))
    assert quantize.calls == [3, 6]                       # re-calibrated on all images made so far
    assert src.stats["stage_sizes"] == [3, 3, 3] and src.stats["mined_stages"] == [2, 3]
    assert src.stats["last_batch"]["kl"] > 0
    assert x.shape == (9, 1, 32, 32)
    assert all(not t.proj._forward_pre_hooks for t in find_attention_taps(vit))
    # the switch turns it off; without ctx.quantize there is nothing to mine against
    off = make_source("dfq", iterations=10, hard_mining=False, start_share=0.0, **FAST)
    off.generate(vit, 9, _ctx(quantize=quantize))
    assert off.stats["mined_stages"] == [] and quantize.calls == [3, 6]


def test_e2h_order_and_ablation_switches(vit):
    src = make_source("dfq", iterations=5, local_crops=False, patch_entropy=False, tv_prior=False,
                      e2h_stages=2, start_share=0.0, **FAST)
    x = src.generate(vit, 5, _ctx())
    assert x.shape == (5, 1, 32, 32) and src.stats["stage_sizes"] == [3, 2]
    assert src.stats["last_batch"]["entropy"] == 0 and src.stats["last_batch"]["local_ce"] == 0
    # balanced labels: classes cycle over the whole set, stage by stage
    assert sorted(src.targets.tolist()) == [0, 1, 2, 3, 4]


def test_unoptimised_starts_come_first_and_are_seen_by_mining(vit):
    quantize = _fake_quantize(vit)
    src = make_source("dfq", iterations=5, start_share=0.25, **FAST)
    x = src.generate(vit, 12, _ctx(quantize=quantize))
    assert x.shape == (12, 1, 32, 32) and src.stats["unoptimised_starts"] == 3
    assert src.stats["stage_sizes"] == [3, 3, 3] and quantize.calls == [6, 9]
    assert src.targets[:3].tolist() == [-1] * 3 and (src.targets[3:] >= 0).all()
    # the starts are exactly the first images the same seed draws when nothing is synthesized
    lo, hi = valid_pixel_range(DATA_CONFIG)
    assert torch.equal(x[:3], noise_images(torch.Generator().manual_seed(0), 3, (1, 32, 32), 2.0).clamp(lo, hi))
    # a tiny set still synthesizes one image
    one = make_source("dfq", iterations=2, start_share=0.9, **FAST)
    assert one.generate(vit, 2, _ctx()).shape[0] == 2 and one.stats["unoptimised_starts"] == 1


@pytest.mark.parametrize("name,bad", [
    ("psaq", {"iterations": 0}), ("psaq", {"rounds": 0}), ("psaq", {"lr": -1.0}), ("psaq", {"itrations": 5}),
    ("psaq", {"jitter": []}), ("psaq", {"kde_range": "global"}), ("dfq", {"iterations": 0}),
    ("dfq", {"e2h_stages": 0}), ("dfq", {"crop_scale": (0.5, 2.0)}), ("dfq", {"local_crops": "yes"}),
    ("dfq", {"unknown_field": 1}), ("dfq", {"batch_size": 1.5}), ("dfq", {"betas": (0.5,)}),
    ("dfq", {"cuda_graph": "yes"}), ("psaq", {"cuda_graph": 1}), ("dfq", {"init_slope": -1.0}),
    ("dfq", {"start_share": 1.0}), ("dfq", {"start_share": -0.1}),
])
def test_bad_config_raises_user_error(name, bad):
    with pytest.raises(UserError):
        make_source(name, **bad)


def test_config_objects_and_requests(vit):
    cfg = DFQSynthConfig(iterations=7)
    assert DFQSource(cfg, local_crops=False).config == DFQSynthConfig(iterations=7, local_crops=False)
    assert DFQSource({"iterations": 7}).config.iterations == 7
    assert PSAQSource(jitter=[1, 2]).config.jitter == (1, 2)         # JSON lists become tuples
    with pytest.raises(UserError):
        DFQSource(PSAQSynthConfig())
    with pytest.raises(UserError):
        make_source("dfq", **FAST).generate(vit, 0, _ctx())
    with pytest.raises(UserError):
        make_source("psaq", patch_entropy=True, **FAST).generate(nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)),
                                                                 2, _ctx())


def test_compile_traces_the_step(vit, monkeypatch):
    """compile=True goes through torch.compile; the 'eager' backend checks that dynamo traces
    the step (hooks, side effects) and matches eager, without paying inductor's C++ build."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    kw = dict(iterations=3, e2h_stages=1, **FAST)
    ref = make_source("dfq", **kw).generate(vit, 4, _ctx())
    out = make_source("dfq", compile=True, **kw).generate(vit, 4, _ctx())
    torch._dynamo.reset()
    assert torch.allclose(out, ref, atol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def captures(monkeypatch):
    """A list that gets one entry per CUDA-graph capture of the synthesis step."""
    calls, capture = [], _Synthesizer._capture
    monkeypatch.setattr(_Synthesizer, "_capture", lambda self, *a: calls.append(1) or capture(self, *a))
    return calls


@cuda
@pytest.mark.parametrize("name,model", [("psaq", "vit"), ("dfq", "vit"), ("dfq", "swin")])
def test_cuda_graph_replays_the_eager_step(name, model, captures):
    """The captured step computes what the eager step computes (same seed, same images), and
    it is really captured: once per phase (PSAQ round / DFQ batch), not silently skipped.

    Few steps, because replays differ from eager steps in the last bits (ViT psaq, 40 steps:
    two eager runs are bitwise equal, graph vs eager 7e-6) and the tiny Swin's entropy
    objective amplifies such differences several-fold per step: two eager dfq runs that
    differ only in atomic-add order end 0.3 apart after 20 steps (H100). After 2 replays the
    graph is 1.6e-4 from eager there, while a stale per-step input (jitter, crop box,
    learning rate) would move pixels by up to lr = 0.25 per step.
    """
    net = MODELS[model]().cuda()
    kw = dict(iterations=5, amp=False, **FAST)   # 3 eager warm-up steps, then 2 replays per phase
    ref = make_source(name, cuda_graph=False, **kw).generate(net, 6, _ctx(device="cuda"))
    assert not captures
    out = make_source(name, cuda_graph=True, **kw).generate(net, 6, _ctx(device="cuda"))
    assert len(captures) == (2 if name == "psaq" else 3)      # psaq: 2 rounds; dfq: 3 stages, one batch each
    other_seed = make_source(name, cuda_graph=True, **kw).generate(net, 6, _ctx(seed=1, device="cuda"))
    diff, scale = (out - ref).abs().mean().item(), (other_seed - ref).abs().mean().item()
    print(f"{name}/{model}: graph vs eager {diff:.2e}, other seed {scale:.2e}")
    assert diff < 1e-2 * scale


@cuda
def test_cuda_graph_with_hard_mining_stays_eager_in_mined_stages(vit, captures):
    """Stages that mine against a quantized model run eagerly (with the capturable Adam)."""
    net = copy.deepcopy(vit).cuda()
    ctx = _ctx(device="cuda", quantize=lambda images: copy.deepcopy(net))
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
def test_cuda_graph_capture_failure_says_how_to_turn_it_off(vit):
    net = _HostSyncing(copy.deepcopy(vit)).cuda()
    with pytest.raises(UserError, match="cuda_graph=False"):
        make_source("psaq", iterations=5, patch_entropy=False, **FAST).generate(net, 2, _ctx(device="cuda"))
