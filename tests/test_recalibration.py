"""Recalibration's guard rails, on numbers: which batches may become the new normal."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.calibration import ScoreShift, threshold_at_fpr
from normalcy.config import RecalibrateParams
from normalcy.recalibration import refusals, shift_with_contamination
from normalcy.validation.suite import ValidationReport

PARAMS = RecalibrateParams()
PASSED = ValidationReport("batch", True, 1000, [], 12)
SMALL_MOVE = ScoreShift(offset=0.1, scale=1.2, median_move_iqrs=0.3)


def test_a_valid_batch_with_a_moderate_scale_move_passes():
    assert refusals(1000, PASSED, SMALL_MOVE, 0.05, PARAMS) == []


@pytest.mark.parametrize(
    ("n_rows", "validation", "shift", "contamination", "says"),
    [
        (
            1000,
            ValidationReport("batch", False, 1000, [{"expectation": "range"}], 12),
            SMALL_MOVE,
            0.0,
            "Great Expectations",
        ),
        (3, PASSED, SMALL_MOVE, 0.0, "3 rows"),
        (1000, PASSED, ScoreShift(0.0, 9.0, 0.1), 0.0, "spread changed by a factor 9"),
        (1000, PASSED, ScoreShift(0.0, 0.1, 0.1), 0.0, "spread changed by a factor 0.1"),
        (1000, PASSED, ScoreShift(1e6, 1.0, 1e6), 0.0, "median score moved"),
        (1000, PASSED, SMALL_MOVE, 0.45, "looks anomalous"),
    ],
)
def test_each_guard_refuses_with_its_reason(n_rows, validation, shift, contamination, says):
    problems = refusals(n_rows, validation, shift, contamination, PARAMS)
    assert len(problems) == 1 and says in problems[0]


def test_a_garbage_batch_gets_every_reason_at_once():
    failed = ValidationReport("batch", False, 3, [{"expectation": "range"}], 12)
    problems = refusals(3, failed, ScoreShift(8e6, 50.0, 1e6), 0.5, PARAMS)
    assert len(problems) == 5


def test_shift_with_contamination_estimates_the_share_of_anomalies():
    rng = np.random.default_rng(0)
    calibration = rng.gamma(2.0, size=5000)
    old = threshold_at_fpr(calibration, 0.01)
    normals = 1.0 + 2.0 * rng.gamma(2.0, size=1800)
    batch = np.r_[normals, 200.0 + rng.random(200)]  # 10% anomalies far above
    shift, threshold, contamination = shift_with_contamination(calibration, batch, old, 0.01)
    assert contamination == pytest.approx(0.1, abs=0.02)
    assert shift.scale == pytest.approx(2.0, rel=0.15)
    fresh = 1.0 + 2.0 * rng.gamma(2.0, size=50_000)
    assert 0.007 <= np.mean(fresh > threshold) <= 0.013
    clean_shift, _, clean_contamination = shift_with_contamination(calibration, normals, old, 0.01)
    assert clean_contamination < 0.01 and clean_shift.scale == pytest.approx(2.0, rel=0.15)
