"""benchmarks/error_budget.py's groups name every low-width activation quantizer of a ViT and a
Swin block exactly once, so no quantizer silently drops out of the budget after a rename."""
import fnmatch
import sys
from pathlib import Path

import pytest

from dfqvit.quant import QuantConfig, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from error_budget import GROUPS, low_bit_quantizers  # noqa: E402


@pytest.mark.parametrize("fixture, others", [("vit_tiny", set()), ("swin_tiny", {"reduction"})])
def test_groups_cover_each_block_quantizer_once(request, fixture, others):
    qmodel, _ = quantize_model(request.getfixturevalue(fixture), QuantConfig(w_bits=4, a_bits=4))
    low = [name for name, _ in low_bit_quantizers(qmodel, 4)]
    assert low
    for name in low:
        hits = [label for label, pattern in GROUPS.items() if fnmatch.fnmatchcase(name, pattern)]
        if hits:
            assert len(hits) == 1, (name, hits)
        else:   # outside the blocks' attention and MLP: Swin's patch merging
            assert any(part in name for part in others), name
    covered = {label for label, pattern in GROUPS.items() for name in low if fnmatch.fnmatchcase(name, pattern)}
    assert covered == set(GROUPS)
