"""PNG plots for MLflow: ROC and PR curves, score histograms with the threshold."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402


def plot_roc_pr(labels: np.ndarray, scores: np.ndarray, title: str, path: str | Path) -> Path:
    """ROC and precision-recall curves side by side."""
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    roc_ax.plot(fpr, tpr)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC - {title}")
    pr_ax.plot(recall, precision)
    pr_ax.axhline(np.mean(labels), linestyle="--", color="grey", label="anomaly rate")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"PR - {title}")
    pr_ax.legend()
    return _save(fig, path)


def plot_score_histogram(
    scores: np.ndarray, labels: np.ndarray | None, threshold: float, title: str, path: str | Path
) -> Path:
    """Score distributions of normals and anomalies, with the calibrated threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # Reconstruction errors and distances are heavy-tailed: a log axis keeps the bulk visible.
    log_axis = scores.min() > 0 and scores.max() / scores.min() > 100
    bins = (
        np.geomspace(scores.min(), scores.max(), 41)
        if log_axis
        else np.histogram_bin_edges(scores, bins=40)
    )
    if log_axis:
        ax.set_xscale("log")
    if labels is None:
        ax.hist(scores, bins=bins, alpha=0.7, label="all")
    else:
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal", density=True)
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomaly", density=True)
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="anomaly score", ylabel="density", title=title)
    ax.legend()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
