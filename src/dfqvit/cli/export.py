"""``dfqvit export DIR --format onnx [--out FILE]``: a model saved by ``dfqvit quantize --out DIR``
-> ONNX QDQ, with the table of what ONNX Runtime runs as integer kernels."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..export.onnx_export import DEFAULT_OPSET, export_onnx
from ..export.qdq import LOG2_MODES, WEIGHT_FORMATS
from ..fileio import refuse_existing
from ..models import resolve_data_config
from ..quant.serialize import load_quantized
from .output import write_results

FORMATS = ("onnx",)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a quantized model (dfqvit quantize --out DIR) to ONNX QDQ for ONNX Runtime",
        description="Export a saved quantized model to ONNX with QuantizeLinear/DequantizeLinear pairs "
                    "carrying its scales and zero points, and report which ops ONNX Runtime runs as integers.")
    p.add_argument("quantized", metavar="DIR", help="directory written by `dfqvit quantize --out DIR`")
    p.add_argument("--format", default="onnx", help=f"output format: {', '.join(FORMATS)} (default onnx)")
    p.add_argument("--out", help="output file (default: DIR/model.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 13..21 (default {DEFAULT_OPSET})")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--log2-softmax", default="emulate", metavar="MODE",
                   help=f"post-softmax log2 quantizer: {' | '.join(LOG2_MODES)} (default emulate: exact "
                        "function with float ops; uint8: integer attn·V, an approximation; float: dropped)")
    p.add_argument("--weight-format", default="int8", metavar="FMT",
                   help=f"weight container: {' | '.join(WEIGHT_FORMATS)} (default int8, runs as integer "
                        "matmuls everywhere; int8-vnni also puts 8-bit weights in int8: faster, exact only on "
                        "CPUs with VNNI / AMX; int4 needs --opset 21 and runs as dequantize + float matmul)")
    p.add_argument("--rounding", default="onnx", metavar="MODE",
                   help="activation rounding: onnx (textbook QuantizeLinear/DequantizeLinear pairs, default) | "
                        "torch (Mul by 1/scale first: the same codes as PyTorch even at rounding ties)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime kernel count and accuracy check")
    p.add_argument("--results-file", help="write the export report here (JSON)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:

    if args.format not in FORMATS:
        raise UserError(f"unknown export format {args.format!r}; supported: {', '.join(FORMATS)}")
    out = refuse_existing(args.out or Path(args.quantized) / "model.onnx", args.force)
    model, meta = load_quantized(args.quantized)
    data_config = resolve_data_config(model, meta["model"].get("data_config"))
    report = export_onnx(model, out, data_config, opset=args.opset, log2_softmax=args.log2_softmax,
                         weight_format=args.weight_format, rounding=args.rounding, force=args.force, verify=not args.no_check,
                         analyze=not args.no_check,
                         metadata={"model": meta["model"], "quantization": meta["quantization"],
                                   "source": str(Path(args.quantized).resolve())})
    print(report.table())
    if args.results_file:
        write_results(args.results_file, "json", [{"quantized": str(args.quantized), **report.to_dict()}])
    return 0
