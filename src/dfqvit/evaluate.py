"""Top-1 / top-5, throughput and fidelity to a reference model (agreement, KL).

Logits are collected once and scored separately, so a reference model's logits can be
computed one time and compared against many quantized variants.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import require_finite


@dataclass
class EvalResult:
    top1: float
    top5: float
    images: int
    seconds: float
    agreement: float | None = None  # % of images whose top-1 equals the reference's
    kl: float | None = None          # mean KL(reference || model), nats

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def collect_logits(model, loader, device="cpu", desc="eval", progress=True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(logits, targets, seconds spent in ``model``) over ``loader``; ``model`` is any callable."""
    logits, targets, seconds = [], [], 0.0
    for images, target in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device)
        start = time.perf_counter()
        out = model(images)
        seconds += time.perf_counter() - start
        out = torch.as_tensor(out).float().cpu()
        require_finite(out, f"the logits of {desc} on batch {len(logits) + 1}",
                       "the model overflows on these images (a damaged checkpoint or bad calibration)")
        logits.append(out)
        targets.append(torch.as_tensor(target))
    return torch.cat(logits), torch.cat(targets), seconds


def score(logits: torch.Tensor, targets: torch.Tensor, seconds: float = 0.0,
          reference_logits: torch.Tensor | None = None) -> EvalResult:
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    n = targets.numel()
    result = EvalResult(
        top1=100.0 * (topk[:, 0] == targets).sum().item() / n,
        top5=100.0 * (topk == targets[:, None]).any(dim=1).sum().item() / n,
        images=n, seconds=seconds)
    if reference_logits is not None:
        result.agreement = 100.0 * (reference_logits.argmax(1) == topk[:, 0]).sum().item() / n
        result.kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference_logits, 1),
                             log_target=True, reduction="sum").item() / n
    return result


def evaluate(model, loader, device="cpu", reference=None, desc="eval", progress=True) -> EvalResult:
    """Evaluate ``model``; ``reference`` (a model, or its logits on ``loader``) adds fidelity.
    The timed figure covers ``model`` only."""
    logits, targets, seconds = collect_logits(model, loader, device, desc, progress)
    if reference is not None and not isinstance(reference, torch.Tensor):
        reference = collect_logits(reference, loader, device, desc + " (reference)", progress)[0]
    return score(logits, targets, seconds, reference)
