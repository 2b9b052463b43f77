"""benchmarks/error_budget.py's groups name every low-width activation quantizer of a ViT and a
Swin block exactly once, so no quantizer silently drops out of the budget after a rename."""
import fnmatch
import sys
from pathlib import Path

import pytest

from dfqvit.quant import QuantConfig, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from error_budget import GROUPS, budget_rows, low_bit_quantizers  # noqa: E402


@pytest.mark.parametrize("fixture, others", [("vit_tiny", []), ("swin_tiny", ["layers.1.downsample.reduction.input_quant"])])
def test_groups_cover_each_block_quantizer_once(request, fixture, others):
    qmodel, _ = quantize_model(request.getfixturevalue(fixture), QuantConfig(w_bits=4, a_bits=4))
    low = [name for name, _ in low_bit_quantizers(qmodel, 4)]
    assert low
    for name in low:
        assert sum(fnmatch.fnmatchcase(name, pattern) for pattern in GROUPS.values()) <= 1, name
    rows = dict(budget_rows(low))
    assert list(rows)[0] == "none" and rows["none"] == [] and rows["all"] == low
    assert all(rows[label] for label in GROUPS)              # every group names some quantizer
    assert rows.get("other", []) == others                   # outside the blocks' attention and MLP
