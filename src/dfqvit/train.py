"""Seeded training of the bundled zoo models on Fashion-MNIST (CPU or GPU).

The whole train split lives in memory as one tensor; augmentation (random translation by
up to ``shift`` pixels and horizontal flip) runs on batches, which keeps a 2-core CPU busy
with the model rather than with per-image PIL transforms.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import FashionMNIST
from .models import ModelSpec, build_model, count_params, resolve_data_config


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 2             # max random translation in pixels
    hflip: float = 0.5
    amp: bool = False          # bf16 autocast (fast on CPUs with AMX, and on GPUs)
    seed: int = 0
    eval_every: int = 0        # epochs between test-split checks (0: none); monitoring only, never selection


@dataclass
class EpochLog:
    epoch: int
    train_loss: float          # mean over the epoch's batches
    test_top1: float | None    # None on epochs without a check


def split_tensors(split: str, data_config: dict, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split as normalised float images in the model's input size and channels."""
    ds = FashionMNIST(split, data_dir=data_dir)
    x = torch.from_numpy(ds.images).float().div_(255).unsqueeze(1)
    c, h, w = data_config["input_size"]
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, c, -1, -1)
    mean = torch.tensor(data_config["mean"]).view(1, c, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, c, 1, 1)
    return ((x - mean) / std).contiguous(), ds.targets


def augment(x: torch.Tensor, shift: int, hflip: float, generator: torch.Generator) -> torch.Tensor:
    """Random translation (zero padded, per image) and horizontal flip of a batch."""
    n, _, h, w = x.shape
    if shift:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
        padded = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
        x = padded.gather(3, cols)
    if hflip:
        flip = torch.rand(n, generator=generator) < hflip
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def _top1(model, x: torch.Tensor, y: torch.Tensor, device: str, batch_size: int = 500) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    model.train()
    return 100.0 * correct / len(y)


def train(spec: ModelSpec, cfg: TrainConfig, device: str = "cpu", data_dir=None, progress=True):
    """Train ``spec``'s model from scratch; returns (model, data_config, seconds, history).

    ``history`` holds one :class:`EpochLog` per epoch. The final model is the last epoch's:
    the test checks (``cfg.eval_every``) are for watching a long CPU run, not for picking one."""
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    data_config = resolve_data_config(model, spec.data_config)
    x, y = split_tensors("train", data_config, data_dir)
    test = split_tensors("test", data_config, data_dir) if cfg.eval_every else None
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token"))
         or "relative_position_bias_table" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup)))))
    model.train()
    history: list[EpochLog] = []
    start = time.perf_counter()
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.amp)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        loss_sum = torch.zeros((), device=device)   # summed on the device: no host sync per step
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            images = augment(x[idx], cfg.shift, cfg.hflip, generator).to(device)
            with autocast:
                loss = F.cross_entropy(model(images), y[idx].to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().float()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        checked = test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        log = EpochLog(epoch + 1, round(loss_sum.item() / steps_per_epoch, 4),
                       round(_top1(model, *test, device), 2) if checked else None)
        history.append(log)
        if progress and checked:
            tqdm.write(f"epoch {log.epoch}: train loss {log.train_loss:.4f}  test top1 {log.test_top1:.2f}  "
                       f"({time.perf_counter() - start:.0f}s)")
    seconds = time.perf_counter() - start
    return model.eval().cpu(), data_config, seconds, history


def zoo_card(spec: ModelSpec, data_config: dict, cfg: TrainConfig, model, result, seconds: float,
             device: str, command: str, checkpoint_name: str, history: list[EpochLog] = ()) -> dict:
    """The JSON card that ships next to a zoo checkpoint."""
    return {
        "timm_name": spec.name,
        "model_kwargs": spec.kwargs,
        "checkpoint": checkpoint_name,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "param_count": count_params(model),
        "dataset": "fashion-mnist",
        "top1": round(result.top1, 2),
        "top5": round(result.top5, 2),
        "eval_split": f"test ({result.images} images)",
        "training": {**asdict(cfg), "device": device, "seconds": round(seconds, 1),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "history": [asdict(h) for h in history]},
        "command": command,
    }


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"
