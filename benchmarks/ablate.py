"""Accuracy tables: calibration sources × bit-widths × presets × ACM on the zoo models.

Every method is evaluated on the zoo model's test split (its card's dataset) against the FP32 model in the
same process (top-1, agreement with FP32, KL(FP32 ‖ Q)), mean ± std over seeds. Synthesized
calibration sets are cached under ``runs/calib-cache`` so reruns only pay for evaluation.

Examples::

    python benchmarks/ablate.py --table ptq        # issue 3: noise/real × presets × bit-widths
    python benchmarks/ablate.py --table quantizer  # issue 18: repq-vit vs the default, smooth noise / dfq / real
    python benchmarks/ablate.py --table sources --models zoo:deit-scenes   # issue 22: does the zoo discriminate?
    python benchmarks/ablate.py --table acm        # issue 5: noise, psaq, dfq ± ACM, real ± ACM
    python benchmarks/ablate.py --table acm --write   # also update docs/RESULTS.md
    python benchmarks/ablate.py --table acm-variants   # issue 5: the ACM's ridge, placement and target
    python benchmarks/ablate.py --table components   # issue 4: dfq with each component off
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field

import torch
from common import ROOT, markdown_table, mean_std, model_dataset, publish

from dfqvit.acm import ACMConfig
from dfqvit.calib.base import make_source
from dfqvit.calib.cache import file_sha256, load_calibration_file, save_calibration_file, sidecar_path
from dfqvit.data import FASHION_MNIST, make_dataset
from dfqvit.models import load_model
from dfqvit.pipeline import CalibSpec, EvalSet, calibration_images, run_quantization
from dfqvit.quant import QuantConfig

CACHE = ROOT / "runs" / "calib-cache"


SYNTHESIZED = ("psaq", "dfq")   # sources whose images are cached and timed
SMOOTH = (("slope", 2.0),)      # smooth 1/f² noise: dfq's start, with no synthesis step
PIXEL = (("parameterization", "pixel"),)   # dfq whose Adam steps move pixels (white) instead of 1/f^slope coefficients


@dataclass(frozen=True)
class Method:
    label: str
    calib: str
    acm: str = "off"
    preset: str = "repq-comp"
    synth_opts: tuple = ()
    mined: bool = False   # images depend on the quantization setting (hard-example mining)
    acm_opts: tuple = ()  # ACMConfig fields besides the kind: where, target, ridge, noise_share


TABLES = {
    "ptq": dict(
        settings=[(8, 8), (6, 6), (4, 8), (4, 4), (3, 8), (3, 4)],
        methods=[Method(f"{c} {p}", c, preset=p) for p in ("repq", "repq-vit", "minmax") for c in ("noise", "real")]),
    "quantizer": dict(
        settings=[(4, 4), (3, 4), (3, 8), (4, 8), (6, 6)],
        methods=[m for p in ("repq-vit", "repq-comp") for m in (
            Method(f"smooth noise {p}", "noise", preset=p, synth_opts=SMOOTH),
            Method(f"dfq {p}", "dfq", preset=p, mined=True), Method(f"real {p}", "real", preset=p))]),
    # issue 22: does a zoo model discriminate between calibration sources?
    "sources": dict(
        settings=[(4, 4), (3, 4), (4, 8)],
        methods=[m for p in ("repq-vit", "repq-comp") for m in (
            Method(f"white noise {p}", "noise", preset=p), Method(f"smooth noise {p}", "noise", preset=p, synth_opts=SMOOTH),
            Method(f"psaq {p}", "psaq", preset=p), Method(f"dfq {p}", "dfq", preset=p, mined=True),
            Method(f"dfq pixel {p}", "dfq", preset=p, mined=True, synth_opts=PIXEL),
            Method(f"real {p}", "real", preset=p))]),
    "calib": dict(
        settings=[(4, 8), (6, 6), (4, 4), (3, 4)],
        methods=[Method("noise", "noise"), Method("smooth noise", "noise", synth_opts=SMOOTH),
                 Method("psaq", "psaq"), Method("dfq", "dfq", mined=True), Method("real", "real")]),
    "acm": dict(
        settings=[(3, 8), (4, 8), (4, 4), (6, 6)],
        methods=[Method("noise", "noise"), Method("smooth noise", "noise", synth_opts=SMOOTH),
                 Method("smooth noise + ACM diag", "noise", acm="diag", synth_opts=SMOOTH),
                 Method("smooth noise + ACM full", "noise", acm="full", synth_opts=SMOOTH),
                 Method("psaq", "psaq"), Method("dfq", "dfq", mined=True),
                 Method("dfq + ACM diag", "dfq", acm="diag", mined=True),
                 Method("dfq + ACM full", "dfq", acm="full", mined=True), Method("real", "real"),
                 Method("real + ACM diag", "real", acm="diag"), Method("real + ACM full", "real", acm="full")]),
    # issue 5: where the full map misses its bar (W3A8), the ACM's other options on the same dfq images.
    "acm-variants": dict(
        settings=[(3, 8)],
        methods=[Method("dfq", "dfq", mined=True), Method("dfq + ACM full", "dfq", acm="full", mined=True),
                 *(Method(f"dfq + ACM full, {label}", "dfq", acm="full", mined=True, acm_opts=opts) for label, opts in (
                     ("no noise", (("noise_share", 0.0),)), ("noise 1", (("noise_share", 1.0),)),
                     ("ridge 0.3", (("ridge", 0.3),)), ("ridge 3", (("ridge", 3.0),)),
                     ("branches", (("where", "branch"),)), ("fp-module target", (("target", "fp_module"),)))),
                 Method("real", "real"), Method("real + ACM full", "real", acm="full"),
                 Method("real + ACM full, no noise", "real", acm="full", acm_opts=(("noise_share", 0.0),))]),
    # issue 4: each dfq component switched off alone (ACM off), between noise and real for scale.
    "components": dict(
        settings=[(3, 8), (4, 8), (4, 4), (6, 6)],
        methods=[Method("noise", "noise"), Method("smooth noise", "noise", synth_opts=SMOOTH),
                 Method("dfq", "dfq", mined=True),
                 *(Method(label, "dfq", synth_opts=((switch, value),), mined=True) for label, switch, value in (
                     ("− E2H (1 stage, so no mining)", "e2h_stages", 1), ("− hard mining", "hard_mining", False),
                     ("− local crops", "local_crops", False), ("− patch entropy", "patch_entropy", False),
                     ("− TV prior", "tv_prior", False), ("− smooth start (white noise)", "init_slope", 0.0),
                     ("− unoptimised starts", "start_share", 0.0))),
                 Method("− spectral steps (pixel steps)", "dfq", synth_opts=PIXEL, mined=True),
                 Method("real", "real")]),
}


@dataclass
class Cell:
    top1: list = field(default_factory=list)
    agreement: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    seconds: list = field(default_factory=list)


def config_digest(config) -> str:
    """Short hash of the fields of a synthesis config that change the images."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("progress", "log_every")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:8]


def cached_images(model, data_config, model_tag, method: Method, qconfig, seed, size,
                  synth_opts: dict, data: str = FASHION_MNIST) -> tuple[torch.Tensor, float]:
    """(images, seconds it took to make them); synthesized sets are cached on disk, keyed by
    ``model_tag`` (name and checkpoint hash, so a retrained model never reuses old images), a
    digest of the whole synthesis config (so a changed default never reuses old images) and,
    for mined images, of the preset's scheme."""
    # Mined images depend on the preset's numerics, not only its name.
    scheme = hashlib.sha256(json.dumps(dataclasses.asdict(qconfig.scheme), sort_keys=True).encode()).hexdigest()[:6]
    tag = f"w{qconfig.w_bits}a{qconfig.a_bits}-{qconfig.preset}-{scheme}-" if method.mined else ""
    synth_opts = {**synth_opts, **dict(method.synth_opts)}
    synthesized = method.calib in SYNTHESIZED
    calib = CalibSpec(method.calib, size, seed, options={**synth_opts, "progress": False} if synthesized
                      else ({"data": data} if method.calib == "real" else synth_opts))
    source = make_source(calib.source, **calib.options)
    opts = "-".join(f"{k}={v}" for k, v in sorted(synth_opts.items()))
    digest = config_digest(source.config) if synthesized else ""
    path = CACHE / f"{model_tag}-{method.calib}{'-' + opts if opts else ''}-{digest}-{tag}n{size}-s{seed}.safetensors"
    if path.exists():
        return load_calibration_file(path, data_config), json.loads(sidecar_path(path).read_text())["seconds"]
    start = time.perf_counter()
    images = calibration_images(model, data_config, qconfig, calib, source=source)
    seconds = time.perf_counter() - start
    if synthesized:
        save_calibration_file(path, images, data_config, {"source": method.calib, "seed": seed, "seconds": seconds,
                                                          "options": synth_opts})
    return images, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=sorted(TABLES), required=True)
    parser.add_argument("--models", nargs="+", default=["zoo:deit-fmnist", "zoo:swin-fmnist"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", help="override bit settings, e.g. W4A8 W3A4")
    parser.add_argument("--methods", nargs="+", help="only these method labels")
    parser.add_argument("--preset", help="quantizer preset for every method (default: each method's own)")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=10000, help="test images used (all 10k by default)")
    parser.add_argument("--mine-at", help="mine dfq images against this one setting (e.g. W4A4) and reuse them "
                        "for every setting; default: mine against each setting")
    parser.add_argument("--psaq-iters", type=int, help="psaq iterations per round (default: the source's 500)")
    parser.add_argument("--dfq-iters", type=int, help="dfq iterations per stage (default: the source's)")
    parser.add_argument("--write", action="store_true", help="update the table's section of docs/RESULTS.md")
    args = parser.parse_args(argv)
    if args.preset and args.table == "ptq":
        parser.error("--preset does not apply to the ptq table: its columns are the presets")

    table = TABLES[args.table]
    def parse_setting(text):
        return tuple(int(x) for x in text.upper().lstrip("W").split("A"))

    settings = [parse_setting(s) for s in args.settings] if args.settings else table["settings"]
    mine_at = parse_setting(args.mine_at) if args.mine_at else None
    synth_opts = {"psaq": {"iterations": args.psaq_iters} if args.psaq_iters else {},
                  "dfq": {"iterations": args.dfq_iters} if args.dfq_iters else {}}
    labels = [m.label for m in table["methods"]]
    unknown = [label for label in args.methods or [] if label not in labels]
    if unknown:
        parser.error(f"--methods {', '.join(map(repr, unknown))}: the {args.table} table's methods are "
                     + ", ".join(map(repr, labels)))
    methods = [m for m in table["methods"] if not args.methods or m.label in args.methods]
    if args.preset:
        methods = [dataclasses.replace(m, preset=args.preset) for m in methods]
    sections = []
    for model_name in args.models:
        model, data_config, spec = load_model(model_name)
        model_tag = model_name.replace(":", "_") + (f"-{file_sha256(spec.checkpoint)[:12]}" if spec.checkpoint else "")
        data = model_dataset(model_name)
        dataset = make_dataset(data, data_config, split="test")
        evalset = EvalSet.from_dataset(dataset, limit=args.eval_size)
        fp = evalset.set_reference(model, progress=False)
        cells: dict = {}
        synth_seconds: dict = {}
        for w, a in settings:
            for m in methods:
                cell = cells.setdefault((w, a, m.label), Cell())
                for seed in args.seeds:
                    qconfig = QuantConfig(w_bits=w, a_bits=a, preset=m.preset)
                    mine_config = QuantConfig(w_bits=mine_at[0], a_bits=mine_at[1], preset=m.preset) if mine_at else qconfig
                    start = time.perf_counter()
                    images, made_in = cached_images(model, data_config, model_tag, m, mine_config, seed,
                                                    args.calib_size, synth_opts.get(m.calib, {}), data)
                    if m.calib in SYNTHESIZED:
                        timed_as = m.label if m.synth_opts else m.calib   # a synthesis variant is timed on its own
                        synth_seconds.setdefault(timed_as, {})[(mine_config.w_bits, mine_config.a_bits, seed)] = made_in
                    _, row, _ = run_quantization(model, data_config, qconfig,
                                                 CalibSpec(m.calib, len(images), seed, images=images),
                                                 evalset, acm=ACMConfig(kind=m.acm, **dict(m.acm_opts)),
                                                 progress=False)
                    cell.top1.append(row["top1"])
                    cell.agreement.append(row["agreement"])
                    cell.kl.append(row["kl"])
                    cell.seconds.append(time.perf_counter() - start)
                print(f"{model_name} W{w}A{a} {m.label:12s} top1 {mean_std(cell.top1)}  agree "
                      f"{mean_std(cell.agreement)}  KL {mean_std(cell.kl, 4)}", flush=True)
        header = ["setting"] + [m.label for m in methods]
        rows = []
        for w, a in settings:
            rows.append([f"W{w}A{a}"] + [
                f"{mean_std(c.top1)} / {mean_std(c.agreement)} / {mean_std(c.kl, 4)}"
                for c in (cells[(w, a, m.label)] for m in methods)])
        times = ", ".join(f"{src} {mean_std(list(v.values()), 1)} s" for src, v in synth_seconds.items())
        sections.append(f"**{model_name}** (FP32 top-1 {fp.top1:.2f}%) — each cell: top-1 % / agreement "
                        f"with FP32 % / KL(FP32‖Q) nats, mean ± std over seeds {args.seeds}"
                        + (f"; CPU synthesis time per {args.calib_size}-image set: {times}" if times else "")
                        + "\n\n" + markdown_table(header, rows))
    # A subset of the table (preset, settings, methods) gets its own section: it never replaces the full one.
    subset = [args.preset] + (args.settings or []) + (args.methods or [])
    section = "-".join(["ablate", args.table, "+".join(m.removeprefix("zoo:") for m in args.models)]
                       + [part.replace(" ", "_") for part in subset if part])
    publish(section, "ablate.py", argv,
            f"{args.calib_size} calibration images, {args.eval_size} test images", "\n\n".join(sections), args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
