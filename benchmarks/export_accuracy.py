"""ONNX Runtime integer model vs the PyTorch simulation, and packed file size vs FP32.

For each zoo model and setting: quantize (real-data calibration by default, so the runs are
cheap and deterministic; the export does not depend on where calibration images came from),
save the packed model, export ONNX QDQ, then evaluate both on the full test split.

    python benchmarks/export_accuracy.py --write
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from common import markdown_table, publish

from dfqvit.acm import ACM_KINDS, ACMConfig
from dfqvit.data import FASHION_MNIST, make_dataset
from dfqvit.evaluate import score
from dfqvit.export import export_onnx
from dfqvit.export.ort import OnnxModel
from dfqvit.models import load_model
from dfqvit.pipeline import CalibSpec, EvalSet, run_quantization
from dfqvit.quant import PRESETS, QuantConfig, save_quantized


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["zoo:deit-fmnist", "zoo:swin-fmnist"])
    p.add_argument("--settings", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--calib", default="real")
    p.add_argument("--acm", default="auto", choices=ACM_KINDS)
    p.add_argument("--presets", nargs="+", default=["repq-comp"], choices=sorted(PRESETS))
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            model, data_config, spec = load_model(model_name)
            evalset = EvalSet.from_dataset(make_dataset(FASHION_MNIST, data_config, split="test"))
            fp = evalset.set_reference(model, progress=False)
            for setting, preset in itertools.product(args.settings, args.presets):
                w, a = (int(x) for x in setting.upper().lstrip("W").split("A"))
                qconfig = QuantConfig(w_bits=w, a_bits=a, preset=preset)
                options = {"data": FASHION_MNIST} if args.calib == "real" else {"progress": False}
                acm = ACMConfig(kind=args.acm).resolved(a)
                qmodel, row, _ = run_quantization(model, data_config, qconfig, CalibSpec(args.calib, 32, 0, options),
                                                  evalset, acm=acm, progress=False)
                out = Path(tmp) / f"{model_name.removeprefix('zoo:')}-{setting}-{preset}"
                save_quantized(qmodel, spec, qconfig, out, extra={"acm": acm.to_dict()})
                size = json.loads((out / "quantization_config.json").read_text())["size"]
                report = export_onnx(qmodel, out / "model.onnx", data_config, verify=False)
                ort_logits = evalset.evaluate(OnnxModel(out / "model.onnx"), progress=False)[1]
                sim_logits = evalset.evaluate(qmodel, progress=False)[1]
                ort = score(ort_logits, evalset.targets, reference_logits=sim_logits)
                rows.append([model_name, setting, preset, f"{fp.top1:.2f}", f"{row['top1']:.2f}", f"{ort.top1:.2f}",
                             f"{ort.top1 - row['top1']:+.2f}", f"{ort.agreement:.2f}",
                             f"{size['model_safetensors_bytes']:,} / {size['fp32_safetensors_bytes']:,} = {size['ratio']:.3f}×",
                             f"{sum(report.integer_ops.values())} / {sum(report.float_matmul_ops.values())}"])
                print(rows[-1], flush=True)
    publish("export-accuracy", "export_accuracy.py", argv,
            f"calibration {args.calib}, 32 images, seed 0, ACM {args.acm}; 10k test images",
            markdown_table(["model", "setting", "preset", "FP32 top-1", "PyTorch sim top-1", "ORT int top-1", "ORT − sim",
                            "ORT/sim agreement %", "packed file / FP32 safetensors (bytes)",
                            "ORT integer kernels / float MatMuls"], rows), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
