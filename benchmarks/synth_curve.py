"""Top-1 / KL against synthesis time for the ``dfq`` source: how many iterations are worth it.

For each iteration budget (per E2H stage), synthesize the calibration set, quantize with it
and evaluate on the model's test split (its zoo card's dataset) against FP32; white noise, smooth
noise (dfq's start, no step taken) and real calibration are the reference points. The default
iteration count of ``DFQSynthConfig`` is chosen from this curve.

    python benchmarks/synth_curve.py --model zoo:swin-scenes --setting W4A4 --iters 10 25 50 100 --eval-size 2000 --write
"""
from __future__ import annotations

import argparse
import statistics
import sys

from common import markdown_table, mean_std, model_dataset, publish

from dfqvit.acm import ACM_KINDS, ACMConfig
from dfqvit.data import make_dataset
from dfqvit.models import load_model
from dfqvit.pipeline import CalibSpec, EvalSet, run_quantization
from dfqvit.quant import QuantConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:deit-fmnist")
    p.add_argument("--setting", default="W4A4")
    p.add_argument("--iters", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=None, help="test images used (the whole split by default)")
    p.add_argument("--acm", default="off", choices=ACM_KINDS)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    w, a = (int(x) for x in args.setting.upper().lstrip("W").split("A"))
    qconfig = QuantConfig(w_bits=w, a_bits=a)
    model, data_config, _ = load_model(args.model)
    data = model_dataset(args.model)
    evalset = EvalSet.from_dataset(make_dataset(data, data_config, split="test"), limit=args.eval_size)
    fp = evalset.set_reference(model, progress=False)
    rows = []
    points = [("white noise", "noise", {}), ("smooth noise", "noise", {"slope": 2.0}), ("real", "real", {"data": data})]
    points += [(f"dfq, {n} it/stage", "dfq", {"iterations": n, "progress": False}) for n in args.iters]
    for label, source, options in points:
        top1, kl, secs = [], [], []
        for seed in args.seeds:
            _, row, _ = run_quantization(model, data_config, qconfig, CalibSpec(source, args.calib_size, seed, options),
                                         evalset, acm=ACMConfig(kind=args.acm), progress=False)
            top1.append(row["top1"])
            kl.append(row["kl"])
            secs.append(row["seconds"]["calibration_data"])
        rows.append([label, f"{statistics.mean(secs):.1f}", mean_std(top1), mean_std(kl, 4)])
        print(rows[-1], flush=True)
    publish(f"synth-curve-{args.model.removeprefix('zoo:')}", "synth_curve.py", argv, "",
            f"{args.model} at {args.setting} (preset {qconfig.preset}, ACM {args.acm}, {args.calib_size} images, "
            f"{len(evalset.targets)} test images; FP32 top-1 {fp.top1:.2f}%), seeds {args.seeds}; "
            "synthesis seconds include hard-example mining's calibrations.\n\n"
            + markdown_table(["calibration", "synthesis s", "top-1 %", "KL(FP32‖Q)"], rows), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
