"""Argument groups shared by the subcommands, and their translation into library objects
(model spec, quantization / ACM / calibration configs, evaluation loader). Flags mirror timm's
validate.py so that a user's command line carries over."""
from __future__ import annotations

import argparse
import textwrap

import torch
from torch.utils.data import Subset

from ..data import FASHION_MNIST, make_dataset, make_loader
from ..errors import UserError
from ..models import ModelSpec, parse_kwargs, resolve_spec


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (as timm's validate.py)")
    g.add_argument("--model", "-m", default="zoo:deit-fmnist",
                   help="timm model name or zoo:NAME (default: zoo:deit-fmnist)")
    g.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    g.add_argument("--checkpoint", help="weights: .safetensors, or .pth (loaded weights-only)")
    g.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs, e.g. depths=(2,2) embed_dim=128")
    g.add_argument("--num-classes", type=int)
    g.add_argument("--in-chans", type=int)
    g.add_argument("--img-size", type=int, help="input image size (also sets the model's img_size)")
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    g.add_argument("--mean", type=float, nargs="+")
    g.add_argument("--std", type=float, nargs="+")
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])


def device_arg(value: str) -> str:
    """``--device``: a torch device that this machine has (checked before any work starts)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return value
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: this machine (torch {torch.__version__}) has no usable "
                                             "CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
        return value
    if device.type == "mps" and torch.backends.mps.is_available():
        return value
    raise argparse.ArgumentTypeError(f"device {value!r} is not available here; use cpu or cuda")


def whole_number(value: str, minimum: int = 0) -> int:
    try:
        n = int(value)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum} (got {value!r})")
    return n


def positive_int(value: str) -> int:
    return whole_number(value, 1)


def add_device_arg(g) -> None:
    g.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help=f"built-in dataset ({FASHION_MNIST}, fashion-scenes)")
    g.add_argument("--data-dir", help="ImageFolder root, or where the Fashion-MNIST IDX files are")
    g.add_argument("--download", action="store_true", help="download Fashion-MNIST if not found")
    g.add_argument("-b", "--batch-size", type=positive_int, default=256)
    g.add_argument("-j", "--workers", type=whole_number, default=0, help="data loading worker processes")
    g.add_argument("--limit", "--eval-size", type=positive_int, metavar="N",
                   help="evaluate on the first N images of the split only")
    add_device_arg(g)


def add_results_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-file", help="write the results here")
    p.add_argument("--results-format", choices=["json", "csv"], default="json")


def spec_from_args(args) -> ModelSpec:
    kwargs = parse_kwargs(args.model_kwargs)
    for flag, key in (("num_classes", "num_classes"), ("in_chans", "in_chans"), ("img_size", "img_size")):
        if getattr(args, flag) is not None:
            kwargs[key] = getattr(args, flag)
    return resolve_spec(   # without --input-size, timm derives it from the model's img_size
        args.model, kwargs=kwargs, checkpoint=args.checkpoint, pretrained=args.pretrained,
        data_overrides={"input_size": args.input_size, "mean": args.mean, "std": args.std,
                        "crop_pct": args.crop_pct, "interpolation": args.interpolation},
    )


def default_data(args, zoo: str | None, split: str = "test") -> str | None:
    """``--data`` when not given: a --data-dir holding Fashion-MNIST's IDX files means
    fashion-mnist; a zoo model means the dataset it was trained on; otherwise the user must say."""
    from ..data import find_idx_files
    from ..models import zoo_card

    if args.data is not None:
        return args.data
    if args.data_dir is not None:
        return FASHION_MNIST if find_idx_files(split, args.data_dir) else None
    if zoo:
        return zoo_card(zoo).get("dataset", FASHION_MNIST)
    what = "evaluation" if split == "test" else "calibration"
    hint = ", or --no-eval to skip the evaluation" if split == "test" and hasattr(args, "no_eval") else ""
    raise UserError(f"no {what} data: pass --data fashion-mnist or fashion-scenes, or --data-dir DIR (an "
                    f"ImageFolder of the model's classes){hint}")


def eval_loader(args, data_config: dict, split: str = "test", zoo: str | None = None):
    data = default_data(args, zoo, split)
    dataset = make_dataset(data, data_config, split=split, data_dir=args.data_dir, download=args.download)
    if args.limit is not None and args.limit < len(dataset):
        dataset = Subset(dataset, range(args.limit))
    return make_loader(dataset, args.batch_size, workers=args.workers)


def _first_last_bits(value: str) -> int | None:
    if value.lower() in ("none", "same"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit-width such as 8, or none (got {value!r})") from None


def synth_fields_epilog() -> str:
    """The --synth-opts fields of each synthesis source, with their defaults (help epilog)."""
    from dataclasses import MISSING, fields

    from ..calib.dfq import DFQSynthConfig
    from ..calib.psaq import PSAQSynthConfig

    lines = ["--synth-opts FIELD=VALUE fields (values are Python literals; defaults shown):"]
    for name, cls in (("dfq", DFQSynthConfig), ("psaq", PSAQSynthConfig)):
        items = [f"{f.name}={f.default!r}" for f in fields(cls) if f.default is not MISSING]
        lines.append(textwrap.fill(", ".join(items), width=100, initial_indent=f"  {name}: ",
                                   subsequent_indent="    "))
    lines.append("  noise: slope=0 (0: white noise; 2: smooth 1/f^2 noise)")
    return "\n".join(lines)


def add_quant_args(p: argparse.ArgumentParser, sources: tuple[str, ...] | None = None) -> None:
    from ..calib import CALIBRATION_SOURCES
    from ..quant import PRESETS

    g = p.add_argument_group("quantization")
    g.add_argument("--w-bits", type=int, default=4, help="weight bits: 2..8, or 16/32 for float")
    g.add_argument("--a-bits", type=int, default=8, help="activation bits: 2..8, or 16/32 for float")
    g.add_argument("--preset", default="repq-comp", choices=sorted(PRESETS))
    g.add_argument("--first-last-bits", type=_first_last_bits, default=8, metavar="BITS|none",
                   help="bits of the patch embedding and classifier (default 8; none: like the rest)")
    g.add_argument("--include", nargs="+", default=["*"], metavar="PATTERN", help="fnmatch module names")
    g.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="dfq", choices=sorted(sources or CALIBRATION_SOURCES),
                   help="calibration images: data-free synthesis (dfq, psaq), noise, or real train images")
    g.add_argument("--calib-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--synth-opts", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="source options: synthesis config fields for --calib dfq/psaq (switches for "
                        "ablations), e.g. hard_mining=False iterations=200; slope=S for --calib noise "
                        "(0: white, the default; 2: smooth 1/f² noise). All fields are listed below.")


def add_acm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activation correction matrix (ACM)")
    g.add_argument("--acm", default="auto", choices=["auto", "full", "diag", "off"],
                   help="closed-form correction of intermediate activations: full matrix, per-channel "
                        "(diag), or off; auto (default) picks full with 8-bit activations and diag below, "
                        "which measures best on synthetic calibration sets")
    g.add_argument("--acm-where", default="block", choices=["block", "branch"],
                   help="block outputs, or attention/MLP branch outputs")
    g.add_argument("--acm-target", default="fp", choices=["fp", "fp_module"],
                   help="FP activation of the same image, or the FP module on the quantized input")
    g.add_argument("--acm-ridge", type=float, help="ridge strength toward the identity, relative to the "
                   "data (default: 1 for full, 0.01 for diag)")
    g.add_argument("--acm-noise-share", type=float, metavar="S",
                   help="smooth-noise images added to the ACM's fit per calibration image (default: 0.5 "
                        "for full, 0 for diag; 0 fits on the calibration images alone)")


def quant_config_from_args(args):
    from ..quant import QuantConfig

    return QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, preset=args.preset,
                       first_last_bits=args.first_last_bits, include=tuple(args.include),
                       exclude=tuple(args.exclude))


def acm_config_from_args(args):
    from ..acm import ACMConfig

    return ACMConfig(kind=args.acm, where=args.acm_where, target=args.acm_target, ridge=args.acm_ridge,
                     noise_share=args.acm_noise_share)


def calib_spec_from_args(args):
    from ..pipeline import CalibSpec

    if args.calib_size < 1:
        raise UserError("--calib-size must be at least 1")
    if args.calib == "real":
        if args.synth_opts:
            raise UserError("--synth-opts does not apply to --calib real (it takes --data or --data-dir)")
        zoo = args.model if args.model.startswith("zoo:") else None
        options = {"data": default_data(args, zoo, "train"), "data_dir": args.data_dir}
    else:
        options = parse_kwargs(args.synth_opts, "--synth-opts", "iterations=200")
    return CalibSpec(source=args.calib, size=args.calib_size, seed=args.seed, options=options)
