"""``dfqvit quantize``: calibration images (data-free by default) -> quantized model -> optional
activation correction -> evaluation against FP32, saved to ``--out DIR``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..fileio import refuse_existing
from ..models import build_model, resolve_data_config
from .args import (acm_config_from_args, add_acm_args, add_data_args, add_model_args, add_quant_args, add_results_args,
                   calib_spec_from_args, eval_loader, quant_config_from_args, spec_from_args, synth_fields_epilog)
from .output import print_table, write_results


def add_parser(sub) -> None:
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


def cmd_quantize(args) -> int:
    from ..pipeline import EvalSet, run_quantization
    from ..quant import save_quantized

    qconfig = quant_config_from_args(args)
    acm = acm_config_from_args(args).resolved(qconfig.a_bits)
    calib = calib_spec_from_args(args)
    if args.out:
        refuse_existing(args.out, args.force, directory=True)
    spec = spec_from_args(args)
    model = build_model(spec).to(args.device)
    data_config = resolve_data_config(model, spec.data_config)
    if args.calib_file:
        from ..calib.cache import load_calibration_file
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
