"""Issue 18's protocol: the quantizer presets against RepQ-ViT's own code, on the same images.

Model: each bundled zoo model. Calibration: the 32 Fashion-MNIST train images at
``numpy.random.RandomState(seed).permutation(60000)[:32]``. Evaluation: the first 5000 test
images. First/last layers at 8 bits. Per cell: top-1 / agreement with FP32 / KL(FP32‖Q); per
preset the mean seconds of ``quantize`` (CPU), and per model the process's peak RSS (data and
evaluation included: an upper bound for ``quantize``).

The ``RepQ-ViT code`` column is zkkli/RepQ-ViT's ``classification/`` code run outside this
project on the same model and images (patched only for timm 1.0 and the CPU: explicit attention
matmuls, LayerNorm-only reparameterization loop, Swin's 4-D PatchMerging input viewed as 3-D,
patch embedding and head at 8 bits); its figures are quoted, not produced, by this script.

    python benchmarks/protocol.py --write
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch
from common import markdown_table, publish

from dfqvit.data import FASHION_MNIST, make_dataset
from dfqvit.evaluate import score
from dfqvit.models import load_model
from dfqvit.quant import QuantConfig, quantize

# zkkli/RepQ-ViT on the protocol (seed 0): top-1 / agreement / KL.
REPQ_VIT_CODE = {
    "zoo:deit-fmnist": {"W4A4": (91.44, 96.62, 0.0230), "W6A6": (92.06, 98.44, 0.0049), "W4A8": (92.08, 98.28, 0.0054),
                        "W3A4": (91.46, 96.44, 0.0322), "W3A8": (91.40, 97.40, 0.0138)},
    "zoo:swin-fmnist": {"W4A4": (91.62, 96.64, 0.0280), "W6A6": (92.40, 99.18, 0.0021), "W4A8": (92.30, 98.56, 0.0053),
                        "W3A4": (89.52, 93.52, 0.0780), "W3A8": (90.24, 94.38, 0.0600)},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def protocol_data(name: str, seed: int = 0, eval_size: int = 5000):
    """(model, calibration images, test images, test targets, FP32 test logits) of the protocol."""
    model, data_config, _ = load_model(name)
    train = make_dataset(FASHION_MNIST, data_config, split="train")
    idx = np.random.RandomState(seed).permutation(len(train))[:32]
    calib = torch.stack([train[int(i)][0] for i in idx])
    test = make_dataset(FASHION_MNIST, data_config, split="test")
    images, targets = zip(*(test[i] for i in range(eval_size)))
    images, targets = torch.stack(images), torch.tensor(targets)
    return model, calib, images, targets, logits_of(model, images)


def logits_of(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in images.split(1000)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(REPQ_VIT_CODE))
    parser.add_argument("--presets", nargs="+", default=["repq-vit", "repq-comp", "repq", "minmax"])
    parser.add_argument("--settings", nargs="+", default=["W4A4", "W3A4", "W3A8", "W4A8", "W6A6"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="update docs/RESULTS.md")
    args = parser.parse_args(argv)
    sections = []
    for name in args.models:
        model, calib, images, targets, fp_logits = protocol_data(name, args.seed, args.eval_size)
        reference = REPQ_VIT_CODE.get(name, {})
        header = ["setting"] + (["RepQ-ViT code"] if reference and args.seed == 0 else []) + args.presets
        rows, costs = [], {}
        for setting in args.settings:
            w_bits, a_bits = map(int, setting[1:].split("A"))
            row = [setting] + (["{:.2f} / {:.2f} / {:.4f}".format(*reference[setting])]
                               if reference and args.seed == 0 else [])
            for preset in args.presets:
                start = time.perf_counter()
                qmodel, _ = quantize(model, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset), calib)
                costs.setdefault(preset, []).append(time.perf_counter() - start)
                r = score(logits_of(qmodel, images), targets, reference_logits=fp_logits)
                row.append(f"{r.top1:.2f} / {r.agreement:.2f} / {r.kl:.4f}")
                print(f"{name} {setting} {preset:10s} {row[-1]}", flush=True)
            rows.append(row)
        cost = "; ".join(f"{p} {np.mean(v):.1f} s" for p, v in costs.items()) + f"; process peak RSS {_peak_rss_mb():.0f} MB"
        sections.append(f"**{name}** (FP32 top-1 {score(fp_logits, targets).top1:.2f}%, seed {args.seed}) — "
                        f"top-1 % / agreement % / KL; `quantize` per setting: {cost}\n\n"
                        + markdown_table(header, rows))
    publish("protocol", "protocol.py", argv, f"{args.eval_size} test images, 32 calibration images",
            "\n\n".join(sections), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
