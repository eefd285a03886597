"""Thresholds at a target FPR, and their robust re-estimation on contaminated batches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from normalcy.calibration import (
    realised_fpr,
    recalibrated_threshold,
    robust_normal_scores,
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


def test_robust_normal_scores_removes_outliers_and_keeps_inliers():
    inliers, outliers, batch = _contaminated(3)
    kept = robust_normal_scores(batch, 3.5)
    assert kept.max() < 10.0, "an injected outlier survived the trimming"
    n_inliers_kept = np.count_nonzero(kept < 10.0)
    assert n_inliers_kept >= 0.95 * inliers.size
    # At 3.5 sigma hardly any inlier is lost (expected fraction ~2e-4, even with the 5% shift of
    # the median and MAD that the contamination causes).
    assert n_inliers_kept >= 0.999 * inliers.size


def test_robust_normal_scores_falls_back_when_mad_is_zero():
    # 60% tied at 0 -> MAD = 0; the mean-absolute-deviation fallback still drops the outliers.
    scores = np.r_[np.zeros(600), np.linspace(0.1, 1.0, 350), np.full(50, 100.0)]
    kept = robust_normal_scores(scores, 3.5)
    assert kept.max() <= 1.0
    assert kept.size == 950


def test_robust_normal_scores_keeps_all_equal_scores():
    kept = robust_normal_scores(np.full(10, 2.5), 3.5)
    np.testing.assert_array_equal(kept, np.full(10, 2.5))


def test_robust_normal_scores_rejects_bad_threshold():
    with pytest.raises(ValueError, match="mad_threshold"):
        robust_normal_scores(np.arange(10.0), 0.0)


def test_recalibrated_threshold_on_contaminated_batch_matches_clean_threshold():
    inliers, _, batch = _contaminated(4)
    clean = threshold_at_fpr(inliers, 0.01)
    recalibrated = recalibrated_threshold(batch, 0.01, 3.5)
    plain = threshold_at_fpr(batch, 0.01)
    # Both estimate the 0.99 quantile of the same 19k inliers; trimming shifts it by ~2e-4 of the
    # probability mass. The standard error of a 0.99 quantile of N(0, 1) at n=19k is
    # sqrt(0.99 * 0.01 / n) / phi(2.326) ~= 0.027, and here both use the same inliers, so 0.05
    # (~2 SE, well under the gap to the plain quantile) is a generous tolerance.
    assert abs(recalibrated - clean) < 0.05
    # The plain quantile lands inside the outlier cluster: 5% outliers > 1% budget.
    assert plain > 15.0
    # What matters downstream: on fresh normal data the recalibrated threshold meets the target.
    fresh = np.random.default_rng(5).normal(size=20_000)
    assert 0.007 <= realised_fpr(fresh, recalibrated) <= 0.013
    assert realised_fpr(fresh, plain) == 0.0


def test_realised_fpr_counts_strictly_above():
    assert realised_fpr(np.array([1.0, 2.0, 3.0, 4.0]), 3.0) == 0.25
    with pytest.raises(ValueError, match="threshold"):
        realised_fpr(np.array([1.0]), float("nan"))
