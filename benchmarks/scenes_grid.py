"""Draw a labelled grid of fashion-scenes test images to docs/fashion-scenes.png.

    python benchmarks/scenes_grid.py [--out docs/fashion-scenes.png] [--rows 4 --cols 6]
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dfqvit.scenes import CLASSES, FashionScenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/fashion-scenes.png")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--cols", type=int, default=6)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    args = parser.parse_args()
    n = args.rows * args.cols
    images, labels = FashionScenes(args.split).render(range(n))
    fig, axes = plt.subplots(args.rows, args.cols, figsize=(1.6 * args.cols, 1.8 * args.rows))
    for ax, img, label in zip(axes.flat, images, labels):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(CLASSES[label].replace(" ", "\n", 1), fontsize=7)
        ax.axis("off")
    fig.suptitle(f"fashion-scenes {args.split} split, scenes 0-{n - 1} (label: colour garment)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=72)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
