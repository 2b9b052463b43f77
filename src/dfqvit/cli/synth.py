"""``dfqvit synth``: synthesize a data-free calibration set once, to look at (PNG grid) and to
reuse (``quantize --calib-file``)."""
from __future__ import annotations

import argparse

import torch

from ..fileio import refuse_existing
from ..models import build_model, resolve_data_config
from .args import (add_device_arg, add_model_args, add_quant_args, calib_spec_from_args, quant_config_from_args,
                   spec_from_args, synth_fields_epilog)


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="synthesize calibration images data-free and save them",
                       epilog=synth_fields_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_device_arg(p.add_argument_group("device"))
    add_quant_args(p, sources=("dfq", "psaq"))
    p.add_argument("--out", required=True, help="images file (.safetensors); a .json sidecar and .png grid go next to it")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args) -> int:
    """Synthesize a calibration set once, for inspection and reuse (``quantize --calib-file``)."""
    import time
    from dataclasses import asdict, is_dataclass

    from ..calib import make_source
    from ..calib.cache import file_sha256, save_calibration_file
    from ..pipeline import calibration_images, check_calibration_fits

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
