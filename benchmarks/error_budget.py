"""Where a low-bit setting's loss comes from: each group of activation quantizers alone at the low width.

On issue 18's protocol (benchmarks/protocol.py: 32 real train images, first 5000 test images,
first/last layers at 8 bits), the weights at ``--w-bits`` everywhere and every activation
quantizer at ``--high-bits`` except one group (e.g. every block's fc2 input, the post-GELU
values) at ``--a-bits``. A group's row minus the "none" row is what quantizing that group costs;
the "all" row is the setting itself. Per row: top-1 / agreement with FP32 / KL(FP32‖Q).

    python benchmarks/error_budget.py --models zoo:deit-fmnist --write
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import sys

from common import markdown_table, publish
from protocol import logits_of, protocol_data

from dfqvit.evaluate import score
from dfqvit.quant import QuantConfig, calibrate, quantize_model, quantizers

# Activation quantizers by role, as named in dfqvit's quantized timm ViT / Swin blocks.
GROUPS = {
    "qkv input (post-LN1)": "*attn.qkv.input_quant",
    "q, k (scores matmul)": "*attn.matmul_qk.*_quant",
    "post-softmax probabilities": "*attn.matmul_av.a_quant",
    "v (attn·V matmul)": "*attn.matmul_av.b_quant",
    "proj input": "*attn.proj.input_quant",
    "fc1 input (post-LN2)": "*mlp.fc1.input_quant",
    "fc2 input (post-GELU)": "*mlp.fc2.input_quant",
}


def low_bit_quantizers(qmodel, a_bits: int) -> list:
    """(name, quantizer) of every activation quantizer at the setting's activation width
    (the first/last layers' 8-bit inputs are not among them)."""
    return [(n, q) for n, q in quantizers(qmodel) if not n.endswith("weight_quant") and q.bits == a_bits]


def budget_rows(names: list[str]) -> list[tuple[str, list[str]]]:
    """(row label, quantizers it keeps at the low width): none, each group, the rest ("other",
    when there is any: e.g. Swin's patch merging) and all."""
    groups = [(label, [n for n in names if fnmatch.fnmatchcase(n, pattern)]) for label, pattern in GROUPS.items()]
    grouped = {n for _, members in groups for n in members}
    other = [n for n in names if n not in grouped]
    return [("none", []), *groups, *([("other", other)] if other else []), ("all", names)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["zoo:deit-fmnist", "zoo:swin-fmnist"])
    parser.add_argument("--preset", default="repq-comp")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--high-bits", type=int, default=8, help="width of the activation quantizers not under test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="update docs/RESULTS.md")
    args = parser.parse_args(argv)
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, preset=args.preset)
    sections = []
    for name in args.models:
        model, calib, images, targets, fp_logits = protocol_data(name, args.seed, args.eval_size)
        names = [n for n, _ in low_bit_quantizers(quantize_model(copy.deepcopy(model), config)[0], args.a_bits)]
        rows = []
        for label, members in budget_rows(names):
            qmodel, _ = quantize_model(copy.deepcopy(model), config)
            for n, q in low_bit_quantizers(qmodel, args.a_bits):
                if n not in members:
                    q.bits = args.high_bits
            calibrate(qmodel, config, calib, progress=False)
            r = score(logits_of(qmodel, images), targets, reference_logits=fp_logits)
            rows.append([label, str(len(members)), f"{r.top1:.2f} / {r.agreement:.2f} / {r.kl:.4f}"])
            print(f"{name} {label:28s} {rows[-1][1]:>3s} quantizers  {rows[-1][2]}", flush=True)
        sections.append(f"**{name}** (W{args.w_bits}, activations at A{args.high_bits} except the row's group at "
                        f"A{args.a_bits}; preset {args.preset}, seed {args.seed})\n\n"
                        + markdown_table(["group at low width", "quantizers", "top-1 / agreement / KL"], rows))
    section = f"error-budget-W{args.w_bits}A{args.a_bits}-{args.preset}"
    publish(section, "error_budget.py", argv, f"{args.eval_size} test images, 32 calibration images",
            "\n\n".join(sections), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
