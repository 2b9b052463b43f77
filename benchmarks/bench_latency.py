"""CPU latency: PyTorch FP32 vs ONNX Runtime FP32 vs ORT's own ``quantize_static`` int8 vs our
integer exports (QDQ at each ``--settings`` bit-width and softmax mode; optionally weight-only
int4 as MatMulNBits).

All variants of a model run in the same process on the same inputs: warm-up, then the median
of repeated runs, at each of ``--batch-sizes``. Each row gets its ratio to PyTorch FP32 and to
ORT FP32 (time / ORT FP32 time: < 1 = faster). ``quantize_static`` (QDQ, per-channel int8
weights, uint8 activations; ``reduce_range`` on CPUs without VNNI, as ONNX Runtime advises)
is calibrated on the same images as ours. The CPU model, its integer instruction-set flags
(AVX2, AVX-VNNI, AVX512-VNNI, AMX) and ONNX Runtime's graph-optimised kernel counts are
printed with the table, because int8 speed-ups depend on them. When an integer model is not
faster than ORT FP32 (or with ``--profile``), both are profiled and the time per op type printed.

Examples::

    python benchmarks/bench_latency.py --models zoo:deit-fmnist --settings W4A8
    # issue 21: ImageNet shapes with random weights (time does not depend on the values)
    python benchmarks/bench_latency.py --models deit_tiny_patch16_224 deit_small_patch16_224 \\
        deit_base_patch16_224 swin_tiny_patch4_window7_224 --settings W8A8 W4A8 --batch-sizes 1 8 \\
        --threads 2 --quantize-static --weight-only-int4 --markdown
    python benchmarks/bench_latency.py --models vit_tiny_patch16_224 \\
        --model-kwargs img_size=28 patch_size=7 in_chans=1 num_classes=10 embed_dim=32 depth=2 num_heads=2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dfqvit.errors import UserError  # noqa: E402
from dfqvit.export.cpu import cpu_name, isa  # noqa: E402


def cpu_info() -> dict:
    return {"cpu": cpu_name(), "isa": isa(), "logical_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def median_ms(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def calibration(model, data_config, qconfig, args) -> torch.Tensor:
    from dfqvit.calib import CalibrationContext, make_source

    if args.calib == "noise":
        return make_source("noise").generate(model, args.calib_size, CalibrationContext(data_config, seed=args.seed))
    from dfqvit.pipeline import CalibSpec, calibration_images

    options = {"data": args.data, "data_dir": args.data_dir} if args.calib == "real" else {}
    return calibration_images(model, data_config, qconfig, CalibSpec(args.calib, args.calib_size, args.seed, options))


def parse_args(argv=None):
    from dfqvit.export.qdq import LOG2_MODES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", "--model", nargs="+", default=["zoo:deit-fmnist"],
                   help="zoo:NAME or timm names (random weights unless zoo)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="applied to every model")
    p.add_argument("--settings", nargs="+", default=["W4A8"], help="bit-widths of our exports, e.g. W8A8 W4A8")
    p.add_argument("--preset", default="repq-comp")
    p.add_argument("--quantize-static", action="store_true",
                   help="add ONNX Runtime's own quantize_static int8 model, calibrated on the same images")
    p.add_argument("--weight-formats", nargs="+", default=["int8"], choices=["int8", "int8-vnni"],
                   help="weight containers of the QDQ exports (int8-vnni differs only for 8-bit weights)")
    p.add_argument("--weight-only-int4", action="store_true",
                   help="add our weight-only W4 export (float activations, UINT4 weights -> MatMulNBits)")
    p.add_argument("--calib", default="noise", help="noise (default), real, or a data-free source (dfq, psaq)")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--data", default=None, help="dataset for --calib real (default fashion-mnist)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for PyTorch and ONNX Runtime (default 1: stable on a shared machine)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--log2-softmax", nargs="+", default=["emulate", "uint8"], choices=LOG2_MODES,
                   help="export mode(s) of the post-softmax log2 quantizer; one ORT int8 row each "
                        "(default: emulate = exact, and uint8 = approximation with integer attn·V)")
    p.add_argument("--profile", action="store_true", help="always print the ORT per-op profile")
    p.add_argument("--markdown", action="store_true", help="print a markdown table for docs/RESULTS.md")
    p.add_argument("--results-file", help="write all numbers as JSON")
    args = p.parse_args(argv)
    if args.calib == "real" and args.data is None and args.data_dir is None:
        args.data = "fashion-mnist"
    return args


def parse_setting(text: str) -> tuple[int, int]:
    w, _, a = text.upper().removeprefix("W").partition("A")
    try:
        return int(w), int(a)
    except ValueError:
        raise UserError(f"bad setting {text!r}: expected e.g. W8A8 or W4A8") from None


def ort_quantize_static(fp_path: Path, out: Path, images: torch.Tensor, vnni: bool) -> None:
    """ONNX Runtime's own static int8 quantization of the FP32 model: what a user would pick instead."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": b.numpy()} for b in images.split(8)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # its "consider pre-processing" / "bias is not an initializer" warnings
    try:
        quantize_static(str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=not vnni)
    finally:
        root.setLevel(level)


def measure(model_name: str, args) -> dict:
    """Every runtime of one model, timed on the same inputs."""
    from dfqvit.export import export_float_onnx, export_onnx, make_session, optimized_op_counts, profile_ops
    from dfqvit.export.ort import session_options
    from dfqvit.models import load_model, parse_kwargs
    from dfqvit.quant import QuantConfig, quantize

    model, data_config, spec = load_model(model_name, kwargs=parse_kwargs(args.model_kwargs))
    model.eval()
    settings = [parse_setting(t) for t in args.settings]
    images = calibration(model, data_config, QuantConfig(w_bits=settings[0][0], a_bits=settings[0][1],
                                                         preset=args.preset), args)
    info = cpu_info()
    result = {"model": model_name, "input_size": list(data_config["input_size"]), "preset": args.preset,
              "calib": args.calib, "threads": args.threads, "torch": torch.__version__, **info}
    import onnxruntime as ort
    result["onnxruntime"] = ort.__version__
    with tempfile.TemporaryDirectory(prefix="dfqvit-bench-") as d:
        fp_path = Path(d) / "fp32.onnx"
        export_float_onnx(model, fp_path, data_config, opset=args.opset)
        result["ort_ops_fp32"] = optimized_op_counts(fp_path, args.threads)
        sessions = {"PyTorch FP32": model, "ONNX Runtime FP32": make_session(fp_path, args.threads)}
        paths, simulations, result["export"] = {"ONNX Runtime FP32": fp_path}, {}, {}
        if args.quantize_static:
            name = "ORT quantize_static int8 (QDQ, per-channel)"
            paths[name] = Path(d) / "ort-static.onnx"
            ort_quantize_static(fp_path, paths[name], images, vnni=info["isa"]["AVX-VNNI"] or info["isa"]["AVX512-VNNI"])
            result["export"][name] = {"ort_ops": optimized_op_counts(paths[name], args.threads)}
            sessions[name] = make_session(paths[name], args.threads)
        exports = [(w, a, mode, fmt, args.opset) for w, a in settings for fmt in args.weight_formats
                   for mode in args.log2_softmax if fmt == "int8" or w == 8]
        if args.weight_only_int4:
            exports.append((4, 32, args.log2_softmax[0], "int4", max(21, args.opset)))
        for w, a, mode, weight_format, opset in exports:
            qmodel, _ = quantize(model, QuantConfig(w_bits=w, a_bits=a, preset=args.preset), images)
            has_log2 = any(type(m).__name__ == "Log2Quantizer" and m.active for m in qmodel.modules())
            if not has_log2 and mode != args.log2_softmax[0]:
                continue   # the softmax mode changes nothing without a post-softmax quantizer
            name = (f"dfqvit W{w} weight-only (int4, MatMulNBits)" if a > 8 else
                    f"dfqvit W{w}A{a} QDQ" + (f" {weight_format}" if weight_format != "int8" else "")
                    + (f", softmax {mode}" if has_log2 else ""))
            paths[name] = Path(d) / f"q-{len(paths)}.onnx"
            report = export_onnx(qmodel, paths[name], data_config, opset=opset, log2_softmax=mode,
                                 weight_format=weight_format, threads=args.threads)
            result["export"][name] = report.to_dict()
            sessions[name], simulations[name] = make_session(paths[name], args.threads), qmodel
        rows = {name: {} for name in sessions}
        slower_at = {}
        for bs in args.batch_sizes:
            x = torch.randn(bs, *data_config["input_size"], generator=torch.Generator().manual_seed(bs))
            xn = x.numpy()
            with torch.inference_mode():
                for name, runner in sessions.items():
                    fn = (lambda r=runner: r(x)) if isinstance(runner, torch.nn.Module) else \
                        (lambda r=runner: r.run(None, {"input": xn}))
                    rows[name][bs] = median_ms(fn, args.warmup, args.runs)
                for name, qmodel in simulations.items():
                    sim = qmodel(x).numpy()
                    out = sessions[name].run(None, {"input": xn})[0]
                    result.setdefault("vs_simulation", {}).setdefault(name, {})[bs] = {
                        "max_abs_diff": float(np.abs(out - sim).max()),
                        "top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean() * 100)}
            for name in paths:
                if name != "ONNX Runtime FP32" and rows[name][bs] >= rows["ONNX Runtime FP32"][bs]:
                    slower_at.setdefault(name, bs)
        result["median_ms"] = rows
        if slower_at or args.profile:
            targets = slower_at or {name: args.batch_sizes[-1] for name in paths if name != "ONNX Runtime FP32"}
            result["profiles"] = {}
            for name, bs in targets.items():
                x = np.random.default_rng(0).standard_normal((bs, *data_config["input_size"])).astype(np.float32)
                for key in (name, "ONNX Runtime FP32"):
                    def factory(prefix, path=paths[key]):
                        return ort.InferenceSession(str(path), session_options(args.threads, profile_prefix=prefix),
                                                    providers=["CPUExecutionProvider"])
                    result["profiles"].setdefault(f"{key} @ batch {bs}", profile_ops(
                        factory, {"input": x}, runs=max(5, args.runs // 5), warmup=args.warmup))
    return result


def print_report(result: dict, markdown: bool) -> None:
    from dfqvit.export.ort import split_counts

    rows = result["median_ms"]
    torch_fp, ort_fp = rows["PyTorch FP32"], rows["ONNX Runtime FP32"]
    sizes = list(torch_fp)
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["isa"].items())
    print(f"\n## {result['model']} (input {'x'.join(map(str, result['input_size']))})")
    print(f"CPU: {result['cpu']} ({result['logical_cpus']} logical CPUs, load avg {result['load_avg_1m']} at start); "
          f"threads {result['threads']}; torch {result['torch']}, onnxruntime {result['onnxruntime']}")
    print(f"ISA: {isa}")
    for name, rep in result["export"].items():
        integer, floating, _ = split_counts(rep["ort_ops"])
        print(f"{name}: ORT_ENABLE_ALL graph has integer kernels {integer or 'none'}, "
              f"float matmul/conv {floating or 'none'}" + (f"; post-softmax {rep['softmax']}" if "softmax" in rep else ""))
    _, fp_floating, _ = split_counts(result["ort_ops_fp32"])
    print(f"ONNX Runtime FP32: float matmul/conv {fp_floating or 'none'}")
    for name, checks in result.get("vs_simulation", {}).items():
        for bs, chk in checks.items():
            print(f"{name} vs PyTorch simulation, batch {bs}: max |diff| {chk['max_abs_diff']:.3g}, "
                  f"top-1 agreement {chk['top1_agreement']:.1f}%")
    header = (["runtime"] + [f"batch {bs}: ms" for bs in sizes] + [f"batch {bs}: / ORT FP32" for bs in sizes]
              + [f"batch {bs}: speed-up vs PyTorch" for bs in sizes])
    table = [[name] + [f"{v[bs]:.2f}" for bs in sizes] + [f"{v[bs] / ort_fp[bs]:.2f}" for bs in sizes]
             + [f"{torch_fp[bs] / v[bs]:.2f}x" for bs in sizes] for name, v in rows.items()]
    print()
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in table:
            print("| " + " | ".join(r) + " |")
        print(f"\nMedian of {result.get('runs', '?')} runs after warm-up; / ORT FP32 = time / ORT FP32 time "
              f"(< 1: faster). {result['cpu']}, {result['threads']} thread(s).")
    else:
        widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
        for r in [header] + table:
            print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for key, prof in result.get("profiles", {}).items():
        print(f"\nORT profile of {key} (ms per run by op type):")
        total = sum(ms for _, ms, _ in prof) or 1.0
        for op, ms, nodes in prof[:12]:
            print(f"  {op:28s} {ms:8.3f} ms  {100 * ms / total:5.1f}%  ({nodes} nodes)")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    try:
        for model_name in args.models:
            result = measure(model_name, args)
            result["runs"], result["warmup"] = args.runs, args.warmup
            print_report(result, args.markdown)
            results[model_name] = result
    except UserError as e:
        print(f"bench_latency: error: {e}", file=sys.stderr)
        return 2
    if args.results_file:
        Path(args.results_file).write_text(json.dumps({"models": results}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
