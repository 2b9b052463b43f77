"""Time the data-free synthesis (``psaq``, ``dfq`` and ablations) per model and configuration.

Prints one table row per (model, configuration): optimisation steps, seconds, ms/step and
images/s, plus the warm-up time (torch.compile compilation when ``--compile``). Every number
comes from one process, so the ratios between rows are the meaningful part.

Examples::

    python benchmarks/bench_synthesis.py                       # CPU: small models, short runs
    python benchmarks/bench_synthesis.py --device cuda --iters 1000            # CUDA graphs (default)
    python benchmarks/bench_synthesis.py --device cuda --no-cuda-graph          # eager, for the ratio
    python benchmarks/bench_synthesis.py --device cuda --compile --compile-mode reduce-overhead
    python benchmarks/bench_synthesis.py --models zoo:deit-fmnist --configs psaq,dfq --iters 100

Models: ``zoo:NAME`` (a bundled checkpoint, via ``dfqvit.models.load_model``), a preset below,
or any timm name (random init, timm's input size). Defaults: on CPU the presets
``deit-fmnist-arch`` and ``swin-28`` plus ``zoo:deit-fmnist`` when its checkpoint exists; on
CUDA ``deit_tiny_patch16_224`` and ``deit_base_patch16_224`` (random init, 224x224x3).

``--mining`` adds hard-example mining to ``dfq`` against the real quantizer (preset repq at
``--mining-bits``, W4A8 by default): its calibration time and the quantized forward/backward
are included in the timing, as in ``dfqvit quantize``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dfqvit.calib import CalibrationContext, make_source  # noqa: E402
from dfqvit.models import ZOO_DIR, load_model, resolve_data_config  # noqa: E402
from dfqvit.quant import QuantConfig, quantize  # noqa: E402

PRESETS = {
    # the architecture of zoo:deit-fmnist, random init (1.2M parameters, 49 patches, 6 blocks)
    "deit-fmnist-arch": ("deit_tiny_patch16_224", dict(img_size=28, patch_size=4, in_chans=1, num_classes=10,
                                                        embed_dim=128, depth=6, num_heads=4),
                         {"mean": (0.286,), "std": (0.353,)}),
    "swin-28": ("swin_tiny_patch4_window7_224", dict(img_size=28, patch_size=2, in_chans=1, num_classes=10,
                                                      embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7),
                {"mean": (0.286,), "std": (0.353,)}),
}

CONFIGS = {
    "ce-only": ("psaq", dict(rounds=1, patch_entropy=False, tv_prior=False)),  # the bare step
    "psaq": ("psaq", dict(rounds=1)),
    "dfq": ("dfq", dict(e2h_stages=1)),
    "dfq-e2h": ("dfq", dict()),
    "dfq-no-local": ("dfq", dict(e2h_stages=1, local_crops=False)),
    "dfq-no-entropy": ("dfq", dict(e2h_stages=1, patch_entropy=False)),
}
DEFAULT_CONFIGS = "ce-only,psaq,dfq,dfq-e2h"


def build(name: str):
    """(model, data_config) for a zoo name, a preset or a timm name."""
    if name.startswith("zoo:"):
        model, data_config, _ = load_model(name)
        return model, data_config
    if name in PRESETS:
        timm_name, kwargs, overrides = PRESETS[name]
        model = timm.create_model(timm_name, **kwargs).eval()
        return model, resolve_data_config(model, overrides)
    model = timm.create_model(name, pretrained=False).eval()
    return model, resolve_data_config(model)


def real_quantizer(model: nn.Module, w_bits: int, a_bits: int):
    """The quantizer ``dfqvit quantize`` mines against: a calibrated repq copy of ``model``."""
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    device = str(next(model.parameters()).device)
    return lambda images: quantize(model, config, images, device=device)[0]


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_one(model, data_config, config_name: str, args) -> dict:
    source_name, overrides = CONFIGS[config_name]
    overrides = {**overrides, "batch_size": args.batch, "iterations": args.iters, "progress": args.progress,
                 "compile": args.compile, "cuda_graph": args.cuda_graph}
    if args.compile_mode:
        overrides["compile_mode"] = args.compile_mode
    if source_name == "dfq" and not args.mining:
        overrides["hard_mining"] = False
    model = model.to(args.device)
    if args.compile:
        torch._dynamo.reset()  # a fresh compile per row: no recompile-limit fallback to eager
    mine = real_quantizer(model, *args.mining_bits) if (args.mining and source_name == "dfq") else None
    ctx = CalibrationContext(data_config=data_config, seed=args.seed, device=args.device, quantize=mine)
    # warm-up: compilation (with --compile) and allocator / kernel warm-up, same shapes
    warm = make_source(source_name, **{**overrides, "iterations": 2 if not args.compile else max(2, args.iters // 10)})
    t0 = time.perf_counter()
    warm.generate(model, args.batch, ctx)
    sync(args.device)
    warm_s = time.perf_counter() - t0
    src = make_source(source_name, **overrides)
    t0 = time.perf_counter()
    images = src.generate(model, args.batch, ctx)
    sync(args.device)
    seconds = time.perf_counter() - t0
    steps = src.stats["steps"]
    return {"config": config_name, "steps": steps, "seconds": seconds, "ms_per_step": 1000 * seconds / steps,
            "images_per_s": images.shape[0] / seconds, "warmup_s": warm_s,
            "ce": src.stats["last_batch"]["ce"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=None,
                   help="comma-separated: zoo:NAME, a preset (%s) or a timm name" % ", ".join(PRESETS))
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated, from: %s" % ", ".join(CONFIGS))
    p.add_argument("--iters", type=int, default=None,
                   help="iterations per round/stage (default: 40 on CPU, 200 on CUDA)")
    p.add_argument("--batch", type=int, default=32, help="images per run (= batch size)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="CUDA: run every step eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile the synthesis step (no CUDA graph)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--mining", action="store_true", help="dfq: hard-example mining against the real quantizer")
    p.add_argument("--mining-bits", type=int, nargs=2, default=(4, 8), metavar=("W", "A"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="show the tqdm bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.iters is None:
        args.iters = 200 if cuda else 40
    if args.models is None:
        names = ["deit_tiny_patch16_224", "deit_base_patch16_224"] if cuda else list(PRESETS)
        if not cuda and (ZOO_DIR / "deit-fmnist.safetensors").is_file():
            names.append("zoo:deit-fmnist")
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")

    dev_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# synthesis benchmark: {dev_name}; torch {torch.__version__}; batch {args.batch}; "
          f"iters {args.iters}/round|stage; compile={args.compile}"
          f"{' (' + args.compile_mode + ')' if args.compile_mode else ''}; "
          f"cuda_graph={cuda and args.cuda_graph and not args.compile}; "
          f"bf16 autocast={'on' if cuda else 'off (CPU)'}; mining={'W%dA%d' % tuple(args.mining_bits) if args.mining else 'off'}")
    header = (f"{'model':<26} {'config':<15} {'steps':>6} {'seconds':>9} {'ms/step':>9} {'img/s':>8} "
              f"{'warmup s':>9} {'final CE':>9}")
    print(header)
    print("-" * len(header))
    for name in names:
        model, data_config = build(name)
        for config in configs:
            r = time_one(model, data_config, config, args)
            print(f"{name:<26} {r['config']:<15} {r['steps']:>6d} {r['seconds']:>9.2f} {r['ms_per_step']:>9.1f} "
                  f"{r['images_per_s']:>8.2f} {r['warmup_s']:>9.2f} {r['ce']:>9.3f}", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
