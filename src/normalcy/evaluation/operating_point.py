"""Where to put the threshold, in terms people reason about, and what it does.

`calibration.mode` says what the threshold must achieve on validation data:
- `target_fpr`: flag at most that share of normal rows;
- `alert_budget`: at most `alert_budget` alerts per period given `rows_per_period` scored rows,
  counting the expected anomalies too (all assumed flagged, so the budget holds);
- `min_cost`: the lowest expected cost per row, `cost_false_alarm x (1 - rate) x FPR +
  cost_miss x rate x (1 - recall)`, with FPR and recall measured on labelled validation rows.

Every mode ends as a threshold on the validation normal scores, so the rest of normalcy (the
graph's head, recalibration, promotion's alert-rate check) keeps working with the effective
false-positive rate it implies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from normalcy.calibration import realised_fpr, threshold_at_fpr
from normalcy.config import CalibrationParams
from normalcy.evaluation.bootstrap import wilson_interval

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Threshold:
    """A threshold, the false-positive rate it was set for, and why (for the card and logs)."""

    value: float
    target_fpr: float
    how: str


def anomaly_rate(val_y: np.ndarray | None, params: CalibrationParams) -> float | None:
    """The expected share of anomalies: `expected_anomaly_rate` when set, else the labelled
    validation split's own rate, else unknown."""
    if params.expected_anomaly_rate is not None:
        return params.expected_anomaly_rate
    if val_y is not None and 0 < int(val_y.sum()) < len(val_y):
        return float(np.mean(val_y))
    return None


def budget_fpr(params: CalibrationParams, rate: float | None) -> float:
    """The false-positive rate that spends what the anomalies leave of the alert budget."""
    share = params.alert_budget / params.rows_per_period
    rate = rate or 0.0
    fpr = (share - rate) / (1 - rate)
    if fpr <= 0:
        raise ValueError(
            f"calibration.alert_budget={params.alert_budget:g} per {params.rows_per_period:g} "
            f"rows is {share:.3g} of rows, but the expected anomalies alone are {rate:.3g}; "
            "expected a budget above the anomaly rate"
        )
    return min(fpr, 0.5)


def min_cost_threshold(
    normal_scores: np.ndarray, anomaly_scores: np.ndarray, rate: float, params: CalibrationParams
) -> tuple[float, float]:
    """(threshold, expected cost per row) over every distinct validation score as a candidate
    threshold (the largest flags nothing), and one just below them all (flags everything)."""
    scores = np.unique(np.r_[normal_scores, anomaly_scores])
    candidates = np.r_[np.nextafter(scores[0], -np.inf), scores]
    normals = np.sort(normal_scores)
    anomalies = np.sort(anomaly_scores)
    fpr = 1 - np.searchsorted(normals, candidates, side="right") / len(normals)
    recall = 1 - np.searchsorted(anomalies, candidates, side="right") / len(anomalies)
    cost = params.cost_false_alarm * (1 - rate) * fpr + params.cost_miss * rate * (1 - recall)
    best = int(np.argmin(cost))  # the first minimum: the lowest threshold, the most recall
    return float(candidates[best]), float(cost[best])


def choose_threshold(
    val_scores: np.ndarray, val_y: np.ndarray | None, params: CalibrationParams
) -> Threshold:
    """The threshold `calibration.mode` asks for, from validation scores only."""
    normal = val_scores if val_y is None else val_scores[val_y == 0]
    rate = anomaly_rate(val_y, params)
    if params.mode == "target_fpr":
        value = threshold_at_fpr(normal, params.target_fpr)
        return Threshold(value, params.target_fpr, f"target FPR {params.target_fpr:g}")
    if params.mode == "alert_budget":
        fpr = budget_fpr(params, rate)
        how = (
            f"at most {params.alert_budget:g} alerts per {params.rows_per_period:g} rows "
            f"(anomaly rate {rate or 0:.3g}): FPR {fpr:.3g}"
        )
        return Threshold(threshold_at_fpr(normal, fpr), fpr, how)
    if val_y is None or not 0 < int(val_y.sum()) < len(val_y):
        raise ValueError(
            "calibration.mode min_cost needs labelled anomalies in the validation split, which "
            "has none; use target_fpr or alert_budget"
        )
    value, cost = min_cost_threshold(normal, val_scores[val_y == 1], rate, params)
    fpr = max(realised_fpr(normal, value), 1.0 / len(normal))
    how = (
        f"min expected cost (false alarm {params.cost_false_alarm:g}, miss "
        f"{params.cost_miss:g}, anomaly rate {rate:.3g}): {cost:.4g} per row"
    )
    return Threshold(value, fpr, how)


def _rate_with_interval(name: str, hits: int, trials: int, confidence: float) -> dict:
    if trials == 0:
        return {name: float("nan"), f"{name}_low": float("nan"), f"{name}_high": float("nan")}
    low, high = wilson_interval(hits, trials, confidence)
    return {name: hits / trials, f"{name}_low": low, f"{name}_high": high}


def operating_report(
    labels: np.ndarray | None,
    scores: np.ndarray,
    threshold: float,
    params: CalibrationParams,
    confidence: float = 0.9,
) -> dict[str, float]:
    """What the threshold does on reported (test) rows, with Wilson intervals: alert rate,
    and with labels precision, recall and FPR; expected alerts per period when
    `rows_per_period` is set, and precision at `expected_anomaly_rate` (the production base
    rate, which the test split's own rate need not match) when that is set."""
    flagged = np.asarray(scores) > threshold
    report = _rate_with_interval("alert_rate", int(flagged.sum()), len(flagged), confidence)
    if params.rows_per_period is not None:
        for key in ("alert_rate", "alert_rate_low", "alert_rate_high"):
            suffix = key.removeprefix("alert_rate")
            report[f"alerts_per_period{suffix}"] = report[key] * params.rows_per_period
    if labels is None:
        return report
    anomalies = np.asarray(labels).astype(bool)
    hits = int((flagged & anomalies).sum())
    report |= _rate_with_interval("recall", hits, int(anomalies.sum()), confidence)
    report |= _rate_with_interval("precision", hits, int(flagged.sum()), confidence)
    report |= _rate_with_interval(
        "fpr", int((flagged & ~anomalies).sum()), int((~anomalies).sum()), confidence
    )
    rate = params.expected_anomaly_rate
    if rate is not None and anomalies.any() and (~anomalies).any():
        found, false = rate * report["recall"], (1 - rate) * report["fpr"]
        report["precision_at_expected_rate"] = found / (found + false) if found + false else 0.0
    return report
