"""Per-feature KS + Benjamini-Hochberg drift, score shift, and the combined report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from normalcy.drift import (
    DriftReport,
    benjamini_hochberg,
    detect_drift,
    feature_drift,
    score_shift,
)
from normalcy.drift_alerts import alert_rate_test

PIXEL_NAMES = [f"pixel_{i}" for i in range(64)]
SHIFTED = 36  # a pixel with plenty of variance in the digits data


@pytest.fixture(scope="module")
def digits_halves() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits split into two halves by a fixed permutation: same distribution."""
    X = load_digits().data
    perm = np.random.default_rng(0).permutation(len(X))
    half = len(X) // 2
    return X[perm[:half]], X[perm[half:]]


def test_bh_matches_hand_computed_example():
    # m = 4, fdr = 0.05. Sorted p: 0.001, 0.028, 0.030, 0.5
    #   m * p_(i) / i:   4 * 0.001 / 1 = 0.004
    #                    4 * 0.028 / 2 = 0.056
    #                    4 * 0.030 / 3 = 0.040
    #                    4 * 0.5   / 4 = 0.5
    #   running min from the right: 0.004, 0.040, 0.040, 0.5
    # Step-up: p_(3) = 0.030 <= 3 * 0.05 / 4 = 0.0375, so the 3 smallest are rejected even though
    # p_(2) = 0.028 > 2 * 0.05 / 4 = 0.025 on its own.
    p = np.array([0.5, 0.028, 0.001, 0.030])
    rejected, adjusted = benjamini_hochberg(p, 0.05)
    np.testing.assert_allclose(adjusted, [0.5, 0.040, 0.004, 0.040])
    np.testing.assert_array_equal(rejected, [False, True, True, True])


def test_bh_second_example_and_no_rejection():
    # Sorted p 0.005, 0.01, 0.03, 0.04, 0.2 (m=5): 5p/i = 0.025, 0.025, 0.05, 0.05, 0.2.
    # At fdr 0.04 only the two smallest are below their lines (0.008, 0.016; 0.03 > 0.024).
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.20])
    rejected, adjusted = benjamini_hochberg(p, 0.04)
    np.testing.assert_allclose(adjusted, [0.025, 0.05, 0.05, 0.025, 0.2])
    np.testing.assert_array_equal(rejected, [True, False, False, True, False])
    rejected, _ = benjamini_hochberg(np.array([0.3, 0.9, 0.5]), 0.05)
    assert not rejected.any()


def test_bh_adjusted_monotone_bounded_and_agrees_with_scipy():
    rng = np.random.default_rng(7)
    p = np.r_[rng.uniform(size=200), rng.uniform(0, 1e-3, size=20), [1.0, 1.0, 0.0]]
    rejected, adjusted = benjamini_hochberg(p, 0.1)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adjusted[order]) >= 0)
    assert np.all(adjusted <= 1.0)
    assert np.all(adjusted >= p)
    np.testing.assert_allclose(adjusted, stats.false_discovery_control(p, method="bh"))
    np.testing.assert_array_equal(rejected, adjusted <= 0.1)


def test_bh_validates_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg(np.array([0.1, 1.2]), 0.05)
    with pytest.raises(ValueError, match="fdr"):
        benjamini_hochberg(np.array([0.1]), 0.0)
    rejected, adjusted = benjamini_hochberg(np.array([]), 0.05)
    assert rejected.size == 0 and adjusted.size == 0


def test_no_feature_drift_between_halves_of_digits(digits_halves):
    a, b = digits_halves
    result = feature_drift(a, b, PIXEL_NAMES, fdr=0.05)
    assert [f.feature for f in result] == PIXEL_NAMES
    assert sum(f.drifted for f in result) <= 1
    # pixel_0 is 0 in every digit: constant and identical in both halves -> p = 1.
    assert result[0].statistic == 0.0 and result[0].p_value == 1.0


def test_shift_of_one_feature_is_detected_and_named(digits_halves):
    a, b = digits_halves
    b = b.copy()
    b[:, SHIFTED] += 2.0 * a[:, SHIFTED].std()
    result = feature_drift(a, b, PIXEL_NAMES, fdr=0.05)
    drifted = [f.feature for f in result if f.drifted]
    assert f"pixel_{SHIFTED}" in drifted
    assert len(drifted) <= 2
    assert result[SHIFTED].adjusted_p_value < 1e-10


def test_many_features_from_the_same_distribution_give_few_false_alarms():
    # 20 batches x 200 independent features, no drift. Uncorrected tests at 0.05 would flag
    # ~10 features per batch; BH at 0.05 flags any feature in at most ~5% of batches.
    rng = np.random.default_rng(11)
    n_flagged_batches = 0
    n_raw_significant = 0
    for _ in range(20):
        ref = rng.normal(size=(300, 200))
        new = rng.normal(size=(300, 200))
        result = feature_drift(ref, new, None, fdr=0.05)
        n_flagged_batches += any(f.drifted for f in result)
        n_raw_significant += sum(f.p_value < 0.05 for f in result)
    assert n_flagged_batches <= 3
    assert n_raw_significant > 100  # the correction is what keeps the alarms down


def test_feature_drift_flattens_images():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(200, 3, 4, 4))
    new = rng.normal(size=(200, 3, 4, 4))
    new[:, 1, 2, 3] += 3.0
    result = feature_drift(ref, new, None, fdr=0.05)
    assert len(result) == 48
    flat_index = 1 * 16 + 2 * 4 + 3
    assert [f.feature for f in result if f.drifted] == [f"feature_{flat_index}"]


def test_constant_features_differing_between_samples_drift():
    ref = np.zeros((100, 2))
    new = np.zeros((100, 2))
    new[:, 1] = 1.0
    result = feature_drift(ref, new, ["same", "moved"], fdr=0.05)
    assert result[0].p_value == 1.0 and not result[0].drifted
    assert result[1].statistic == 1.0 and result[1].drifted


def test_feature_count_mismatch_names_both_counts(digits_halves):
    a, b = digits_halves
    with pytest.raises(ValueError, match=r"expected 64, got 63"):
        feature_drift(a, b[:, :63], PIXEL_NAMES, fdr=0.05)


def test_feature_names_length_and_bad_values_are_rejected(digits_halves):
    a, b = digits_halves
    with pytest.raises(ValueError, match="feature_names has 3 names"):
        feature_drift(a, b, ["x", "y", "z"], fdr=0.05)
    bad = b.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        feature_drift(a, bad, PIXEL_NAMES, fdr=0.05)


def test_score_shift_detects_one_sigma_mean_shift():
    rng = np.random.default_rng(5)
    statistic, p = score_shift(rng.normal(size=500), rng.normal(loc=1.0, size=500))
    assert p < 1e-10
    assert statistic > 0.25  # population KS distance is 2 * Phi(0.5) - 1 ~= 0.38


def test_score_shift_does_not_flag_identical_distributions():
    rng = np.random.default_rng(6)
    _, p = score_shift(rng.normal(size=500), rng.normal(size=500))
    assert p > 0.05
    statistic, p = score_shift(np.arange(10.0), np.arange(10.0))
    assert statistic == 0.0 and p == 1.0


def test_detect_drift_end_to_end(digits_halves):
    a, b = digits_halves
    b = b.copy()
    b[:, SHIFTED] += 2.0 * a[:, SHIFTED].std()
    rng = np.random.default_rng(8)
    ref_scores = rng.normal(size=len(a))
    batch_scores = rng.normal(loc=1.0, size=len(b))
    threshold = float(np.quantile(ref_scores, 0.99))
    report = detect_drift(
        a,
        b,
        PIXEL_NAMES,
        ref_scores,
        batch_scores,
        alpha=0.01,
        threshold=threshold,
    )
    assert isinstance(report, DriftReport)
    assert report.drifted and report.score_shifted
    assert report.n_features_drifted >= 1
    assert report.n_features_drifted == sum(f.drifted for f in report.features)
    assert report.n_reference == len(a) and report.n_batch == len(b)
    assert report.alert_rate_reference == pytest.approx(0.01, abs=0.005)
    assert report.alert_rate_batch > 0.05

    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["n_features_drifted"] == report.n_features_drifted
    assert payload["features"][SHIFTED]["feature"] == f"pixel_{SHIFTED}"
    assert payload["features"][SHIFTED]["drifted"] is True

    summary = report.summary()
    assert f"pixel_{SHIFTED}" in summary
    assert "DRIFT" in summary
    assert f"{report.n_features_drifted}/64" in summary
    assert "score distribution: shifted" in summary
    assert report.family_level == pytest.approx(0.005)  # two families share alpha
    assert report.fired() == ["features", "scores"]
    assert payload["tests"][1]["p_value"] == report.score_p_value


def test_detect_drift_quiet_when_nothing_changed(digits_halves):
    a, b = digits_halves
    rng = np.random.default_rng(9)
    report = detect_drift(a, b, PIXEL_NAMES, rng.normal(size=len(a)), rng.normal(size=len(b)), 0.01)
    assert not report.score_shifted
    assert report.alert_rate_reference is None and report.alert_rate_batch is None
    assert report.n_features_drifted <= 1
    json.dumps(report.to_dict())
    assert "not shifted" in report.summary()


def test_each_family_is_tested_at_its_bonferroni_share():
    """A score shift whose p-value lies between alpha / 2 and alpha is not drift at alpha: the
    two families share the level (testing each at alpha would add up their false alarms)."""
    rng = np.random.default_rng(12)
    ref, new = rng.normal(size=(400, 3)), rng.normal(size=(400, 3))
    ref_scores = rng.normal(size=1000)
    for shift in np.linspace(0.0, 0.5, 101):
        batch_scores = rng.normal(loc=shift, size=300)
        p = score_shift(ref_scores, batch_scores)[1]
        if 0.005 < p <= 0.01:
            break
    else:
        pytest.fail("no batch with a score p-value in (0.005, 0.01]")
    report = detect_drift(ref, new, None, ref_scores, batch_scores, alpha=0.01)
    scores = report.test("scores")
    assert scores.p_value == pytest.approx(p) and scores.level == pytest.approx(0.005)
    assert not scores.rejected and not report.score_shifted
    assert report.test("features").p_value == min(f.adjusted_p_value for f in report.features)
    assert detect_drift(ref, new, None, ref_scores, batch_scores, alpha=0.03).score_shifted


def test_features_family_p_value_is_the_smallest_bh_adjusted_one(digits_halves):
    a, b = digits_halves
    b = b.copy()
    b[:, SHIFTED] += 2.0 * a[:, SHIFTED].std()
    rng = np.random.default_rng(2)
    report = detect_drift(a, b, PIXEL_NAMES, rng.normal(size=500), rng.normal(size=500), 0.01)
    family = report.test("features")
    assert family.rejected and family.p_value == report.features[SHIFTED].adjusted_p_value
    assert family.statistic == max(f.statistic for f in report.features)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan"), "0.01", True])
def test_overall_alpha_out_of_range_is_refused(digits_halves, alpha):
    a, b = digits_halves
    with pytest.raises(ValueError, match="alpha"):
        detect_drift(a, b, PIXEL_NAMES, np.ones(5), np.ones(5), alpha)


def test_empty_or_non_finite_batch_is_refused(digits_halves):
    a, b = digits_halves
    scores = np.arange(5.0)
    with pytest.raises(ValueError, match="batch has no rows"):
        detect_drift(a, b[:0], PIXEL_NAMES, scores, scores, 0.01)
    with pytest.raises(ValueError, match="batch_scores contains 1 non-finite"):
        detect_drift(a, b, PIXEL_NAMES, scores, np.array([1.0, np.nan]), 0.01)
    with pytest.raises(ValueError, match="batch_scores is empty"):
        detect_drift(a, b, PIXEL_NAMES, scores, np.array([]), 0.01)


def test_alert_rate_test_matches_the_exact_binomial_both_ways():
    # 200 rows at a 1% target expect 2 alerts: 2 is perfectly usual, 12 is far too many.
    assert alert_rate_test(2, 200, 0.01) == (0.01, pytest.approx(1.0))
    rate, p = alert_rate_test(12, 200, 0.01)
    assert rate == 0.06
    assert p == pytest.approx(stats.binomtest(12, 200, 0.01).pvalue) and p < 1e-4
    # 2000 rows expect 20: none at all is a silent scorer, and two-sided sees it
    _, p_silent = alert_rate_test(0, 2000, 0.01)
    assert p_silent < 1e-6
    # ... while 200 rows (2 expected) are too few to see it
    assert alert_rate_test(0, 200, 0.01)[1] > 0.1


@pytest.mark.parametrize(
    ("n_alerts", "n_batch", "target", "message"),
    [
        (3, 2, 0.01, "n_alerts must be an integer in"),
        (-1, 10, 0.01, "n_alerts must be an integer in"),
        (0, 0, 0.01, "n_batch must be a positive integer"),
        (1, 10, 0.0, "target_rate"),
        (1, 10, 1.5, "target_rate"),
    ],
)
def test_alert_rate_test_refuses_bad_counts_and_rates(n_alerts, n_batch, target, message):
    with pytest.raises(ValueError, match=message):
        alert_rate_test(n_alerts, n_batch, target)


def test_alert_rate_family_fires_on_too_many_alerts_and_shares_the_level():
    rng = np.random.default_rng(13)
    ref, new = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    ref_scores = rng.normal(size=2000)
    threshold = float(np.quantile(ref_scores, 0.99))
    alerts = np.zeros(500, dtype=bool)
    alerts[:25] = True  # 5% alerts where 1% are expected, scores themselves unchanged
    batch_scores = rng.normal(size=500)
    report = detect_drift(
        ref, new, None, ref_scores, batch_scores, 0.01, threshold, 0.01, batch_alerts=alerts
    )
    family = report.test("alert_rate")
    assert family.rejected and family.statistic == 0.05 and family.p_value < 1e-6
    assert report.family_level == pytest.approx(0.01 / 3)
    assert report.alert_rate_batch == 0.05 and report.alert_rate_target == 0.01
    assert report.drifted and report.fired() == ["alert_rate"]
    assert "target 1.00%" in report.summary()
    # without the graph's alerts, the scores above the threshold are counted: about 1% here
    quiet = detect_drift(ref, new, None, ref_scores, batch_scores, 0.01, threshold, 0.01)
    assert not quiet.test("alert_rate").rejected
    with pytest.raises(ValueError, match="one per batch score"):
        detect_drift(ref, new, None, ref_scores, batch_scores, 0.01, threshold, 0.01, alerts[:5])
    with pytest.raises(ValueError, match="needs the batch's alerts or the threshold"):
        detect_drift(ref, new, None, ref_scores, batch_scores, 0.01, target_alert_rate=0.01)


def _champion(metadata: dict, reference_scores: np.ndarray):
    from normalcy.monitoring import ChampionBundle

    return ChampionBundle(
        "1", "run", Path("model.onnx"), metadata, np.zeros((3, 2)), reference_scores, ["a", "b"], {}
    )


def test_monitor_tests_alerts_against_the_target_stored_in_the_graph():
    from normalcy.monitoring import target_alert_rate

    scores = np.arange(100.0)
    assert target_alert_rate(_champion({"threshold": 97.5, "target_fpr": 0.02}, scores)) == 0.02
    # a graph without target_fpr: the rate its own calibration scores give at its threshold
    assert target_alert_rate(_champion({"threshold": 94.5}, scores)) == 0.05
    assert target_alert_rate(_champion({"threshold": 1000.0}, scores)) == pytest.approx(1 / 101)


def test_alert_rate_null_widens_with_the_threshold_s_own_uncertainty():
    """A threshold set on 300 scores has a true rate anywhere around 0.4-1.8% at a 1% target: 7
    alerts in 200 rows is odd for an exact 1% (binomial) but not for such a champion at 0.01."""
    _, binomial = alert_rate_test(7, 200, 0.01)
    _, beta_binomial = alert_rate_test(7, 200, 0.01, n_calibration=300)
    assert binomial < 0.01 < beta_binomial
    weight = 301
    pmf = stats.betabinom.pmf(np.arange(201), 200, 0.01 * weight, 0.99 * weight)
    assert beta_binomial == pytest.approx(pmf[pmf <= pmf[7] * (1 + 1e-7)].sum())
    # a huge calibration set is the binomial again
    assert alert_rate_test(7, 200, 0.01, 10**9)[1] == pytest.approx(binomial, rel=1e-3)
    with pytest.raises(ValueError, match="n_calibration"):
        alert_rate_test(6, 200, 0.01, 0)


def test_stationary_alert_counts_are_flagged_at_most_at_the_level():
    """Champions calibrated on 500 normal scores, batches of 400 from the same distribution: the
    alert-rate test at 0.05 flags at most about 5% of them (the plain binomial flags more)."""
    rng = np.random.default_rng(21)
    flagged = binomial_flagged = 0
    for _ in range(400):
        threshold = float(np.quantile(rng.normal(size=500), 0.99, method="higher"))
        n_alerts = int(np.count_nonzero(rng.normal(size=400) > threshold))
        flagged += alert_rate_test(n_alerts, 400, 0.01, 500)[1] <= 0.05
        binomial_flagged += alert_rate_test(n_alerts, 400, 0.01)[1] <= 0.05
    assert flagged / 400 <= 0.07
    assert binomial_flagged > flagged
