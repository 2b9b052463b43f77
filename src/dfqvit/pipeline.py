"""The quantization run shared by the CLI and the benchmarks: calibration images → quantized
model → evaluation against the FP32 model, with per-stage timings."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from .acm import ACMConfig, correction_cost, fit_corrections
from .calib import CalibrationContext, make_source
from .errors import UserError, require_finite
from .evaluate import EvalResult, collect_logits, score
from .models import count_params
from .quant import QuantConfig, quantize
from .quant.size import weight_bytes


@dataclass
class EvalSet:
    """An evaluation split held as tensors, with the FP32 model's logits computed once."""

    images: torch.Tensor
    targets: torch.Tensor
    batch_size: int = 500
    fp_logits: torch.Tensor | None = None
    fp_seconds: float = 0.0

    @classmethod
    def from_dataset(cls, dataset, batch_size: int = 500, limit: int | None = None,
                     progress: bool = True) -> "EvalSet":
        """The whole ``dataset``, or its first ``limit`` items (only those are loaded; decoding
        a large image folder takes minutes, so it shows progress)."""
        if limit is not None:
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        loader = DataLoader(dataset, batch_size=1000)
        images, targets = zip(*tqdm(loader, desc="load evaluation set", disable=not progress, leave=False))
        return cls(torch.cat(images), torch.cat(targets), batch_size)

    def loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.targets), batch_size=self.batch_size)

    def evaluate(self, model, device="cpu", desc="eval", progress=True) -> tuple[EvalResult, torch.Tensor]:
        logits, targets, seconds = collect_logits(model, self.loader(), device, desc, progress)
        return score(logits, targets, seconds, self.fp_logits), logits

    def set_reference(self, fp_model, device="cpu", progress=True) -> EvalResult:
        result, self.fp_logits = self.evaluate(fp_model, device, "fp32", progress)
        self.fp_seconds = result.seconds
        return result


@dataclass
class CalibSpec:
    """Where calibration images come from."""

    source: str = "dfq"
    size: int = 32
    seed: int = 0
    options: dict = field(default_factory=dict)   # passed to the source's constructor
    images: torch.Tensor | None = None            # precomputed (``--calib-file``)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def calibration_bytes(model, data_config: dict, qconfig: QuantConfig, num_images: int) -> int:
    """An estimate of the memory ``quantize`` needs for ``num_images``: the images, and the
    activations of one pass over all of them at once (the calibration pass is one batch, and
    the compensating presets keep every Linear's FP output as its target). Measured by hooks
    on one image's forward pass."""
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *data_config["input_size"], device=device))
    finally:
        for h in hooks:
            h.remove()
    per_image = math.prod(data_config["input_size"]) + 4 * max(outputs, default=0)
    if qconfig.scheme.compensate:
        per_image += sum(outputs)
    return 4 * num_images * per_image


def check_calibration_fits(model, data_config: dict, qconfig: QuantConfig, num_images: int) -> None:
    """Refuse, before any work, a calibration set whose activations cannot fit in memory."""
    need, have = calibration_bytes(model, data_config, qconfig, num_images), available_memory_bytes()
    if have is not None and need > 0.8 * have:
        fits = max(1, int(num_images * 0.8 * have / need))
        raise UserError(f"--calib-size {num_images} needs about {need / 2**30:.1f} GiB for the calibration "
                        f"pass (images and activations held at once), but {have / 2**30:.1f} GiB is "
                        f"available; use --calib-size {fits} or fewer")


def calibration_images(model, data_config: dict, qconfig: QuantConfig, calib: CalibSpec,
                       device: str = "cpu", source=None, progress: bool = True) -> torch.Tensor:
    """``calib``'s images; ``source`` (made from ``calib`` if not given) does the work; hard-example
    mining's re-quantizations show their own progress."""
    if calib.images is not None:
        require_finite(calib.images, "the calibration images", "recreate the calibration file")
        return calib.images
    torch.manual_seed(calib.seed)
    ctx = CalibrationContext(
        data_config=data_config, seed=calib.seed, device=device,
        quantize=lambda images: quantize(model, qconfig, images, device=device, progress=progress)[0])
    source = source or make_source(calib.source, **calib.options)
    images = source.generate(model, calib.size, ctx)
    require_finite(images, f"the {calib.source} calibration images",
                   "the model's outputs or gradients overflowed during synthesis")
    return images


def run_quantization(model, data_config: dict, qconfig: QuantConfig, calib: CalibSpec,
                     evalset: EvalSet | None = None, acm: ACMConfig | None = None,
                     device: str = "cpu", progress: bool = True):
    """Calibration images → quantized model (→ activation correction) → evaluation.
    Returns (quantized model, result row, calibration images)."""
    seconds = {}
    check_calibration_fits(model, data_config, qconfig, len(calib.images) if calib.images is not None else calib.size)
    start = time.perf_counter()
    images = calibration_images(model, data_config, qconfig, calib, device, progress=progress)
    seconds["calibration_data"] = time.perf_counter() - start
    start = time.perf_counter()
    qmodel, report = quantize(model, qconfig, images, device=device, progress=progress)
    seconds["quantize"] = time.perf_counter() - start
    acm = (acm or ACMConfig(kind="off")).resolved(qconfig.a_bits)
    acm_row = {"acm": acm.kind}
    if acm.kind != "off":
        start = time.perf_counter()
        fit = fit_corrections(qmodel, model, images, acm, device=device, progress=progress, seed=calib.seed)
        seconds["acm"] = time.perf_counter() - start
        cost = correction_cost(qmodel)
        acm_row.update(acm_ridge=acm.ridge, acm_noise_share=acm.noise_share, acm_fit_images=fit["fit_images"],
                       acm_where=acm.where, acm_target=acm.target, acm_points=len(fit["points"]),
                       acm_params=cost["params"], acm_params_pct=round(cost["params_pct"], 2))
    row = {
        "preset": qconfig.preset, "w_bits": qconfig.w_bits, "a_bits": qconfig.a_bits,
        "first_last_bits": qconfig.first_last_bits, "calib": calib.source, "calib_size": len(images),
        "seed": calib.seed, **acm_row, "quantized_modules": report.counts,
        "weight_bytes": weight_bytes(qmodel), "fp32_weight_bytes": 4 * count_params(model),
    }
    if evalset is not None:
        if evalset.fp_logits is None:
            evalset.set_reference(model, device, progress)
        start = time.perf_counter()
        result, _ = evalset.evaluate(qmodel, device, "quantized", progress)
        seconds["eval"] = time.perf_counter() - start
        fp = score(evalset.fp_logits, evalset.targets)
        row.update(top1=result.top1, top5=result.top5, fp32_top1=fp.top1, fp32_top5=fp.top5,
                   agreement=result.agreement, kl=result.kl)
    row["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return qmodel, row, images
