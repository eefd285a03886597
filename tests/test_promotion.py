"""The promotion rule and its statistics, on numbers (no registry): see test_registry.py for
the decision applied to a real MLflow store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normalcy.config import PromotionParams
from normalcy.data.splits import Split
from normalcy.evaluation.bootstrap import (
    paired_bootstrap_deltas,
    percentile_interval,
    wilson_interval,
)
from normalcy.promotion import (
    LABEL_FREE_METRIC,
    LABELLED_METRIC,
    METRICS,
    Evidence,
    decide_promotion,
    holdout_set,
)

PARAMS = PromotionParams()


def labelled_rows(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    return y, rng.normal(size=n) + 3.0 * y  # a good score: anomalies sit higher


def test_paired_bootstrap_separates_a_good_scorer_from_noise():
    y, good = labelled_rows()
    noise = np.random.default_rng(1).normal(size=len(y))
    metric = METRICS[LABELLED_METRIC]
    deltas = paired_bootstrap_deltas(metric, y, good, noise, 300, seed=0)
    low, high = percentile_interval(deltas, 0.9)
    assert low > 0.3 and high <= 1.0
    same = paired_bootstrap_deltas(metric, y, good, good, 100, seed=0)
    assert np.all(same == 0)  # paired: identical models differ by exactly nothing
    again = paired_bootstrap_deltas(metric, y, good, noise, 300, seed=0)
    assert np.array_equal(deltas, again)  # seeded


def test_paired_bootstrap_refuses_what_it_cannot_measure():
    y, good = labelled_rows()
    metric = METRICS[LABELLED_METRIC]
    with pytest.raises(ValueError, match="one entry per row"):
        paired_bootstrap_deltas(metric, y, good[:-1], good, 10, 0)
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap_deltas(metric, np.zeros(10), good[:10], good[:10], 10, 0)


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(0, 100, 0.95)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(1.959964**2 / (100 + 1.959964**2), rel=1e-6)
    low, high = wilson_interval(50, 100, 0.95)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0, 0.9)


def test_holdout_set_uses_labels_when_it_has_both_classes_else_synthetic_anomalies():
    y, _ = labelled_rows(60)
    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    labelled = holdout_set(Split(X, y, np.arange(60)), seed=0)
    assert labelled.metric_name == LABELLED_METRIC and labelled.real_labels
    assert np.array_equal(labelled.y, y) and labelled.n_real_rows == 60
    unlabelled = holdout_set(Split(X, None, np.arange(60)), seed=0)
    assert unlabelled.metric_name == LABEL_FREE_METRIC and not unlabelled.real_labels
    assert len(unlabelled.X) == 4 * 60 and unlabelled.y.sum() == 3 * 60
    assert np.array_equal(unlabelled.X[:60], X) and unlabelled.n_real_rows == 60
    with pytest.raises(ValueError, match="holdout split is empty"):
        holdout_set(Split(X[:0], None, np.arange(0)), seed=0)


def evidence(**changes) -> Evidence:
    """A champion exists, the challenger is clearly better, its alert rate is on target."""
    base = {
        "metric_name": LABELLED_METRIC,
        "n_rows": 300,
        "n_normal_rows": 270,
        "challenger_metric": 0.8,
        "target_rate": 0.01,
        "alert_rate": 0.011,
        "alert_rate_interval": (0.004, 0.03),
        "champion_version": "1",
        "champion_metric": 0.6,
        "metric_delta_interval": (0.1, 0.3),
        "recall_delta_interval": (-0.05, 0.2),
    }
    return Evidence(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "params", "promoted", "says"),
    [
        ({}, PARAMS, True, "becomes champion"),
        ({"champion_version": None, "champion_metric": None}, PARAMS, True, "no champion"),
        # a first model is served even off target, with a note
        ({"champion_version": None, "alert_rate_interval": (0.1, 0.2)}, PARAMS, True, "Note"),
        ({"metric_delta_interval": (-0.02, 0.1)}, PARAMS, False, "does not beat"),
        # a negative min_gain accepts a challenger that is not worse beyond it
        ({"metric_delta_interval": (-0.02, 0.1)}, PromotionParams(min_gain=-0.05), True, "beats"),
        ({"alert_rate_interval": (0.05, 0.12)}, PARAMS, False, "alert rate"),
        ({"recall_delta_interval": (-0.4, -0.1)}, PARAMS, False, "recall"),
        ({"challenger_metric": math.nan}, PARAMS, False, "NaN"),
        ({"same_input": False}, PARAMS, False, "another input schema"),
        # a champion whose scores are not finite is replaced (it must not block its successor)
        ({"champion_metric": math.nan, "metric_delta_interval": None}, PARAMS, True, "non-finite"),
    ],
)
def test_decide_promotion(changes, params, promoted, says):
    decision = decide_promotion(evidence(**changes), params)
    assert decision.promoted is promoted
    assert says in decision.reason and decision.reason.endswith(".")
    tags = decision.tags()
    assert tags["promotion_decision"] == ("promoted" if promoted else "not_promoted")
    assert tags["promotion_reason"] == decision.reason


def test_a_version_is_not_promoted_over_itself():
    decision = decide_promotion(evidence(), PARAMS, challenger_version="1")
    assert not decision.promoted and "already" in decision.reason


def test_evidence_tags_are_strings_with_intervals_written_out():
    tags = evidence().tags()
    assert tags["promotion_metric_delta_interval"] == "0.1..0.3"
    assert tags["promotion_champion_metric"] == "0.6"
    assert evidence(champion_metric=None).tags()["promotion_champion_metric"] == "none"
    assert all(isinstance(value, str) for value in tags.values())
