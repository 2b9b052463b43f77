"""Post-training quantization of timm ViT / DeiT / Swin (simulated, with real integer export)."""
from __future__ import annotations

import copy

import torch

from ..errors import require_finite

from .calibrate import calibrate, calibrate_weights, observing, quantization_disabled
from .config import PRESETS, QuantConfig, QuantScheme
from .convert import ConversionReport, quantize_model, quantizers
from .modules import QUANT_MODULES, QAttention, QConv2d, QLinear, QMatMul, QWindowAttention, register
from .serialize import load_quantized, save_quantized


def quantize(model: torch.nn.Module, config: QuantConfig, images: torch.Tensor, batch_size: int = 32,
             device: str = "cpu", progress: bool = False) -> tuple[torch.nn.Module, ConversionReport]:
    """A calibrated quantized *copy* of ``model`` (the float model is left untouched)."""
    qmodel, report = quantize_model(copy.deepcopy(model), config)
    qmodel.to(device)   # after conversion: the quantizers' buffers are created on the CPU
    calibrate(qmodel, config, images, batch_size=batch_size, device=device, progress=progress)
    for name, quantizer in quantizers(qmodel):
        for key, buffer in quantizer.state_dict().items():
            require_finite(buffer, f"the calibrated quantizer {name}.{key} would",
                           "the calibration images drive an activation to overflow; check them and the model")
    return qmodel, report


__all__ = [
    "PRESETS", "QUANT_MODULES", "ConversionReport", "QAttention", "QConv2d", "QLinear", "QMatMul",
    "QWindowAttention", "QuantConfig", "QuantScheme", "calibrate", "calibrate_weights", "load_quantized",
    "observing", "quantization_disabled", "quantize", "quantize_model", "quantizers", "register",
    "save_quantized",
]
