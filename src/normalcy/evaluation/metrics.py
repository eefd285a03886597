"""Ranking metrics (threshold metrics: `operating_point.operating_report`). Test metrics are
computed once, for reporting only."""

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
