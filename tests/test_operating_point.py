"""Thresholds set by calibration.mode, and what the report says they do."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from normalcy.calibration import realised_fpr
from normalcy.config import CalibrationParams
from normalcy.evaluation.operating_point import (
    choose_threshold,
    min_cost_threshold,
    operating_report,
)


def validation(n: int = 2000, rate: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(int)
    return rng.normal(size=n) + 3.0 * y, y


def test_target_fpr_is_the_default_mode():
    scores, y = validation()
    chosen = choose_threshold(scores, y, CalibrationParams())
    assert chosen.target_fpr == 0.01 and "target FPR" in chosen.how
    assert realised_fpr(scores[y == 0], chosen.value) <= 0.01


def test_alert_budget_leaves_room_for_the_expected_anomalies():
    scores, y = validation(rate=0.05)
    params = CalibrationParams(mode="alert_budget", alert_budget=80, rows_per_period=1000)
    chosen = choose_threshold(scores, y, params)
    rate = y.mean()
    assert chosen.target_fpr == pytest.approx((0.08 - rate) / (1 - rate))
    # flagged share of all validation rows: anomalies (mostly flagged) + normals at that FPR
    assert np.mean(scores > chosen.value) <= 0.08 + 0.01
    unlabelled = choose_threshold(scores, None, params)  # no rate known: the budget is all FPR
    assert unlabelled.target_fpr == pytest.approx(0.08)
    overspent = CalibrationParams(
        mode="alert_budget", alert_budget=10, rows_per_period=1000, expected_anomaly_rate=0.05
    )
    with pytest.raises(ValueError, match="anomalies alone"):
        choose_threshold(scores, y, overspent)


def test_min_cost_moves_the_threshold_with_the_costs():
    scores, y = validation()
    cheap_misses = choose_threshold(scores, y, CalibrationParams(mode="min_cost", cost_miss=1.0))
    dear_misses = choose_threshold(scores, y, CalibrationParams(mode="min_cost", cost_miss=100.0))
    assert dear_misses.value < cheap_misses.value  # costly misses: flag more
    assert dear_misses.target_fpr > cheap_misses.target_fpr
    with pytest.raises(ValueError, match="needs labelled anomalies"):
        choose_threshold(scores, None, CalibrationParams(mode="min_cost"))


def test_min_cost_threshold_matches_a_brute_force_search():
    normal = np.array([0.0, 1.0, 2.0, 3.0])
    anomalies = np.array([2.5, 4.0])
    params = CalibrationParams(mode="min_cost", cost_false_alarm=1.0, cost_miss=5.0)
    threshold, cost = min_cost_threshold(normal, anomalies, 0.2, params)

    def expected_cost(t: float) -> float:
        fpr, recall = np.mean(normal > t), np.mean(anomalies > t)
        return 1.0 * 0.8 * fpr + 5.0 * 0.2 * (1 - recall)

    grid = np.linspace(-1, 5, 601)
    assert cost == pytest.approx(min(expected_cost(t) for t in grid))
    assert expected_cost(threshold) == pytest.approx(cost)


def test_alert_budget_params_are_checked_before_any_work():
    with pytest.raises(ValidationError, match="needs calibration.alert_budget"):
        CalibrationParams(mode="alert_budget")
    with pytest.raises(ValidationError, match="must be below"):
        CalibrationParams(mode="alert_budget", alert_budget=10, rows_per_period=5)
    with pytest.raises(ValidationError):
        CalibrationParams(mode="cheapest")


def test_operating_report_gives_rates_with_intervals():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    params = CalibrationParams(rows_per_period=1000, expected_anomaly_rate=0.01)
    report = operating_report(labels, scores, 0.55, params)
    assert report["fpr"] == pytest.approx(1 / 3) and report["recall"] == 0.5
    assert report["precision"] == 0.5 and report["alert_rate"] == 0.4
    for name in ("fpr", "recall", "precision", "alert_rate"):
        assert report[f"{name}_low"] <= report[name] <= report[f"{name}_high"]
    assert report["alerts_per_period"] == pytest.approx(400.0)
    # at a 1% base rate, recall 0.5 and FPR 1/3 make a poor precision: 0.005 / (0.005 + 0.33)
    assert report["precision_at_expected_rate"] == pytest.approx(0.005 / (0.005 + 0.99 / 3))
    unlabelled = operating_report(None, scores, 0.55, CalibrationParams())
    assert set(unlabelled) == {"alert_rate", "alert_rate_low", "alert_rate_high"}


def test_unlabelled_validation_leaves_out_the_share_cleaning_removed():
    from normalcy.data.splits import Split
    from normalcy.pipeline.evaluate import estimated_contamination, without_top

    train = Split(np.zeros((200, 2), np.float32), None, np.arange(200))
    cleaned = Split(train.X[:190], None, train.ids[:190])
    assert estimated_contamination(train, cleaned) == pytest.approx(0.05)
    assert estimated_contamination(train, train) == 0.0
    rng = np.random.default_rng(0)
    normal = rng.normal(size=950)
    scores = np.r_[normal, 8 + rng.random(50)]  # 5% anomalies above every normal score
    kept = without_top(scores, 0.05)
    assert len(kept) == 950 and kept.max() == normal.max()
    # the threshold then holds the target on normal rows; untrimmed, it sits in the anomalies
    trimmed = choose_threshold(kept, None, CalibrationParams())
    untrimmed = choose_threshold(scores, None, CalibrationParams())
    assert realised_fpr(normal, trimmed.value) == pytest.approx(0.01, abs=0.003)
    assert realised_fpr(normal, untrimmed.value) == 0.0
    assert len(without_top(scores[:3], 0.9)) == 1  # never empty
