"""Model selection on validation data only: AUPRC with labels, a synthetic-anomaly AUROC without."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

LABELLED_METRIC = "val_auprc"
LABEL_FREE_METRIC = "val_synthetic_auroc"


def shuffled_features(X: np.ndarray, seed: int) -> np.ndarray:
    """Synthetic anomalies: each feature permuted independently across rows. Every marginal
    stays the same, but the dependencies between features that define normal data are gone."""
    flat = X.reshape(len(X), -1).copy()
    rng = np.random.default_rng(seed)
    for column in range(flat.shape[1]):
        flat[:, column] = flat[rng.permutation(len(flat)), column]
    return flat.reshape(X.shape)


def label_free_score(
    score: Callable[[np.ndarray], np.ndarray], val_X: np.ndarray, seed: int
) -> float:
    """AUROC of telling held-out validation rows from their feature-shuffled copies.

    It uses no labels, so it works when validation has no labelled anomalies. A detector that
    learnt the joint structure of normal data ranks the shuffled copies higher."""
    synthetic = shuffled_features(val_X, seed)
    scores = np.concatenate([score(val_X), score(synthetic)])
    labels = np.concatenate([np.zeros(len(val_X)), np.ones(len(synthetic))])
    return float(roc_auc_score(labels, scores))


def validation_metric(
    score: Callable[[np.ndarray], np.ndarray],
    val_X: np.ndarray,
    val_y: np.ndarray | None,
    seed: int,
    trains_on_synthetic_anomalies: bool = False,
) -> tuple[str, float]:
    """(metric name, value): AUPRC when validation has both classes labelled, else label-free.

    A method trained against synthetic outliers (outlier exposure) gets NaN from the label-free
    criterion, which would only replay its training task and always rank it first; NaN makes
    it ineligible to win (and to join the ensemble) when validation has no labels."""
    if val_y is not None and 0 < int(np.sum(val_y)) < len(val_y):
        return LABELLED_METRIC, float(average_precision_score(val_y, score(val_X)))
    if trains_on_synthetic_anomalies:
        return LABEL_FREE_METRIC, float("nan")
    return LABEL_FREE_METRIC, label_free_score(score, val_X, seed)


@dataclass
class CandidateResult:
    name: str
    metric_name: str
    metric: float
    exportable: bool
    fit_seconds: float
    extra: dict = field(default_factory=dict)


def select_winner(results: list[CandidateResult]) -> CandidateResult:
    """Best validation metric among exportable candidates; config order breaks ties.

    A non-exportable method (inference that is not a graph) can never be the registered winner."""
    eligible = [r for r in results if r.exportable and np.isfinite(r.metric)]
    if not eligible:
        names = [r.name for r in results]
        raise ValueError(
            f"no exportable candidate with a finite validation metric among {names} (without "
            "labelled validation anomalies, methods trained on synthetic outliers cannot be "
            "judged; add another candidate)"
        )
    return max(eligible, key=lambda r: (r.metric, -results.index(r)))
