"""Cost of the default preset's closed-form compensation on ViT-B-sized layers.

Times :func:`dfqvit.quant.compensate.compensate_linear` (ridge update + GPTQ + bias refit) for
DeiT-B's four Linear shapes on the tokens of 32 images at 224 px (32 × 197), random data: the
cost depends on the shapes only. A DeiT-B has 12 blocks of these four layers.

    python benchmarks/bench_compensate.py --write
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from common import markdown_table, publish

from dfqvit.quant import QLinear, QuantConfig
from dfqvit.quant.compensate import compensate_linear
from dfqvit.quant.modules import LayerBits

DEIT_B = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 * 197)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    scheme = QuantConfig(preset="repq-comp").scheme
    gen = torch.Generator().manual_seed(0)
    rows, total = [], 0.0
    for name, (d_in, d_out) in DEIT_B.items():
        lin = QLinear.from_float(torch.nn.Linear(d_in, d_out), LayerBits(args.w_bits, 8), scheme).to(args.device)
        x = torch.randn(args.tokens, d_in, generator=gen).to(args.device)
        y = (x @ lin.weight.T + lin.bias).detach() + 0.01 * torch.randn(args.tokens, d_out, generator=gen).to(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        compensate_linear(lin, x.reshape(32, -1, d_in), y.reshape(32, -1, d_out), scheme.ridge, weight_rounding=True,
                          ridge_cv=scheme.ridge_cv)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        total += seconds
        rows.append([name, f"{d_in} → {d_out}", f"{seconds:.2f}"])
        print(rows[-1], flush=True)
    rows.append(["DeiT-B, 12 blocks", "", f"{12 * total:.1f}"])
    publish("bench-compensate", "bench_compensate.py", argv,
            f"{args.tokens} tokens, W{args.w_bits}, device {args.device}",
            markdown_table(["layer", "in → out", "ridge + GPTQ + bias refit: s"], rows), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
