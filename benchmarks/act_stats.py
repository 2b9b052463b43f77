"""Per-block activation statistics that make ImageNet ViTs hard to quantize, for zoo models side by side.

For each transformer block, on real test images of the model's own dataset:

* post-LayerNorm channel spread: max / median over channels of each channel's range (max - min)
  at the output of ``norm1`` (RepQ-ViT's motivation: a few channels with huge ranges);
* residual stream: max |x| / median |x| and the excess kurtosis of the block's output;
* post-softmax: mean share of attention probabilities below 1 / tokens (how peaked it is),
  and the mean largest probability;
* post-GELU: min, and max / median of the positive values (the asymmetric, long-tailed fc1
  output that the post-GELU quantizer has to cover).

    python benchmarks/act_stats.py --models zoo:deit-fmnist zoo:deit-scenes [--images 256] [--write]
"""
from __future__ import annotations

import argparse
import sys

import torch
from common import markdown_table, model_dataset, publish

from dfqvit.data import make_dataset
from dfqvit.models import load_model


def _blocks(model):
    return [(name, m) for name, m in model.named_modules()
            if all(hasattr(m, a) for a in ("norm1", "attn", "norm2", "mlp"))]


@torch.no_grad()
def block_stats(model, images: torch.Tensor) -> list[dict]:
    """One dict of statistics per block (see the module docstring)."""
    captured: dict = {}
    hooks = []
    blocks = _blocks(model)

    def keep(key):
        def hook(module, inputs, output):
            captured[key] = output.detach().float()
        return hook

    for name, block in blocks:
        hooks += [block.norm1.register_forward_hook(keep((name, "ln"))),
                  block.register_forward_hook(keep((name, "out"))),
                  block.mlp.act.register_forward_hook(keep((name, "gelu")))]
        drop = getattr(block.attn, "attn_drop", None)
        if drop is not None:   # timm applies attn_drop to the softmax output: a free tap on the probabilities
            hooks.append(drop.register_forward_hook(keep((name, "softmax"))))
    fused = [getattr(b.attn, "fused_attn", False) for _, b in blocks]
    for _, b in blocks:
        if hasattr(b.attn, "fused_attn"):
            b.attn.fused_attn = False     # the eager path materialises the softmax
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
        for (_, b), f in zip(blocks, fused):
            if hasattr(b.attn, "fused_attn"):
                b.attn.fused_attn = f
    rows = []
    for name, _ in blocks:
        ln = captured[(name, "ln")].reshape(-1, captured[(name, "ln")].shape[-1])
        ranges = ln.amax(0) - ln.amin(0)
        out = captured[(name, "out")].flatten()
        z = (out - out.mean()) / out.std()
        gelu = captured[(name, "gelu")].flatten()
        positive = gelu[gelu > 0]
        row = {"block": name, "ln_spread": (ranges.max() / ranges.median()).item(),
               "res_max_med": (out.abs().max() / out.abs().median()).item(),
               "res_kurtosis": (z.pow(4).mean() - 3).item(),
               "gelu_min": gelu.min().item(), "gelu_max_med": (positive.max() / positive.median()).item()}
        probs = captured.get((name, "softmax"))
        if probs is not None:
            n = probs.shape[-1]
            row["softmax_small"] = (probs < 1.0 / n).float().mean().item()
            row["softmax_max"] = probs.amax(-1).mean().item()
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["zoo:deit-fmnist", "zoo:swin-fmnist"])
    parser.add_argument("--images", type=int, default=256, help="test images (the first N)")
    parser.add_argument("--write", action="store_true", help="update this table's section of docs/RESULTS.md")
    args = parser.parse_args(argv)
    sections = []
    for model_name in args.models:
        model, data_config, _ = load_model(model_name)
        data = model_dataset(model_name)
        dataset = make_dataset(data, data_config, split="test")
        images = torch.stack([dataset[i][0] for i in range(min(args.images, len(dataset)))])
        rows = block_stats(model.eval(), images)
        header = ["block", "post-LN channel range max/median", "residual max/median |x|", "residual kurtosis",
                  "softmax share < 1/N", "softmax mean max", "post-GELU min", "post-GELU max/median (>0)"]
        table = [[r["block"], f"{r['ln_spread']:.1f}", f"{r['res_max_med']:.0f}", f"{r['res_kurtosis']:.1f}",
                  f"{r['softmax_small']:.2f}" if "softmax_small" in r else "-",
                  f"{r['softmax_max']:.2f}" if "softmax_max" in r else "-",
                  f"{r['gelu_min']:.3f}", f"{r['gelu_max_med']:.0f}"] for r in rows]
        sections.append(f"**{model_name}** ({data}, first {len(images)} test images)\n\n" + markdown_table(header, table))
        print(sections[-1], flush=True)
    publish("act-stats-" + "+".join(m.removeprefix("zoo:") for m in args.models), "act_stats.py", argv,
            f"{args.images} test images", "\n\n".join(sections), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
