"""Calibration sources: image batches in the model's normalised input space.

Every source (noise, real, and the data-free synthesisers) sits behind one interface,
:class:`CalibrationSource`, and one registry, so the quantizer never knows where its
calibration images came from.
"""
from .base import CALIBRATION_SOURCES, CalibrationContext, CalibrationSource, make_source, register_source
from . import sources  # noqa: F401  (registers noise and real)
from . import psaq, dfq  # noqa: F401  (registers psaq, then dfq)

__all__ = ["CALIBRATION_SOURCES", "CalibrationContext", "CalibrationSource", "make_source", "register_source"]
