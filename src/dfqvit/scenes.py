"""``fashion-scenes``: 64×64 RGB scenes composed from Fashion-MNIST, 100 classes.

Each scene holds one garment of the matching Fashion-MNIST split, scaled to 40–90 % of the
side, placed at random, flipped at random and painted in one of ten colours with a random
shade; behind it a coloured 1/f texture and a faded distractor garment of another class and
colour. The label is ``garment * 10 + colour``. Scene ``i`` of a split is a pure function of
the split, ``i``, the seed and the epoch: the test split is always rendered at epoch 0, the
training loop renders the train split at a fresh epoch every pass (new placements, same
garments), and ``real`` calibration draws the train split at epoch 0.

Why: the 28×28 grey zoo is so easy that smooth noise calibrates as well as real images; a
100-class colour/shape task at ImageNet-like token counts needs the fine distinctions that
make quantization error visible.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .data import FASHION_MNIST_CLASSES, FashionMNIST

FASHION_SCENES = "fashion-scenes"
SCENE_SIZE = 64
COLOURS = {
    "red": (0.90, 0.10, 0.10), "orange": (1.00, 0.55, 0.00), "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20), "cyan": (0.00, 0.80, 0.85), "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.20, 0.85), "pink": (1.00, 0.40, 0.70), "brown": (0.55, 0.35, 0.15),
    "white": (0.95, 0.95, 0.95),
}
CLASSES = tuple(f"{colour} {garment}" for garment in FASHION_MNIST_CLASSES for colour in COLOURS)
_PALETTE = torch.tensor(list(COLOURS.values()))
_SPLIT_IDS = {"train": 0, "test": 1}
# Per-scene random draws, in the order _draw returns them.
_PARAMS = ("colour", "shade", "size", "x", "y", "flip", "other", "other_colour", "alpha",
           "other_size", "other_x", "other_y", "bg_level", "bg_r", "bg_g", "bg_b", "bg_contrast")


def _draw(seed: int, split: str, epoch: int, index: int, labels: np.ndarray) -> tuple[list[float], np.ndarray]:
    """One scene's parameters and its background's white noise, from its own generator."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], epoch, index])
    colour = int(rng.integers(10))
    other = int(rng.integers(len(labels)))
    while labels[other] == labels[index]:
        other = int(rng.integers(len(labels)))
    size = rng.uniform(0.4, 0.9)
    other_size = rng.uniform(0.3, 0.6)
    params = [colour, rng.uniform(0.6, 1.0), size, rng.uniform(0, 1 - size), rng.uniform(0, 1 - size),
              float(rng.random() < 0.5), other, (colour + int(rng.integers(1, 10))) % 10,
              rng.uniform(0.25, 0.45), other_size, rng.uniform(0, 1 - other_size), rng.uniform(0, 1 - other_size),
              rng.uniform(0.15, 0.55), *rng.normal(0, 0.08, 3), rng.uniform(0.05, 0.2)]
    return params, rng.standard_normal((3, SCENE_SIZE, SCENE_SIZE), dtype=np.float32)


def _place(garments: torch.Tensor, size, x, y, flip) -> torch.Tensor:
    """Warp 28×28 garments (N,1,28,28 in [0, 1]) into boxes of the 64×64 canvas (fractions of the side)."""
    n = len(garments)
    scale = 1.0 / size
    theta = torch.zeros(n, 2, 3, dtype=garments.dtype)
    theta[:, 0, 0] = scale * (1 - 2 * flip)
    theta[:, 1, 1] = scale
    # canvas point u in [-1, 1] maps to garment point (u - centre) / size; centre = 2 * (x + size/2) - 1
    theta[:, 0, 2] = -(2 * (x + size / 2) - 1) * theta[:, 0, 0]
    theta[:, 1, 2] = -(2 * (y + size / 2) - 1) * scale
    grid = F.affine_grid(theta, (n, 1, SCENE_SIZE, SCENE_SIZE), align_corners=False)
    return F.grid_sample(garments, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _texture(noise: torch.Tensor) -> torch.Tensor:
    """1/f (amplitude) texture from white noise, each channel at zero mean and unit std.

    Rendering is float64: the FFT and the mean / std reductions sum in an order that depends on
    the thread count, and in float32 that moved some pixels of the rounded uint8 scene by one
    level between 1 and 2 threads; in float64 the scenes are the same bytes whatever the threads."""
    noise = noise.double()
    h, w = noise.shape[-2:]
    f = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
                   + torch.fft.rfftfreq(w, dtype=torch.float64)[None, :] ** 2)
    f[0, 0] = 1.0
    tex = torch.fft.irfft2(torch.fft.rfft2(noise) / f, s=(h, w))
    tex = tex - tex.mean((-2, -1), keepdim=True)
    return tex / tex.std((-2, -1), keepdim=True).clamp_min(1e-6)


def render(images: np.ndarray, labels: np.ndarray, indices, split: str, seed: int = 0,
           epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes ``indices`` of a split as uint8 (N, 3, 64, 64) images and their 100-class labels.

    ``images`` / ``labels`` are the whole Fashion-MNIST split (uint8 N×28×28, int labels)."""
    indices = [int(i) for i in indices]
    draws = [_draw(seed, split, epoch, i, labels) for i in indices]
    # float64 throughout: see _texture (the scene's bytes must not depend on the thread count)
    p = dict(zip(_PARAMS, torch.tensor([d[0] for d in draws], dtype=torch.float64).T))
    noise = torch.from_numpy(np.stack([d[1] for d in draws]))
    colour, other_colour = p["colour"].long(), p["other_colour"].long()
    main = torch.from_numpy(images[indices]).double().div_(255).unsqueeze(1)
    other = torch.from_numpy(images[p["other"].long().numpy()]).double().div_(255).unsqueeze(1)
    main = _place(main, p["size"], p["x"], p["y"], p["flip"])
    other = _place(other, p["other_size"], p["other_x"], p["other_y"], 1 - p["flip"])

    tint = torch.stack([p["bg_r"], p["bg_g"], p["bg_b"]], 1)
    background = (p["bg_level"][:, None] + tint)[:, :, None, None] + p["bg_contrast"][:, None, None, None] * _texture(noise)
    scene = background
    palette = _PALETTE.double()
    for garment, pigment, alpha in ((other, palette[other_colour], p["alpha"]),
                                    (main, palette[colour] * p["shade"][:, None], torch.ones(len(indices), dtype=torch.float64))):
        cover = (garment / 0.15).clamp(0, 1) * alpha[:, None, None, None]     # soft silhouette
        paint = pigment[:, :, None, None] * (0.35 + 0.65 * garment)            # keeps the garment's own texture
        scene = scene * (1 - cover) + paint * cover
    targets = torch.from_numpy(labels[indices].astype(np.int64)) * 10 + colour
    return scene.clamp(0, 1).mul(255).round().to(torch.uint8), targets


class FashionScenes(Dataset):
    """A ``fashion-scenes`` split as PIL RGB images, transformed by ``transform``."""

    classes = CLASSES

    def __init__(self, split: str = "test", transform=None, data_dir=None, seed: int = 0, epoch: int = 0):
        source = FashionMNIST(split, data_dir=data_dir)
        self.split, self.seed, self.epoch = split, seed, epoch
        self.garments, self.garment_labels = source.images, source.targets.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.garment_labels)

    def render(self, indices, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch rendering (uint8 N×3×64×64, labels); ``epoch`` defaults to the dataset's own."""
        return render(self.garments, self.garment_labels, indices, self.split, self.seed,
                      self.epoch if epoch is None else epoch)

    def __getitem__(self, i: int):
        image, target = self.render([i])
        img = Image.fromarray(image[0].permute(1, 2, 0).numpy(), mode="RGB")
        return (self.transform(img) if self.transform else img), int(target)
