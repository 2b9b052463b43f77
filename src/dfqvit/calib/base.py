"""The calibration-source interface and its registry."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..errors import UserError

CALIBRATION_SOURCES: dict[str, type["CalibrationSource"]] = {}


def register_source(name: str):
    """Class decorator: make a source available as ``--calib NAME``."""
    def wrap(cls):
        cls.name = name
        CALIBRATION_SOURCES[name] = cls
        return cls
    return wrap


@dataclass
class CalibrationContext:
    """What a source may use besides the full-precision model.

    ``data_config`` is the model's resolved timm data config (input size, mean, std).
    ``quantize`` (optional) builds a calibrated quantized copy of the model from a batch of
    images; data-free sources use it for hard-example mining.
    """

    data_config: dict
    seed: int = 0
    device: str = "cpu"
    quantize: Callable[[torch.Tensor], torch.nn.Module] | None = None
    options: dict = field(default_factory=dict)


class CalibrationSource(abc.ABC):
    """Produces ``num_images`` calibration images, shape (N, C, H, W), normalised like the model's input."""

    name: ClassVar[str]

    @abc.abstractmethod
    def generate(self, model: torch.nn.Module, num_images: int, ctx: CalibrationContext) -> torch.Tensor:
        ...


def make_source(name: str, **kwargs) -> CalibrationSource:
    if name not in CALIBRATION_SOURCES:
        raise UserError(f"unknown calibration source {name!r}; choose from {', '.join(sorted(CALIBRATION_SOURCES))}")
    return CALIBRATION_SOURCES[name](**kwargs)


def valid_pixel_range(data_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of normalised images whose pixels lie in [0, 1]; shape (1, C, 1, 1)."""
    mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std
