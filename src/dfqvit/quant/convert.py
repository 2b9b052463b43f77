"""Model conversion: swap float modules for quantized ones through the registry."""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..errors import UserError
from .config import QuantConfig
from .modules import QUANT_MODULES, LayerBits, QuantModuleMixin
from .quantizers import Quantizer


@dataclass
class ConversionReport:
    """What :func:`quantize_model` replaced: names by kind, and the layers kept at other bits."""

    modules: dict[str, str] = field(default_factory=dict)   # name -> kind
    first_last: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = Counter(self.modules.values())
        counts["matmul"] = 2 * counts.get("attention", 0)
        return dict(sorted(counts.items()))

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in self.counts.items())
        kept = f"; kept at first/last bits: {', '.join(self.first_last)}" if self.first_last else ""
        return f"quantized {parts}{kept}"


def _first_and_last(model: nn.Module) -> set[str]:
    """The patch-embedding projection (first layer) and the classifier (last layer)."""
    names = set()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        names.add(convs[0])
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    # Distilled DeiT returns its two heads (class and distillation token) as a tuple.
    heads = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    for n, m in model.named_modules():
        if any(m is h for h in heads) and isinstance(m, nn.Linear):
            names.add(n)
    return names


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model: nn.Module, config: QuantConfig) -> tuple[nn.Module, ConversionReport]:
    """Replace, in place, every registered float module whose name passes the include /
    exclude patterns. Quantizers start uncalibrated (the model still computes in float)."""
    if any(isinstance(m, QuantModuleMixin) for m in model.modules()):
        raise UserError("the model is already quantized")
    candidates = [n for n, m in model.named_modules() if type(m) in QUANT_MODULES]
    for label, patterns in (("--include", config.include), ("--exclude", config.exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in candidates):
                raise UserError(f"{label} pattern {p!r} matches no quantizable module "
                                f"(e.g. {', '.join(candidates[:4])})")
    edge = _first_and_last(model)
    edge_bits = config.first_last_bits
    report = ConversionReport()

    def convert(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            qcls = QUANT_MODULES.get(type(child))
            if qcls is not None and _matches(name, config.include) and not _matches(name, config.exclude):
                if name in edge and edge_bits is not None:
                    bits = LayerBits(edge_bits, edge_bits)
                    report.first_last.append(name)
                else:
                    bits = LayerBits(config.w_bits, config.a_bits)
                child = qcls.from_float(child, bits, config.scheme)
                setattr(parent, child_name, child)
                report.modules[name] = qcls.kind
            convert(child, name + ".")

    convert(model, "")
    return model, report


def quantizers(model: nn.Module):
    """All quantizers of a model, with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
