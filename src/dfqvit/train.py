"""Seeded, resumable training of the bundled zoo models (CPU or GPU).

Two built-in datasets: Fashion-MNIST (the whole train split in memory, augmented per batch by
random translation and horizontal flip) and ``fashion-scenes`` (train scenes rendered afresh
every epoch, so the placement is the augmentation). Every random draw is a function of
(seed, epoch, step), so a run stopped at any step and resumed from its checkpoint continues
exactly as if it had not stopped: long CPU runs are checkpointed every epoch and every few
minutes, and ``--resume`` picks them up.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import FASHION_MNIST, FashionMNIST
from .errors import UserError
from .fileio import atomic_path
from .models import ModelSpec, build_model, count_params, resolve_data_config
from .scenes import FASHION_SCENES, FashionScenes

TRAIN_DATASETS = (FASHION_MNIST, FASHION_SCENES)


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 2             # max random translation in pixels (fashion-mnist)
    hflip: float = 0.5         # flip probability (fashion-mnist; scenes flip as part of the scene)
    amp: bool = False          # bf16 autocast (fast on CPUs with AMX, and on GPUs)
    seed: int = 0
    eval_every: int = 0        # epochs between test-split checks (0: none); monitoring only, never selection
    dataset: str = FASHION_MNIST


@dataclass
class EpochLog:
    epoch: int
    train_loss: float          # mean over the epoch's batches
    test_top1: float | None    # None on epochs without a check


def _normalise(x: torch.Tensor, data_config: dict) -> torch.Tensor:
    """Images in [0, 1] (N, C', H', W') to the model's input size, channels and normalisation."""
    c, h, w = data_config["input_size"]
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
    mean = torch.tensor(data_config["mean"]).view(1, c, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, c, 1, 1)
    return ((x - mean) / std).contiguous()


def split_tensors(split: str, data_config: dict, data_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split as normalised float images in the model's input size and channels."""
    ds = FashionMNIST(split, data_dir=data_dir)
    return _normalise(torch.from_numpy(ds.images).float().div_(255).unsqueeze(1), data_config), ds.targets


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


class _FashionMNISTBatches:
    """Fashion-MNIST train batches: one in-memory tensor, shifted and flipped per batch."""

    def __init__(self, cfg: TrainConfig, data_config: dict, data_dir):
        self.cfg = cfg
        self.x, self.y = split_tensors("train", data_config, data_dir)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor, epoch: int, generator: torch.Generator):
        return augment(self.x[idx], self.cfg.shift, self.cfg.hflip, generator), self.y[idx]


class _SceneBatches:
    """fashion-scenes train batches, rendered for the epoch (epoch e's scenes are new placements)."""

    def __init__(self, cfg: TrainConfig, data_config: dict, data_dir):
        self.data_config = data_config
        self.scenes = FashionScenes("train", data_dir=data_dir, seed=cfg.seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def batch(self, idx: torch.Tensor, epoch: int, generator: torch.Generator):
        images, labels = self.scenes.render(idx.tolist(), epoch=epoch)
        return _normalise(images.float().div_(255), self.data_config), labels


def test_tensors(dataset: str, data_config: dict, data_dir=None, seed: int = 0):
    """The test split of a training dataset as normalised tensors (the fixed scenes for fashion-scenes)."""
    if dataset == FASHION_MNIST:
        return split_tensors("test", data_config, data_dir)
    scenes = FashionScenes("test", data_dir=data_dir)
    chunks = [scenes.render(range(i, min(i + 1000, len(scenes)))) for i in range(0, len(scenes), 1000)]
    x = torch.cat([_normalise(c[0].float().div_(255), data_config) for c in chunks])
    return x, torch.cat([c[1] for c in chunks])


@torch.no_grad()
def _top1(model, x: torch.Tensor, y: torch.Tensor, device: str, batch_size: int = 500) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    model.train()
    return 100.0 * correct / len(y)


def _step_generator(seed: int, epoch: int, step: int = -1) -> torch.Generator:
    """The generator of one epoch's order (step -1) or one step's augmentation."""
    return torch.Generator().manual_seed(((seed * 100_003 + epoch) * 1_000_003 + step + 1) % 2 ** 63)


def checkpoint_path(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state."""
    out = Path(out)
    return out.with_name(out.stem + ".train-state.pt")


def _identity(spec: ModelSpec, cfg: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed (the schedule and every random draw depend on it)."""
    run = {k: v for k, v in asdict(cfg).items() if k != "eval_every"}
    return {"model": spec.name, "model_kwargs": spec.kwargs, "config": run}


def train(spec: ModelSpec, cfg: TrainConfig, device: str = "cpu", data_dir=None, progress=True,
          state_path: str | Path | None = None, resume: bool = False, save_minutes: float = 10.0):
    """Train ``spec``'s model from scratch; returns (model, data_config, seconds, history).

    ``history`` holds one :class:`EpochLog` per epoch. The final model is the last epoch's:
    the test checks (``cfg.eval_every``) are for watching a long CPU run, not for picking one.
    With ``state_path`` the run saves its state there every epoch and every ``save_minutes``;
    ``resume`` continues from it (same model and settings, else a :class:`UserError`)."""
    if cfg.dataset not in TRAIN_DATASETS:
        raise UserError(f"cannot train on {cfg.dataset!r}; built-in datasets: {', '.join(TRAIN_DATASETS)}")
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    data_config = resolve_data_config(model, spec.data_config)
    batches = (_FashionMNISTBatches if cfg.dataset == FASHION_MNIST else _SceneBatches)(cfg, data_config, data_dir)
    test = test_tensors(cfg.dataset, data_config, data_dir) if cfg.eval_every else None
    steps_per_epoch = math.ceil(len(batches) / cfg.batch_size)
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
    history: list[EpochLog] = []
    first_epoch, first_step, loss_sum, seconds_before = 0, 0, 0.0, 0.0
    if resume:
        state = _load_state(state_path, _identity(spec, cfg))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        first_epoch, first_step, loss_sum = state["epoch"], state["step"], state["loss_sum"]
        seconds_before = state["seconds"]
        history = [EpochLog(**h) for h in state["history"]]
        if progress:
            tqdm.write(f"resuming {state_path} at epoch {first_epoch + 1}, step {first_step}/{steps_per_epoch}")
    model.train()
    start = time.perf_counter()
    last_save = start

    def save(epoch: int, step: int, loss: float) -> None:
        if state_path is None:
            return
        state = {"identity": json.dumps(_identity(spec, cfg), sort_keys=True), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "step": step,
                 "loss_sum": loss, "seconds": seconds_before + time.perf_counter() - start,
                 "history": [asdict(h) for h in history]}
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.amp)
    for epoch in range(first_epoch, cfg.epochs):
        order = torch.randperm(len(batches), generator=_step_generator(cfg.seed, epoch))
        begin = first_step if epoch == first_epoch else 0
        bar = tqdm(range(begin, steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   initial=begin, total=steps_per_epoch)
        running = torch.tensor(loss_sum if epoch == first_epoch else 0.0, device=device)  # no host sync per step
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            images, labels = batches.batch(idx, epoch, _step_generator(cfg.seed, epoch, step))
            with autocast:
                loss = F.cross_entropy(model(images.to(device)), labels.to(device),
                                       label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach().float()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if state_path is not None and time.perf_counter() - last_save > 60 * save_minutes \
                    and step + 1 < steps_per_epoch:
                save(epoch, step + 1, running.item())
                last_save = time.perf_counter()
        checked = test is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
        log = EpochLog(epoch + 1, round(running.item() / steps_per_epoch, 4),
                       round(_top1(model, *test, device), 2) if checked else None)
        history.append(log)
        if progress and checked:
            tqdm.write(f"epoch {log.epoch}: train loss {log.train_loss:.4f}  test top1 {log.test_top1:.2f}  "
                       f"({seconds_before + time.perf_counter() - start:.0f}s)")
        save(epoch + 1, 0, 0.0)
        last_save = time.perf_counter()
    seconds = seconds_before + time.perf_counter() - start
    return model.eval().cpu(), data_config, seconds, history


def _load_state(path, identity: dict) -> dict:
    if path is None or not Path(path).is_file():
        raise UserError(f"--resume: no training state at {path}; start without --resume")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a cut-off file fails in zipfile, pickle or torch
        raise UserError(f"--resume: cannot read {path} ({type(e).__name__}); delete it to start over") from None
    if state.get("identity") != json.dumps(identity, sort_keys=True):
        raise UserError(f"--resume: {path} was saved by a run with another model or settings "
                        f"({state.get('identity')}); use the same command, or delete it to start over")
    return state


def zoo_card(spec: ModelSpec, data_config: dict, cfg: TrainConfig, model, result, seconds: float,
             device: str, command: str, checkpoint_name: str, history: list[EpochLog] = ()) -> dict:
    """The JSON card that ships next to a zoo checkpoint."""
    return {
        "timm_name": spec.name,
        "model_kwargs": spec.kwargs,
        "checkpoint": checkpoint_name,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "param_count": count_params(model),
        "dataset": cfg.dataset,
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
