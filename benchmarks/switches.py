"""Each switch of the default preset turned off alone, on issue 18's protocol, over seeds.

The protocol (benchmarks/protocol.py): 32 real Fashion-MNIST train images per seed, the first
5000 test images, first/last layers at 8 bits. Row "default" is ``repq-comp``; every other row
is ``repq-comp`` with one ``QuantScheme`` switch off (the compensation row also drops the
switches that need it). Each cell: top-1 / agreement with FP32 / KL(FP32‖Q), mean ± std.

    python benchmarks/switches.py --write
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

from common import markdown_table, mean_std, publish
from protocol import logits_of, protocol_data

from dfqvit.evaluate import score
from dfqvit.quant import PRESETS, QuantConfig, quantize

PRESET = "repq-comp"
SWITCHES = {
    "default (repq-comp)": {},
    "− ridge CV (fixed ridge 10)": {"ridge_cv": False},
    "− per-token q/k ranges": {"token_ranges": False},
    "− input folds (proj, fc2)": {"fold_inputs": False},
    "− GPTQ (nearest rounding)": {"weight_rounding": "nearest"},
    "− compensation (RepQ-ViT's folds, + per-token q/k)": {"compensate": False, "ridge_cv": False, "fold_inputs": False},
}


@contextlib.contextmanager
def preset_variant(changes: dict):
    """``PRESETS[PRESET]`` with ``changes`` for the duration (a QuantConfig reads its scheme there)."""
    saved = PRESETS[PRESET]
    PRESETS[PRESET] = dataclasses.replace(saved, **changes)
    try:
        yield
    finally:
        PRESETS[PRESET] = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["zoo:deit-fmnist", "zoo:swin-fmnist"])
    parser.add_argument("--settings", nargs="+", default=["W4A4", "W3A4", "W4A8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--eval-size", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="update docs/RESULTS.md")
    args = parser.parse_args(argv)
    sections = []
    for name in args.models:
        cells = {(label, s): [] for label in SWITCHES for s in args.settings}
        for seed in args.seeds:
            model, calib, images, targets, fp_logits = protocol_data(name, seed, args.eval_size)
            for label, changes in SWITCHES.items():
                with preset_variant(changes):
                    for setting in args.settings:
                        w_bits, a_bits = map(int, setting[1:].split("A"))
                        qmodel, _ = quantize(model, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=PRESET), calib)
                        r = score(logits_of(qmodel, images), targets, reference_logits=fp_logits)
                        cells[label, setting].append(r)
                        print(f"{name} seed {seed} {setting} {label}: {r.top1:.2f} / {r.agreement:.2f} / {r.kl:.4f}",
                              flush=True)
        rows = [[label] + [" / ".join([mean_std([r.top1 for r in cells[label, s]]),
                                       mean_std([r.agreement for r in cells[label, s]]),
                                       mean_std([r.kl for r in cells[label, s]], 4)]) for s in args.settings]
                for label in SWITCHES]
        sections.append(f"**{name}**, real calibration, seeds {args.seeds}: top-1 % / agreement % / KL\n\n"
                        + markdown_table(["repq-comp"] + args.settings, rows))
    publish("switches", "switches.py", argv, f"{args.eval_size} test images, 32 calibration images",
            "\n\n".join(sections), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
