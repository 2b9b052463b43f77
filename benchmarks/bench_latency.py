"""CPU latency: PyTorch FP32 vs ONNX Runtime FP32 vs ONNX Runtime int8 (our QDQ export).

All variants run in the same process on the same inputs: warm-up, then the median of
repeated runs, at batch 1 and 32 (``--batch-sizes``). Ratios are speed-ups over PyTorch FP32
(>1 = faster). The CPU model, its integer instruction-set flags (AVX2, AVX-VNNI,
AVX512-VNNI, AMX) and ONNX Runtime's graph-optimised kernel counts are printed with the
table, because int8 speed-ups depend on them. When ORT int8 is not faster than ORT FP32,
both are profiled (``enable_profiling``) and the time per op type is printed.

Examples::

    python benchmarks/bench_latency.py --model zoo:deit-fmnist --w-bits 4 --a-bits 8
    python benchmarks/bench_latency.py --model zoo:deit-fmnist --calib real --markdown
    python benchmarks/bench_latency.py --model vit_tiny_patch16_224 \\
        --model-kwargs img_size=28 patch_size=7 in_chans=1 num_classes=10 embed_dim=32 depth=2 num_heads=2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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

ISA_FLAGS = {"avx2": "AVX2", "avx_vnni": "AVX-VNNI", "avx512f": "AVX512F", "avx512_vnni": "AVX512-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX-TILE", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}


def cpu_info() -> dict:
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", "unknown CPU", platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": name, "isa": {label: flag in flags for flag, label in ISA_FLAGS.items()},
            "logical_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


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
    p.add_argument("--model", default="zoo:deit-fmnist")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--preset", default="repq")
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


def run(args) -> dict:
    from dfqvit.export import export_float_onnx, export_onnx, make_session, optimized_op_counts, profile_ops
    from dfqvit.export.ort import session_options
    from dfqvit.models import load_model, parse_kwargs
    from dfqvit.quant import QuantConfig, quantize

    torch.set_num_threads(args.threads)
    model, data_config, spec = load_model(args.model, kwargs=parse_kwargs(args.model_kwargs))
    model.eval()
    qconfig = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, preset=args.preset)
    images = calibration(model, data_config, qconfig, args)
    qmodel, _ = quantize(model, qconfig, images)
    label = f"W{args.w_bits}A{args.a_bits}"
    result = {"model": args.model, "config": qconfig.to_dict(), "calib": args.calib, "threads": args.threads,
              "torch": torch.__version__, **cpu_info()}
    import onnxruntime as ort
    result["onnxruntime"] = ort.__version__

    has_log2 = any(type(m).__name__ == "Log2Quantizer" and m.active for m in qmodel.modules())
    modes = args.log2_softmax if has_log2 else args.log2_softmax[:1]
    with tempfile.TemporaryDirectory(prefix="dfqvit-bench-") as d:
        fp_path = Path(d) / "fp32.onnx"
        export_float_onnx(model, fp_path, data_config, opset=args.opset)
        result["ort_ops_fp32"] = optimized_op_counts(fp_path, args.threads)
        sessions = {"PyTorch FP32": model, f"PyTorch fake-quant {label} (simulation)": qmodel,
                    "ONNX Runtime FP32": make_session(fp_path, args.threads)}
        q_paths = {}
        result["export"] = {}
        for mode in modes:
            name = f"ONNX Runtime int8 QDQ {label}" + (f", softmax {mode}" if has_log2 else "")
            q_paths[name] = Path(d) / f"int8-{mode}.onnx"
            report = export_onnx(qmodel, q_paths[name], data_config, opset=args.opset, log2_softmax=mode,
                                 threads=args.threads)
            result["export"][name] = report.to_dict()
            sessions[name] = make_session(q_paths[name], args.threads)
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
                sim = qmodel(x).numpy()
            for name in q_paths:
                out = sessions[name].run(None, {"input": xn})[0]
                result.setdefault("int8_vs_simulation", {}).setdefault(name, {})[bs] = {
                    "max_abs_diff": float(np.abs(out - sim).max()),
                    "top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean() * 100)}
                if rows[name][bs] >= rows["ONNX Runtime FP32"][bs]:
                    slower_at.setdefault(name, bs)
        result["median_ms"] = rows
        if slower_at or args.profile:
            targets = slower_at or {name: args.batch_sizes[-1] for name in q_paths}
            result["profiles"] = {}
            for name, bs in targets.items():
                x = np.random.default_rng(0).standard_normal((bs, *data_config["input_size"])).astype(np.float32)
                for key, path in ((name, q_paths[name]), ("ONNX Runtime FP32", fp_path)):
                    def factory(prefix, path=path):
                        return ort.InferenceSession(str(path), session_options(args.threads, profile_prefix=prefix),
                                                    providers=["CPUExecutionProvider"])
                    result["profiles"][f"{key} @ batch {bs}"] = profile_ops(
                        factory, {"input": x}, runs=max(5, args.runs // 5), warmup=args.warmup)
    return result


def print_report(result: dict, markdown: bool) -> None:
    from dfqvit.export.ort import split_counts

    rows = result["median_ms"]
    base = rows["PyTorch FP32"]
    sizes = list(base)
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["isa"].items())
    print(f"CPU: {result['cpu']} ({result['logical_cpus']} logical CPUs, load avg {result['load_avg_1m']} at start); "
          f"threads {result['threads']}; torch {result['torch']}, onnxruntime {result['onnxruntime']}")
    print(f"ISA: {isa}")
    for name, rep in result["export"].items():
        integer, floating, _ = split_counts(rep["ort_ops"])
        print(f"{name}: ORT_ENABLE_ALL graph has integer kernels {integer or 'none'}, "
              f"float matmul/conv {floating or 'none'}; post-softmax {rep['softmax']}")
    _, fp_floating, _ = split_counts(result["ort_ops_fp32"])
    print(f"ONNX Runtime FP32: float matmul/conv {fp_floating or 'none'}")
    for name, checks in result["int8_vs_simulation"].items():
        for bs, chk in checks.items():
            print(f"{name} vs PyTorch simulation, batch {bs}: max |diff| {chk['max_abs_diff']:.3g}, "
                  f"top-1 agreement {chk['top1_agreement']:.1f}%")
    header = ["runtime"] + [f"batch {bs}: ms" for bs in sizes] + [f"batch {bs}: speed-up" for bs in sizes]
    table = [[name] + [f"{v[bs]:.3f}" for bs in sizes] + [f"{base[bs] / v[bs]:.2f}x" for bs in sizes]
             for name, v in rows.items()]
    print()
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for r in table:
            print("| " + " | ".join(r) + " |")
        print(f"\nMedian of {result.get('runs', '?')} runs after warm-up; speed-up = PyTorch FP32 time / time. "
              f"{result['cpu']}, {result['threads']} thread(s).")
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
    try:
        result = run(args)
    except UserError as e:
        print(f"bench_latency: error: {e}", file=sys.stderr)
        return 2
    result["runs"], result["warmup"] = args.runs, args.warmup
    print_report(result, args.markdown)
    if args.results_file:
        Path(args.results_file).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
