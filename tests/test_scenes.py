"""fashion-scenes: deterministic 64×64 RGB scenes composed from Fashion-MNIST (100 classes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dfqvit.data import make_dataset
from dfqvit.scenes import CLASSES, COLOURS, FashionScenes, render

pytestmark = pytest.mark.needs_fashion_mnist


@pytest.fixture(scope="module")
def scenes(tiny_fmnist_dir):
    return FashionScenes("train", data_dir=tiny_fmnist_dir)


def test_a_scene_is_a_pure_function_of_split_index_seed_and_epoch(scenes):
    a, ya = scenes.render([3, 7, 11])
    b, yb = scenes.render([11, 3])          # other batch, other order: same scenes
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 64, 64)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and ya[0] == yb[1]
    later, y_later = scenes.render([3, 7, 11], epoch=1)
    assert not torch.equal(a, later)                       # a new placement each epoch ...
    assert torch.equal(ya // 10, y_later // 10)            # ... of the same garments
    other_seed = render(scenes.garments, scenes.garment_labels, [3, 7, 11], "train", seed=1)[0]
    assert not torch.equal(a, other_seed)


def test_labels_are_garment_times_ten_plus_colour(scenes):
    _, y = scenes.render(range(64))
    assert torch.equal(y // 10, torch.as_tensor(scenes.garment_labels[:64]).long())
    assert y.min() >= 0 and y.max() < 100 and len(CLASSES) == 100 and len(COLOURS) == 10
    assert len(set((y % 10).tolist())) >= 8               # colours are drawn, not fixed


def test_the_garment_is_painted_in_its_colour(scenes):
    """Inside the main garment's silhouette every pixel is its colour (up to shade and texture)."""
    from dfqvit.scenes import _PARAMS, _draw, _place

    palette = torch.tensor(list(COLOURS.values()))
    unit = palette / palette.norm(dim=1, keepdim=True)
    images, y = scenes.render(range(40))
    for i, (img, label) in enumerate(zip(images.float() / 255, y)):
        p = dict(zip(_PARAMS, torch.tensor(_draw(0, "train", 0, i, scenes.garment_labels)[0])[:, None]))
        garment = torch.from_numpy(scenes.garments[[i]]).float().div(255).unsqueeze(1)
        inside = _place(garment, p["size"], p["x"], p["y"], p["flip"])[0, 0] >= 0.5
        assert inside.sum() > 20
        pixels = img[:, inside].T
        nearest = (pixels / pixels.norm(dim=1, keepdim=True).clamp_min(1e-6) @ unit.T).argmax(1)
        assert (nearest == label % 10).float().mean() > 0.95, (i, CLASSES[label])


def test_test_split_is_fixed_and_dataset_gives_model_inputs(tiny_fmnist_dir):
    cfg = {"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0,
           "interpolation": "bilinear", "crop_mode": "center"}
    ds = make_dataset("fashion-scenes", cfg, split="test", data_dir=tiny_fmnist_dir)
    x, y = ds[5]
    assert x.shape == (3, 64, 64) and 0 <= y < 100
    image, target = FashionScenes("test", data_dir=tiny_fmnist_dir).render([5])
    # the eval transform of a 64-px scene at crop_pct 1 is exactly the normalised scene
    assert torch.allclose(x, (image[0].float() / 255 - 0.5) / 0.25, atol=1e-5) and int(target) == y
    grey = dict(cfg, input_size=(1, 64, 64), mean=(0.5,), std=(0.25,))
    assert make_dataset("fashion-scenes", grey, split="test", data_dir=tiny_fmnist_dir)[5][0].shape == (1, 64, 64)


def test_distractor_is_of_another_class(scenes):
    from dfqvit.scenes import _draw

    labels = np.array(scenes.garment_labels)
    for i in range(50):
        params, noise = _draw(0, "train", 0, i, labels)
        assert labels[int(params[6])] != labels[i] and int(params[7]) != int(params[0])
        assert noise.shape == (3, 64, 64)


def test_scenes_are_the_same_bytes_whatever_the_thread_count():
    """The first quarter of the test split rendered with 1 and with 2 threads (in float32 the FFT /
    reduction order moved some uint8 pixels by one level between the two on the AVX-512 machine
    where it was seen; the AVX2 build machines rendered float32 the same either way)."""
    import hashlib

    scenes = FashionScenes("test")

    def digest() -> str:
        return hashlib.sha256(scenes.render(range(2500))[0].numpy().tobytes()).hexdigest()

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = digest()
        torch.set_num_threads(2)
        assert digest() == one
    finally:
        torch.set_num_threads(threads)
