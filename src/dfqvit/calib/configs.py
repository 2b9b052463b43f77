"""Validation shared by the synthesis configs (:class:`~dfqvit.calib.psaq.PSAQSynthConfig`,
:class:`~dfqvit.calib.dfq.DFQSynthConfig`).

One mixin, so that the checks of the fields both configs have (and ``build`` / ``to_dict``)
are written once; each config adds only its own fields' checks in ``_check``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import UserError

__all__ = ["ConfigChecks"]


class ConfigChecks:
    """Validation shared by the two frozen configs: lists become tuples, mistakes raise UserError."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self._check()

    def _fail(self, msg: str):
        raise UserError(f"{type(self).__name__}: {msg}")

    def _int(self, name: str, low: int):
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            self._fail(f"{name} must be an integer >= {low}, got {v!r}")

    def _num(self, name: str, low: float, high: float = math.inf, *, allow_none=False, open_low=False,
             open_high=False):
        v = getattr(self, name)
        if v is None and allow_none:
            return
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        above_low = number and (low < v if open_low else low <= v)
        below_high = number and (v < high if open_high else v <= high)
        if not (above_low and below_high):
            self._fail(f"{name} must be a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}, "
                       f"got {v!r}")

    def _pair(self, name: str, low: float, high: float = math.inf):
        v = getattr(self, name)
        if (not isinstance(v, tuple) or len(v) != 2
                or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and low <= e <= high for e in v)):
            self._fail(f"{name} must be a pair of numbers in [{low}, {high}], got {v!r}")

    def _bool(self, *names: str):
        for name in names:
            if not isinstance(getattr(self, name), bool):
                self._fail(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _common_checks(self):
        self._int("iterations", 1)
        self._int("batch_size", 1)
        self._int("kde_points", 2)
        self._int("log_every", 1)
        self._num("lr", 0, allow_none=True, open_low=True)
        self._num("warmup_frac", 0, 1)
        self._num("kde_bandwidth", 0, open_low=True)
        self._pair("betas", 0, 0.999999)
        self._pair("tv_target", 0)
        if self.tv_target[0] > self.tv_target[1]:
            self._fail(f"tv_target must be (low, high) with low <= high, got {self.tv_target!r}")
        for name in ("ce_weight", "entropy_weight", "tv_weight"):
            self._num(name, 0)
        if self.kde_range not in ("batch", "sample"):
            self._fail(f"kde_range must be 'batch' or 'sample', got {self.kde_range!r}")
        if self.window_entropy not in ("mean", "pool"):
            self._fail(f"window_entropy must be 'mean' or 'pool', got {self.window_entropy!r}")
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            self._fail(f"compile_mode must be a torch.compile mode name or None, got {self.compile_mode!r}")
        self._bool("patch_entropy", "tv_prior", "flip", "amp", "cuda_graph", "compile", "progress")

    @classmethod
    def build(cls, config=None, **overrides):
        """``config`` (an instance, a dict or None) with ``overrides`` applied; UserError on mistakes."""
        if config is None:
            config = cls()
        elif isinstance(config, dict):
            overrides = {**config, **overrides}
            config = cls()
        elif not isinstance(config, cls):
            raise UserError(f"expected a {cls.__name__}, got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
