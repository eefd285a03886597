"""Ranking and threshold metrics. Test metrics are computed once, for reporting only."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC (average precision); NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
    }


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """What the calibrated threshold does: false-positive rate, recall, precision, alert rate."""
    flagged = np.asarray(scores) > threshold
    labels = np.asarray(labels).astype(bool)
    normals, anomalies = ~labels, labels
    true_positives = int((flagged & anomalies).sum())
    return {
        "fpr": float(flagged[normals].mean()) if normals.any() else float("nan"),
        "recall": float(flagged[anomalies].mean()) if anomalies.any() else float("nan"),
        "precision": true_positives / int(flagged.sum()) if flagged.any() else float("nan"),
        "alert_rate": float(flagged.mean()),
    }
