"""``dfqvit eval``: a float model, a saved quantized model (``--quantized DIR``) or an exported
ONNX model (``--onnx FILE``, through ONNX Runtime), with agreement and KL against the FP32 model."""
from __future__ import annotations

import sys

from ..errors import UserError
from ..evaluate import evaluate
from ..models import build_model, count_params, resolve_data_config
from .args import add_data_args, add_model_args, add_results_args, eval_loader, spec_from_args, whole_number
from .output import report_eval


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: top-1/top-5, images/s, parameters")
    p.add_argument("--quantized", metavar="DIR", help="evaluate a model saved by `dfqvit quantize --out DIR`, "
                   "with agreement and KL against its FP32 model (or --model)")
    add_model_args(p)
    add_data_args(p)
    add_results_args(p)
    g = p.add_argument_group("ONNX Runtime")
    g.add_argument("--onnx", metavar="FILE", help="evaluate an ONNX model (e.g. from `dfqvit export`) with "
                   "ONNX Runtime on CPU; agreement/KL against its FP32 model (or --model) when found")
    g.add_argument("--ort-threads", type=whole_number, default=None,
                   help="ONNX Runtime intra-op threads (default: all cores)")
    p.set_defaults(func=cmd_eval)


def _quantized_and_reference(args):
    """``--quantized DIR``: the saved model, plus its FP32 reference (``--model`` if given
    explicitly, else the model it was made from, when that can still be found)."""
    from ..quant.serialize import load_quantized, reference_spec

    model, meta = load_quantized(args.quantized)
    spec = spec_from_args(args) if args.model_given else reference_spec(meta)
    reference = build_model(spec).to(args.device) if spec is not None else None
    if reference is None:
        print("note: FP32 reference not found; pass --model/--checkpoint to get agreement and KL",
              file=sys.stderr)
    saved = meta["model"]
    data_config = resolve_data_config(model, saved["data_config"])
    return model.to(args.device), reference, data_config, f"{args.quantized}", saved.get("zoo")


def cmd_eval(args) -> int:
    if getattr(args, "onnx", None):
        return cmd_eval_onnx(args)
    if args.quantized:
        model, reference, data_config, name, zoo = _quantized_and_reference(args)
    else:
        spec = spec_from_args(args)
        model, reference, name, zoo = build_model(spec).to(args.device), None, args.model, spec.zoo
        data_config = resolve_data_config(model, spec.data_config)
    result = evaluate(model, eval_loader(args, data_config, zoo=zoo), device=args.device, reference=reference,
                      desc=name)
    return report_eval(args, name, result, count_params(model), data_config)


def onnx_data_config(path, meta: dict, args=None) -> dict:
    """The data config stored in an exported model's metadata ``meta`` (``dfqvit export`` writes
    it); without one, the config of ``--model`` and the data flags in ``args``."""
    if "data_config" in meta:
        cfg = meta["data_config"]
        return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if args is None:
        raise UserError(f"{path} carries no dfqvit data config; pass --model (and --input-size/--mean/--std)")
    from ..models import build_model, resolve_data_config

    spec = spec_from_args(args)
    return resolve_data_config(build_model(spec), spec.data_config)


def _onnx_reference(args, meta: dict):
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
    from ..evaluate import evaluate
    from ..export.onnx_export import read_onnx_metadata
    from ..export.ort import OnnxModel

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
