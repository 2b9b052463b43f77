"""dfqvit.calib.objectives: the loss terms' numerics and the attention taps they read.

Checked against independent references (plain loops in float64, PSAQ-ViT's expressions,
attn·V recomputed by hand) on tiny random-init timm models; the file takes seconds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dfqvit.calib.objectives import (
    find_attention_taps, kde_differential_entropy, patch_similarity, similarity_entropy, total_variation,
    tv_target_range,
)


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


def test_kernel_sums_in_chunks_equal_the_whole_tensor_expression(monkeypatch):
    """The chunked kernel sums (values and gradients) are the one-tensor autograd expression's,
    bit for bit, however the rows are chunked; in float64 they pass gradcheck."""
    from dfqvit.calib import objectives

    def whole(grid, samples, h):
        c = 1.0 / (math.sqrt(2.0) * h)
        z = (grid.unsqueeze(-1) * c - (samples * c).unsqueeze(-2)).square()
        return torch.exp(-z.clamp_max(60.0)).sum(-1)

    g = torch.Generator().manual_seed(0)
    sims = patch_similarity(torch.randn(4 * 3, 30, 8, generator=g)).reshape(4, 3, 30, 30)
    samples = sims.flatten(-2).requires_grad_()
    grid = objectives._grid(samples.detach().amin((-2, -1), keepdim=True), samples.detach().amax((-2, -1), keepdim=True), 10)
    weights = torch.randn(4, 3, 10, generator=g)
    expected = whole(grid, samples, 0.01)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), samples)
    for chunk in (1 << 20, 10 * 900 * 5, 1):            # whole, 5 rows at a time, one row at a time
        monkeypatch.setitem(objectives._CHUNK_ELEMENTS, "cpu", chunk)
        out = objectives._kernel_sums(grid, samples, 0.01)
        (grad,) = torch.autograd.grad((out * weights).sum(), samples)
        assert torch.equal(out, expected) and torch.equal(grad, expected_grad), chunk
    assert expected_grad.abs().sum() > 0
    monkeypatch.setitem(objectives._CHUNK_ELEMENTS, "cpu", 7)
    x = torch.rand(3, 20, dtype=torch.float64, generator=g).requires_grad_()
    line = torch.linspace(-0.2, 1.2, 5, dtype=torch.float64).expand(3, 5)
    assert torch.autograd.gradcheck(lambda s: objectives._kernel_sums(line, s, 0.3), (x,))


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



# ----------------------------------------------------------------------------- attention taps

@pytest.mark.parametrize("kind,prefix", [("vit", 1), ("vit_reg", 2)])
def test_tap_is_attn_times_v_and_prefix(kind, prefix, synth_model):
    model = synth_model(kind)
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


def test_swin_taps_are_windowed(synth_model):
    taps = find_attention_taps(synth_model("swin"))
    assert len(taps) == 4 and all(t.windowed and t.prefix == 0 for t in taps)
