"""PNG plots for MLflow: ROC and PR curves, score histograms with the threshold, drift, and
anomaly-map overlays on images."""

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
    bins = _score_bins(ax, scores)
    if labels is None:
        ax.hist(scores, bins=bins, alpha=0.7, label="all")
    else:
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal", density=True)
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomaly", density=True)
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="anomaly score", ylabel="density", title=title)
    ax.legend()
    return _save(fig, path)


def _score_bins(ax: plt.Axes, scores: np.ndarray) -> np.ndarray:
    """40 bins over the scores; a log axis when they are positive and span over 100x:
    reconstruction errors and distances are heavy-tailed, and a log axis keeps the bulk
    visible."""
    log_axis = scores.min() > 0 and scores.max() / scores.min() > 100
    if log_axis:
        ax.set_xscale("log")
        return np.geomspace(scores.min(), scores.max(), 41)
    return np.histogram_bin_edges(scores, bins=40)


def plot_drift(
    reference_scores: np.ndarray,
    batch_scores: np.ndarray,
    threshold: float,
    features: list[tuple[str, float, bool]],
    title: str,
    path: str | Path,
    most: int = 20,
) -> Path:
    """A drift report at a glance: the batch's scores over the reference's, with the
    threshold, and the `most` features with the largest KS statistic (drifted ones in red)."""
    fig, (scores_ax, features_ax) = plt.subplots(1, 2, figsize=(12, 4.6))
    bins = _score_bins(scores_ax, np.concatenate([reference_scores, batch_scores]))
    scores_ax.hist(reference_scores, bins=bins, alpha=0.6, density=True, label="reference")
    scores_ax.hist(batch_scores, bins=bins, alpha=0.6, density=True, label="batch")
    scores_ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g}")
    scores_ax.set(xlabel="anomaly score", ylabel="density", title=f"scores - {title}")
    scores_ax.legend()
    top = sorted(features, key=lambda f: -f[1])[:most][::-1]
    features_ax.barh(
        [name for name, _, _ in top],
        [statistic for _, statistic, _ in top],
        color=["tab:red" if drifted else "tab:grey" for _, _, drifted in top],
    )
    features_ax.set(xlabel="KS statistic (red: drifted)", title=f"features - {title}")
    return _save(fig, path)


def plot_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    map_range: tuple[float, float],
    title: str,
    path: str | Path,
) -> Path:
    """An image `[c, h, w]` (0..255) beside the same image under its anomaly map as a heatmap,
    both with the ground-truth contour (green) when there is a mask. `map_range` is shared by
    every overlay of a run, so colours compare across images (raw scores, never rescaled per
    image)."""
    picture = np.asarray(image, dtype=np.float64)
    picture = picture[0] if picture.shape[0] == 1 else picture.transpose(1, 2, 0) / 255.0
    gray = {"cmap": "gray", "vmin": 0, "vmax": 255} if picture.ndim == 2 else {}
    fig, (image_ax, map_ax) = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax in (image_ax, map_ax):
        ax.imshow(picture, **gray)
        if mask is not None and mask.any():
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
        ax.set_axis_off()
    heat = map_ax.imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=map_range[0], vmax=map_range[1])
    fig.colorbar(heat, ax=map_ax, fraction=0.046, pad=0.04, label="anomaly map")
    image_ax.set_title(title, fontsize=9)
    map_ax.set_title("map (green: ground truth)", fontsize=9)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
