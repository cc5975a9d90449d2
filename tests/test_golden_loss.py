"""The smoke run's loss curve matches the checked-in golden file: catches silent numeric changes
(init, loss, schedule, data order). Regenerate with tests/golden/make_golden.py when intended."""

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"


def test_smoke_loss_curve_matches_golden(tmp_path):
    sys.path.insert(0, str(GOLDEN))
    from make_golden import smoke_losses

    expected = json.loads((GOLDEN / "smoke_loss.json").read_text())["loss"]
    # CPUs differ in float summation order (SIMD width), hence a tolerance, not bit equality.
    assert smoke_losses(tmp_path) == pytest.approx(expected, rel=1e-3)
