"""dfqvit.calib.configs and the two synthesis configs: registration, validation, building.
"""
from __future__ import annotations

import pytest
from torch import nn

from dfqvit.calib import CALIBRATION_SOURCES, make_source
from dfqvit.calib.dfq import DFQSource, DFQSynthConfig
from dfqvit.calib.psaq import PSAQSource, PSAQSynthConfig
from dfqvit.errors import UserError

FAST = dict(progress=False)


def test_registered():
    assert {"psaq", "dfq"} <= set(CALIBRATION_SOURCES)
    assert isinstance(make_source("psaq"), PSAQSource) and isinstance(make_source("dfq"), DFQSource)
    assert make_source("dfq").config == DFQSynthConfig()


@pytest.mark.parametrize("name,bad", [
    ("psaq", {"iterations": 0}), ("psaq", {"rounds": 0}), ("psaq", {"lr": -1.0}), ("psaq", {"itrations": 5}),
    ("psaq", {"jitter": []}), ("psaq", {"kde_range": "global"}), ("dfq", {"iterations": 0}),
    ("dfq", {"e2h_stages": 0}), ("dfq", {"crop_scale": (0.5, 2.0)}), ("dfq", {"local_crops": "yes"}),
    ("dfq", {"unknown_field": 1}), ("dfq", {"batch_size": 1.5}), ("dfq", {"betas": (0.5,)}),
    ("dfq", {"cuda_graph": "yes"}), ("psaq", {"cuda_graph": 1}), ("dfq", {"init_slope": -1.0}),
    ("dfq", {"parameterization": "fourier"}), ("dfq", {"start_share": 1.0}), ("dfq", {"start_share": -0.1}),
])
def test_bad_config_raises_user_error(name, bad):
    with pytest.raises(UserError):
        make_source(name, **bad)


def test_config_objects_and_requests(vit, synth_ctx):
    cfg = DFQSynthConfig(iterations=7)
    assert DFQSource(cfg, local_crops=False).config == DFQSynthConfig(iterations=7, local_crops=False)
    assert DFQSource({"iterations": 7}).config.iterations == 7
    assert PSAQSource(jitter=[1, 2]).config.jitter == (1, 2)         # JSON lists become tuples
    with pytest.raises(UserError):
        DFQSource(PSAQSynthConfig())
    with pytest.raises(UserError):
        make_source("dfq", **FAST).generate(vit, 0, synth_ctx())
    with pytest.raises(UserError):
        make_source("psaq", patch_entropy=True, **FAST).generate(nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)),
                                                                 2, synth_ctx())
