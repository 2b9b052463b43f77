"""dfqvit.evaluate: exact top-1/top-5 and fidelity (agreement, KL) on known logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfqvit.evaluate import EvalResult, evaluate

NUM_CLASSES = 10
# rank (0 = best) that the fake model gives each sample's true class
TARGET_RANKS = [0, 0, 0, 1, 4, 5, 9, 7]


def _logits_and_targets():
    """Logits with a known ranking per sample; the true class sits at TARGET_RANKS[i]."""
    g = torch.Generator().manual_seed(0)
    logits, targets = [], []
    for rank in TARGET_RANKS:
        order = torch.randperm(NUM_CLASSES, generator=g)   # order[r] = class with rank r
        row = torch.empty(NUM_CLASSES)
        row[order] = torch.linspace(3.0, -3.0, NUM_CLASSES)  # distinct, descending by rank
        logits.append(row)
        targets.append(int(order[rank]))
    return torch.stack(logits), torch.tensor(targets)


class LookupModel(torch.nn.Module):
    """Images carry their sample index in pixel [0, 0, 0]; the model returns that sample's logits."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].long()]


def _loader(targets, batch_size=3):
    """A list of (images, targets) batches, last batch smaller; images hold their index."""
    n = len(targets)
    images = torch.zeros(n, 1, 4, 4)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return [(images[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, n, batch_size)]


def test_exact_top1_top5():
    logits, targets = _logits_and_targets()
    result = evaluate(LookupModel(logits), _loader(targets), progress=False)
    assert isinstance(result, EvalResult)
    assert result.images == 8
    assert result.top1 == pytest.approx(100 * 3 / 8)  # ranks 0, 0, 0
    assert result.top5 == pytest.approx(100 * 5 / 8)  # ranks 0, 0, 0, 1, 4
    assert result.agreement is None and result.kl is None
    assert result.seconds >= 0 and (result.images_per_s > 0 or math.isnan(result.images_per_s))


@pytest.mark.parametrize("batch_size", [1, 8, 100])
def test_batching_does_not_matter(batch_size):
    logits, targets = _logits_and_targets()
    result = evaluate(LookupModel(logits), _loader(targets, batch_size), progress=False)
    assert (result.top1, result.top5) == pytest.approx((37.5, 62.5))


def test_plain_callable_model():
    logits, targets = _logits_and_targets()
    result = evaluate(lambda x: logits[x[:, 0, 0, 0].long()], _loader(targets), progress=False)
    assert result.top1 == pytest.approx(37.5)


def test_fewer_than_five_classes():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    targets = torch.tensor([2, 2, 0])
    result = evaluate(LookupModel(logits), _loader(targets), progress=False)
    assert result.top1 == pytest.approx(100 / 3)
    assert result.top5 == pytest.approx(100.0)  # top-k with k = 3 covers every class


def test_reference_is_itself():
    logits, targets = _logits_and_targets()
    model = LookupModel(logits)
    result = evaluate(model, _loader(targets), reference=model, progress=False)
    assert result.agreement == pytest.approx(100.0)
    assert result.kl == pytest.approx(0.0, abs=1e-6)


def test_reference_differs():
    logits, targets = _logits_and_targets()
    ref = logits.clone()
    # samples 1 and 6 get another top-1 in the reference; sample 2 is rescaled (same argmax)
    for i in (1, 6):
        ref[i, (logits[i].argmax() + 1) % NUM_CLASSES] = 10.0
    ref[2] = 2 * ref[2]
    result = evaluate(LookupModel(logits), _loader(targets), reference=LookupModel(ref), progress=False)
    assert result.agreement == pytest.approx(100 * 6 / 8)
    assert result.top1 == pytest.approx(37.5)  # the reference never changes the model's accuracy
    p_ref = F.softmax(ref, 1)
    expected_kl = (p_ref * (F.log_softmax(ref, 1) - F.log_softmax(logits, 1))).sum(1).mean()  # KL(ref || model)
    assert result.kl == pytest.approx(expected_kl.item(), rel=1e-5)
    assert result.kl > 0


def test_tiny_vit_module(vit_tiny):
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(5, 1, 28, 28, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(2)]
    result = evaluate(vit_tiny, loader, reference=vit_tiny, progress=False)
    assert result.images == 10 and 0 <= result.top1 <= result.top5 <= 100
    assert result.agreement == 100.0 and result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.images_per_s > 0
