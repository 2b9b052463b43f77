"""Resumable training: a run stopped at any step and resumed ends bit-identical to one that was not."""
from __future__ import annotations

import pytest
import torch

from dfqvit.errors import UserError
from dfqvit.models import ModelSpec
from dfqvit.train import TrainConfig, _FashionMNISTBatches, _SceneBatches, checkpoint_path, train

pytestmark = pytest.mark.needs_fashion_mnist

VIT = "vit_tiny_patch16_224"


def _spec(dataset):
    size, chans = (28, 1) if dataset == "fashion-mnist" else (64, 3)
    return ModelSpec(VIT, kwargs=dict(img_size=size, patch_size=size // 4, in_chans=chans,
                                      num_classes=10 if chans == 1 else 100, embed_dim=16, depth=1, num_heads=2),
                     data_config={"mean": [0.3] * chans, "std": [0.3] * chans, "crop_pct": 1.0})


def _cfg(dataset, epochs=2):
    return TrainConfig(epochs=epochs, batch_size=64, warmup_epochs=0.5, seed=1, eval_every=1, dataset=dataset)


def _stop_at(monkeypatch, batches_cls, call: int):
    """Make the ``call``-th training batch raise KeyboardInterrupt (as a Ctrl-C would)."""
    original, calls = batches_cls.batch, []

    def batch(self, *args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(batches_cls, "batch", batch)


@pytest.mark.parametrize("dataset, batches_cls, stop", [
    ("fashion-mnist", _FashionMNISTBatches, 3),    # mid epoch 1 (256 images: 4 steps an epoch)
    ("fashion-mnist", _FashionMNISTBatches, 5),    # first step of epoch 2
    ("fashion-scenes", _SceneBatches, 6),
])
def test_resume_after_interrupt_is_bit_identical(tmp_path, tiny_fmnist_dir, monkeypatch, dataset, batches_cls, stop):
    spec, cfg = _spec(dataset), _cfg(dataset)
    reference, _, _, ref_history = train(spec, cfg, data_dir=tiny_fmnist_dir, progress=False)
    state = checkpoint_path(tmp_path / "m.safetensors")
    with monkeypatch.context() as m:
        _stop_at(m, batches_cls, stop)
        with pytest.raises(KeyboardInterrupt):
            train(spec, cfg, data_dir=tiny_fmnist_dir, progress=False, state_path=state, save_minutes=0)
    assert state.is_file()
    resumed, _, _, history = train(spec, cfg, data_dir=tiny_fmnist_dir, progress=False, state_path=state, resume=True)
    assert history == ref_history
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in resumed.state_dict().items())


def test_resume_refuses_another_run_or_a_broken_state(tmp_path, tiny_fmnist_dir):
    spec, cfg = _spec("fashion-mnist"), _cfg("fashion-mnist", epochs=1)
    state = checkpoint_path(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="no training state"):
        train(spec, cfg, data_dir=tiny_fmnist_dir, progress=False, state_path=state, resume=True)
    train(spec, cfg, data_dir=tiny_fmnist_dir, progress=False, state_path=state)
    with pytest.raises(UserError, match="another model or settings"):
        train(spec, _cfg("fashion-mnist", epochs=2), data_dir=tiny_fmnist_dir, progress=False,
              state_path=state, resume=True)
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read"):
        train(spec, cfg, data_dir=tiny_fmnist_dir, progress=False, state_path=state, resume=True)


def test_scene_batches_are_the_epochs_scenes_normalised(tiny_fmnist_dir):
    from dfqvit.scenes import FashionScenes

    cfg = {"input_size": (3, 64, 64), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    batches = _SceneBatches(_cfg("fashion-scenes"), cfg, tiny_fmnist_dir)
    idx = torch.tensor([4, 9, 2])
    x, y = batches.batch(idx, 3, None)
    images, labels = FashionScenes("train", data_dir=tiny_fmnist_dir, seed=1).render([4, 9, 2], epoch=3)
    expected = (images.float() / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6) and torch.equal(y, labels)
