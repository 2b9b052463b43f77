"""Command-line pieces for real integer deployment, wired into ``dfqvit.cli``:

* ``dfqvit export DIR --format onnx --out FILE [--opset N] [--force]``: a model saved by
  ``dfqvit quantize --out DIR`` → ONNX QDQ, with the table of what ONNX Runtime runs as
  integer kernels;
* ``dfqvit eval --onnx FILE ...``: evaluate an exported model through ONNX Runtime (CPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import refuse_existing

FORMATS = ("onnx",)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    from .onnx_export import DEFAULT_OPSET
    from .qdq import LOG2_MODES, WEIGHT_FORMATS

    p = subparsers.add_parser(
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
                        "matmuls; int4 needs --opset 21 and runs as dequantize + float matmul)")
    p.add_argument("--rounding", default="onnx", metavar="MODE",
                   help="activation rounding: onnx (textbook QuantizeLinear/DequantizeLinear pairs, default) | "
                        "torch (Mul by 1/scale first: the same codes as PyTorch even at rounding ties)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime kernel count and accuracy check")
    p.add_argument("--results-file", help="write the export report here (JSON)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from ..cli import write_results
    from ..models import resolve_data_config
    from ..quant.serialize import load_quantized
    from .onnx_export import export_onnx

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


def add_onnx_eval_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ONNX Runtime")
    g.add_argument("--onnx", metavar="FILE", help="evaluate an ONNX model (e.g. from `dfqvit export`) with "
                   "ONNX Runtime on CPU; agreement/KL against its FP32 model (or --model) when found")
    g.add_argument("--ort-threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")


class OnnxModel:
    """A callable ONNX Runtime session on the CPU execution provider: ``model(images) -> logits``
    (torch tensors, images ``(N, C, H, W)``)."""

    def __init__(self, path, threads: int | None = None):
        from .ort import make_session

        self.path = str(path)
        self.session = make_session(path, threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise UserError(f"{path} has {len(inputs)} inputs; expected one image batch")
        self.input_name = inputs[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])

    def param_count(self) -> int:
        import onnx

        graph = onnx.load(self.path, load_external_data=False).graph
        return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer))


def onnx_data_config(path, meta: dict, args=None) -> dict:
    """The data config stored in an exported model's metadata ``meta`` (``dfqvit export`` writes
    it); without one, the config of ``--model`` and the data flags in ``args``."""
    if "data_config" in meta:
        cfg = meta["data_config"]
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if args is None:
        raise UserError(f"{path} carries no dfqvit data config; pass --model (and --input-size/--mean/--std)")
    from ..cli import spec_from_args
    from ..models import build_model, resolve_data_config

    spec = spec_from_args(args)
    return resolve_data_config(build_model(spec), spec.data_config)


def _onnx_reference(args, meta: dict):
    from ..cli import spec_from_args
    from ..models import build_model
    from ..quant.serialize import reference_spec

    if getattr(args, "model_given", False):
        return build_model(spec_from_args(args))
    if "model" in meta:
        try:
            spec = reference_spec({"model": meta["model"]})
        except (TypeError, UserError):
            spec = None
        if spec is not None:
            return build_model(spec)
    return None


def cmd_eval_onnx(args) -> int:
    """``dfqvit eval --onnx FILE``: top-1/top-5, images/s, and agreement/KL against the FP32 model."""
    from ..cli import eval_loader, report_eval
    from ..evaluate import evaluate
    from .onnx_export import read_onnx_metadata

    if getattr(args, "quantized", None):
        raise UserError("give either --quantized DIR or --onnx FILE, not both")
    if args.device != "cpu":
        raise UserError("--onnx runs on ONNX Runtime's CPU execution provider; use --device cpu")
    model = OnnxModel(args.onnx, args.ort_threads)
    meta = read_onnx_metadata(args.onnx)
    data_config = onnx_data_config(args.onnx, meta, args)
    reference = _onnx_reference(args, meta)
    if reference is None:
        print("note: FP32 reference not found; pass --model/--checkpoint to get agreement and KL", file=sys.stderr)
    name = str(args.onnx)
    zoo = (meta.get("model") or {}).get("zoo") if isinstance(meta.get("model"), dict) else None
    result = evaluate(model, eval_loader(args, data_config, zoo=zoo), device="cpu", reference=reference, desc=name)
    return report_eval(args, name, result, model.param_count(), data_config, runtime="onnxruntime-cpu")
