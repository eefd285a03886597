"""Thresholds at a target FPR, the robust cutoff cleaning uses, and the score-scale map that
recalibration uses."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from normalcy.calibration import (
    fit_score_shift,
    realised_fpr,
    robust_cutoff,
    threshold_at_fpr,
)


def test_threshold_realised_fpr_on_calibration_scores_is_at_most_target_and_close():
    scores = np.random.default_rng(0).normal(size=10_000)
    threshold = threshold_at_fpr(scores, 0.01)
    fpr = realised_fpr(scores, threshold)
    assert fpr <= 0.01
    assert fpr >= 0.008
    # The threshold is an observed score (method="higher"), not an interpolation.
    assert threshold in scores


def test_threshold_generalises_to_a_fresh_draw():
    threshold = threshold_at_fpr(np.random.default_rng(1).normal(size=10_000), 0.01)
    fresh = np.random.default_rng(2).normal(size=10_000)
    assert 0.005 <= realised_fpr(fresh, threshold) <= 0.02


def test_threshold_is_conservative_with_ties():
    # 95 zeros and 5 ones: the 0.99 quantile is 1, nothing is above it.
    scores = np.array([0.0] * 95 + [1.0] * 5)
    threshold = threshold_at_fpr(scores, 0.01)
    assert threshold == 1.0
    assert realised_fpr(scores, threshold) == 0.0


def test_threshold_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        threshold_at_fpr(np.array([]), 0.01)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_threshold_rejects_non_finite_scores(bad):
    scores = np.r_[np.arange(200.0), bad]
    with pytest.raises(ValueError, match="non-finite"):
        threshold_at_fpr(scores, 0.01)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_threshold_rejects_fpr_outside_open_unit_interval(fpr):
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr(np.arange(1000.0), fpr)


def test_threshold_warns_and_uses_max_when_too_few_scores():
    scores = np.arange(50.0)  # 50 < ceil(1 / 0.01) = 100
    with pytest.warns(UserWarning, match="cannot be resolved with 50 scores"):
        threshold = threshold_at_fpr(scores, 0.01)
    assert threshold == 49.0


def test_threshold_does_not_warn_with_enough_scores():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threshold_at_fpr(np.arange(100.0), 0.01)
        threshold_at_fpr(np.arange(10.0), 0.1)  # 1 / 0.1 is 10.000000000000002 in floats


def _contaminated(seed: int, n_inliers: int = 19_000, n_outliers: int = 1_000):
    """N(0, 1) inliers plus 5% outliers around +20 sigma."""
    rng = np.random.default_rng(seed)
    inliers = rng.normal(size=n_inliers)
    outliers = 20.0 + rng.normal(size=n_outliers)
    return inliers, outliers, rng.permutation(np.r_[inliers, outliers])


def test_robust_cutoff_separates_outliers_from_inliers():
    inliers, outliers, batch = _contaminated(3)
    cutoff = robust_cutoff(batch, 3.5)
    assert outliers.min() > cutoff, "an injected outlier is below the cutoff"
    # At 3.5 sigma hardly any inlier is above it (expected fraction ~2e-4, even with the 5%
    # shift of the median and MAD that the contamination causes).
    assert np.count_nonzero(inliers <= cutoff) >= 0.999 * inliers.size


def test_robust_cutoff_falls_back_when_mad_is_zero():
    # 60% tied at 0 -> MAD = 0; the mean-absolute-deviation fallback still drops the outliers.
    scores = np.r_[np.zeros(600), np.linspace(0.1, 1.0, 350), np.full(50, 100.0)]
    assert 1.0 <= robust_cutoff(scores, 3.5) < 100.0
    assert robust_cutoff(np.full(10, 2.5), 3.5) == 2.5  # all equal: the cutoff is that score


def test_robust_cutoff_rejects_bad_threshold():
    with pytest.raises(ValueError, match="mad_threshold"):
        robust_cutoff(np.arange(10.0), 0.0)


@pytest.mark.parametrize("shape", ["normal", "gamma", "lognormal"])
def test_score_shift_carries_the_threshold_to_a_moved_scale(shape):
    """Scores that moved to 2 + 1.5 x: the mapped threshold flags the target share of fresh
    normal rows (within +-30%), for skewed as well as bell-shaped scores."""
    rng = np.random.default_rng(0)
    draw = {
        "normal": lambda n: rng.normal(size=n),
        "gamma": lambda n: rng.gamma(1.0, size=n),
        "lognormal": lambda n: rng.lognormal(0.0, 0.8, size=n),
    }[shape]
    calibration = draw(20_000)
    threshold = threshold_at_fpr(calibration, 0.01)
    shift = fit_score_shift(calibration, 2 + 1.5 * draw(20_000))
    assert shift.scale == pytest.approx(1.5, rel=0.05)
    moved = float(shift.apply([threshold])[0])
    assert 0.007 <= realised_fpr(2 + 1.5 * draw(50_000), moved) <= 0.013


def test_score_shift_corrects_for_contamination_in_the_upper_tail():
    rng = np.random.default_rng(1)
    calibration = rng.gamma(1.0, size=20_000)
    threshold = threshold_at_fpr(calibration, 0.01)
    batch = np.r_[rng.gamma(1.0, size=18_000), 30 + rng.random(2_000)]  # 10% far anomalies
    naive = float(fit_score_shift(calibration, batch).apply([threshold])[0])
    corrected = float(fit_score_shift(calibration, batch, contamination=0.1).apply([threshold])[0])
    fresh = rng.gamma(1.0, size=50_000)
    assert realised_fpr(fresh, naive) < 0.007  # uncorrected: too few alerts
    assert 0.007 <= realised_fpr(fresh, corrected) <= 0.013


def test_score_shift_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="no spread"):
        fit_score_shift(np.full(100, 3.0), np.arange(100.0))
    with pytest.raises(ValueError, match="contamination"):
        fit_score_shift(np.arange(100.0), np.arange(100.0), contamination=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_score_shift(np.arange(100.0), np.r_[np.arange(99.0), np.nan])


def test_realised_fpr_counts_strictly_above():
    assert realised_fpr(np.array([1.0, 2.0, 3.0, 4.0]), 3.0) == 0.25
    with pytest.raises(ValueError, match="threshold"):
        realised_fpr(np.array([1.0]), float("nan"))
