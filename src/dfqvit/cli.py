"""dfqvit command line: eval, quantize, synth, train, export.

Flags mirror timm's validate.py. A :class:`UserError` anywhere becomes one line on stderr
and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import sys
import textwrap
from pathlib import Path

import torch
from torch.utils.data import Subset

from . import __version__
from .data import FASHION_MNIST, make_dataset, make_loader
from .errors import UserError
from .evaluate import evaluate
from .fileio import atomic_path, check_writable, refuse_existing, write_text_atomic
from .models import ModelSpec, build_model, count_params, parse_kwargs, resolve_data_config, resolve_spec


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
    input_size = args.input_size
    if input_size is None and args.img_size is not None:
        input_size = None  # timm derives it from the model's img_size
    return resolve_spec(
        args.model, kwargs=kwargs, checkpoint=args.checkpoint, pretrained=args.pretrained,
        data_overrides={"input_size": input_size, "mean": args.mean, "std": args.std,
                        "crop_pct": args.crop_pct, "interpolation": args.interpolation},
    )


def default_data(args, zoo: str | None, split: str = "test") -> str | None:
    """``--data`` when not given: a --data-dir holding Fashion-MNIST's IDX files means
    fashion-mnist; a zoo model means the dataset it was trained on; otherwise the user must say."""
    from .data import find_idx_files
    from .models import zoo_card

    if args.data is not None:
        return args.data
    if args.data_dir is not None:
        return FASHION_MNIST if find_idx_files(split, args.data_dir) else None
    if zoo:
        return zoo_card(zoo).get("dataset", FASHION_MNIST)
    raise UserError("no evaluation data: pass --data fashion-mnist or fashion-scenes, or --data-dir DIR (an "
                    "ImageFolder of the model's classes)" + (", or --no-eval" if hasattr(args, "no_eval") else ""))


def eval_loader(args, data_config: dict, split: str = "test", zoo: str | None = None):
    data = default_data(args, zoo, split)
    dataset = make_dataset(data, data_config, split=split, data_dir=args.data_dir, download=args.download)
    if args.limit is not None and args.limit < len(dataset):
        dataset = Subset(dataset, range(args.limit))
    return make_loader(dataset, args.batch_size, workers=args.workers)


def write_results(path: str | None, fmt: str, rows: list[dict]) -> None:
    """Write result rows as JSON (one object, or a list) or CSV, atomically."""
    if not path:
        return
    if fmt == "json":
        text = json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n"
    else:
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
                         for row in rows)
        text = buf.getvalue()
    write_text_atomic(path, text)


def _quantized_and_reference(args):
    """``--quantized DIR``: the saved model, plus its FP32 reference (``--model`` if given
    explicitly, else the model it was made from, when that can still be found)."""
    from .quant.serialize import load_quantized, reference_spec

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
        from .export.cli import cmd_eval_onnx
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


def report_eval(args, name: str, result, param_count: int, data_config: dict, runtime: str | None = None) -> int:
    """Print an evaluation and write it with timm's result keys (+ images/s, agreement, KL)."""
    row = {
        "model": name, **({"runtime": runtime} if runtime else {}),
        "top1": round(result.top1, 3), "top1_err": round(100 - result.top1, 3),
        "top5": round(result.top5, 3), "top5_err": round(100 - result.top5, 3),
        "param_count": round(param_count / 1e6, 3), "img_size": data_config["input_size"][-1],
        "crop_pct": data_config.get("crop_pct"), "interpolation": data_config.get("interpolation"),
        "images_per_s": round(result.images_per_s, 1),
    }
    fidelity = ""
    if result.agreement is not None:
        row.update(agreement=round(result.agreement, 3), kl=round(result.kl, 6))
        fidelity = f"  agreement {result.agreement:.2f}%  KL {result.kl:.4f}"
    print(f"{name}{f' ({runtime})' if runtime else ''}: top1 {result.top1:.2f}  top5 {result.top5:.2f}  "
          f"{result.images_per_s:.0f} img/s  params {param_count / 1e6:.2f}M{fidelity}  ({result.images} images)")
    write_results(args.results_file, args.results_format, [row])
    return 0


def cmd_train(args) -> int:
    from safetensors.torch import save_file

    from .train import TRAIN_DATASETS, TrainConfig, checkpoint_path, dump_json, train, zoo_card

    spec = spec_from_args(args)
    if spec.zoo and not args.checkpoint:
        spec.checkpoint = None  # retrain a zoo model from scratch
    for flag, ok, rule in (("--epochs", args.epochs >= 1, ">= 1"), ("--shift", args.shift >= 0, ">= 0"),
                           ("--eval-every", args.eval_every >= 0, ">= 0"),
                           ("--warmup-epochs", args.warmup_epochs >= 0, ">= 0"),
                           ("--label-smoothing", 0 <= args.label_smoothing < 1, "in [0, 1)"),
                           ("--hflip", 0 <= args.hflip <= 1, "in [0, 1]")):
        if not ok:
            raise UserError(f"{flag} must be {rule} (got {getattr(args, flag[2:].replace('-', '_'))})")
    args.data = args.data or FASHION_MNIST
    if args.data not in TRAIN_DATASETS:
        raise UserError(f"dfqvit train uses a built-in dataset: --data {' or '.join(TRAIN_DATASETS)} "
                        f"(got {args.data!r})")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, shift=args.shift, hflip=args.hflip,
                      amp=args.amp, seed=args.seed, eval_every=args.eval_every, dataset=args.data)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {out})")
    check_writable(out)
    state_path = checkpoint_path(out)
    if state_path.exists() and not args.resume:
        raise UserError(f"{state_path} holds an unfinished run: add --resume to continue it, "
                        "or delete it to start over")
    model, data_config, seconds, history = train(spec, cfg, device=args.device, data_dir=args.data_dir,
                                                 state_path=state_path, resume=args.resume)
    result = evaluate(model, eval_loader(args, data_config), desc="test")
    command = "dfqvit " + shlex.join(sys.argv[1:])
    card = zoo_card(spec, data_config, cfg, model, result, seconds, args.device, command, out.name, history)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_text_atomic(out.with_suffix(".json"), dump_json(card))
    state_path.unlink(missing_ok=True)
    print(f"trained {spec.name} in {seconds:.0f}s: top1 {result.top1:.2f} top5 {result.top5:.2f} -> {out}")
    return 0


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

    from .calib.dfq import DFQSynthConfig
    from .calib.psaq import PSAQSynthConfig

    lines = ["--synth-opts FIELD=VALUE fields (values are Python literals; defaults shown):"]
    for name, cls in (("dfq", DFQSynthConfig), ("psaq", PSAQSynthConfig)):
        items = [f"{f.name}={f.default!r}" for f in fields(cls) if f.default is not MISSING]
        lines.append(textwrap.fill(", ".join(items), width=100, initial_indent=f"  {name}: ",
                                   subsequent_indent="    "))
    lines.append("  noise: slope=0 (0: white noise; 2: smooth 1/f^2 noise)")
    return "\n".join(lines)


def add_quant_args(p: argparse.ArgumentParser, sources: tuple[str, ...] | None = None) -> None:
    from .calib import CALIBRATION_SOURCES
    from .quant import PRESETS

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
    from .quant import QuantConfig

    return QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, preset=args.preset,
                       first_last_bits=args.first_last_bits, include=tuple(args.include),
                       exclude=tuple(args.exclude))


def acm_config_from_args(args):
    from .acm import ACMConfig

    return ACMConfig(kind=args.acm, where=args.acm_where, target=args.acm_target, ridge=args.acm_ridge,
                     noise_share=args.acm_noise_share)


def calib_spec_from_args(args):
    from .pipeline import CalibSpec

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


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def cmd_quantize(args) -> int:
    from .pipeline import EvalSet, run_quantization
    from .quant import save_quantized

    qconfig = quant_config_from_args(args)
    acm = acm_config_from_args(args).resolved(qconfig.a_bits)
    calib = calib_spec_from_args(args)
    if args.out:
        refuse_existing(args.out, args.force, directory=True)
    spec = spec_from_args(args)
    model = build_model(spec).to(args.device)
    data_config = resolve_data_config(model, spec.data_config)
    if args.calib_file:
        from .calib.cache import load_calibration_file
        calib.images = load_calibration_file(args.calib_file, data_config)
        calib.source = f"file:{Path(args.calib_file).name}"
    evalset = None
    if not args.no_eval:
        evalset = EvalSet.from_dataset(eval_loader(args, data_config, zoo=spec.zoo).dataset, args.batch_size)
    qmodel, row, _ = run_quantization(model, data_config, qconfig, calib, evalset, acm=acm, device=args.device)
    row = {"model": args.model, **row}
    if args.out:
        save_quantized(qmodel.cpu(), spec, qconfig, args.out, force=args.force,
                       extra={"calibration": {"source": calib.source, "size": row["calib_size"], "seed": calib.seed,
                                              "options": calib.options},
                              "acm": acm.to_dict(), "results": row})
    label = f"W{qconfig.w_bits}A{qconfig.a_bits} {qconfig.preset}" + (f" +ACM {acm.kind}" if acm.kind != "off" else "")
    table = [("", "FP32", label)]
    if evalset is not None:
        table += [("top-1 (%)", f"{row['fp32_top1']:.2f}", f"{row['top1']:.2f}"),
                  ("top-5 (%)", f"{row['fp32_top5']:.2f}", f"{row['top5']:.2f}"),
                  ("agreement with FP32 (%)", "100.00", f"{row['agreement']:.2f}"),
                  ("KL(FP32 || Q) (nats)", "0", f"{row['kl']:.4f}")]
    table.append(("weight bytes", f"{row['fp32_weight_bytes']:,}", f"{row['weight_bytes']:,}"))
    if acm.kind != "off":
        table.append(("ACM extra parameters", "", f"{row['acm_params']:,} ({row['acm_params_pct']:.1f}%)"))
    table += [(f"seconds: {k}", "", f"{v:.1f}") for k, v in row["seconds"].items()]
    print()
    print_table(table)
    if args.out:
        print(f"saved to {args.out}")
    write_results(args.results_file, args.results_format, [row])
    return 0


def cmd_synth(args) -> int:
    """Synthesize a calibration set once, for inspection and reuse (``quantize --calib-file``)."""
    import time
    from dataclasses import asdict, is_dataclass

    from .calib import make_source
    from .calib.cache import file_sha256, save_calibration_file
    from .pipeline import calibration_images, check_calibration_fits

    qconfig = quant_config_from_args(args)
    calib = calib_spec_from_args(args)
    out = refuse_existing(args.out, args.force)
    spec = spec_from_args(args)
    model = build_model(spec).to(args.device)
    data_config = resolve_data_config(model, spec.data_config)
    check_calibration_fits(model, data_config, qconfig, calib.size)   # the set is made for calibrating
    source = make_source(calib.source, **calib.options)
    start = time.perf_counter()
    images = calibration_images(model, data_config, qconfig, calib, device=args.device, source=source)
    seconds = time.perf_counter() - start
    source_config = getattr(source, "config", None)
    meta = {
        "source": calib.source, "seed": calib.seed, "model": args.model, "timm_name": spec.name,
        "model_kwargs": spec.kwargs,
        "checkpoint_sha256": file_sha256(spec.checkpoint) if spec.checkpoint else None,
        "quantization_for_hard_mining": qconfig.to_dict(),
        "source_config": asdict(source_config) if is_dataclass(source_config) else calib.options,
        "seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 2),
        "device": args.device, "torch": torch.__version__,
    }
    save_calibration_file(out, images, data_config, meta)
    print(f"{len(images)} {calib.source} images in {seconds:.1f}s ({len(images) / seconds:.2f} images/s) "
          f"-> {out} (+ {out.with_suffix('.json').name}, {out.with_suffix('.png').name})")
    return 0


def check_results_file(path: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"--results-file {path} is a directory; name a file")
    check_writable(path)


def one_line(e: UserError) -> str:
    """The message of ``e``; a DataLoader worker re-raises it wrapped in the worker's traceback."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the usage itself is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dfqvit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dfqvit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="evaluate a model: top-1/top-5, images/s, parameters")
    p.add_argument("--quantized", metavar="DIR", help="evaluate a model saved by `dfqvit quantize --out DIR`, "
                   "with agreement and KL against its FP32 model (or --model)")
    add_model_args(p)
    add_data_args(p)
    add_results_args(p)
    from .export.cli import add_export_parser, add_onnx_eval_args
    add_onnx_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="calibrate and quantize a model (data-free by default)",
                       epilog=synth_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    add_quant_args(p)
    p.add_argument("--calib-file", help="reuse calibration images written by `dfqvit synth`")
    add_acm_args(p)
    add_results_args(p)
    p.add_argument("--out", help="write the quantized model to this directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("synth", help="synthesize calibration images data-free and save them",
                       epilog=synth_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_device_arg(p.add_argument_group("device"))
    add_quant_args(p, sources=("dfq", "psaq"))
    p.add_argument("--out", required=True, help="images file (.safetensors); a .json sidecar and .png grid go next to it")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a model on fashion-mnist or fashion-scenes (reproduces the zoo)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--shift", type=int, default=2, help="random translation augmentation, in pixels")
    p.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip")
    p.add_argument("--eval-every", type=int, default=0,
                   help="print the test top-1 every N epochs (monitoring only; the last epoch is kept)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run saved next to --out (OUT.train-state.pt, written every "
                        "epoch and every 10 minutes)")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors); the card goes next to it")
    p.set_defaults(func=cmd_train, batch_size=128)

    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.model_given = any(a in ("--model", "-m") or a.startswith("--model=") for a in argv)
    try:
        if getattr(args, "results_file", None):
            check_results_file(args.results_file)
        return args.func(args)
    except UserError as e:
        print(f"dfqvit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfqvit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
