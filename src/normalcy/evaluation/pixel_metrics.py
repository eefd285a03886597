"""Localization metrics on raw anomaly maps: pixel AUROC, AUPRO, and image metrics per defect type.

Raw scores only: a sigmoid or a per-batch normalization before a rank metric changes the ranking
across images (anomalib 2.7's evaluator does this). AUPRO follows the MVTec AD reference
(Bergmann et al. 2021): one threshold sweep over all pixels of all images; ground-truth regions
are the 8-connected components of each image's mask; the x axis is the false positive rate over
every defect-free pixel; the y axis is the mean over regions of the share of the region above
the threshold; the area up to `fpr_limit` (linearly interpolated there) is divided by
`fpr_limit`. (anomalib <= 2.2 divides by the wrong endpoint: its issues #1651 and #3718.)

Memory: the pixels are sorted once; no [thresholds, pixels] matrix is built. When nearly every
map value is distinct (float maps), the curves have a point per pixel: the peak is about 56
bytes a pixel beyond the maps, 2.0 GB for 543 maps of 256 x 256, in about 20 s on one core
(`benchmarks/speed_pixel_metrics.py`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from normalcy.evaluation.metrics import ranking_metrics

GOOD = "good"


def _check_maps(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"anomaly maps {list(maps.shape)} and masks {list(masks.shape)}; expected both "
            "[n, h, w] with the same shape (maps at the mask resolution)"
        )
    if not np.isfinite(maps).all():
        raise ValueError(f"anomaly maps hold {int((~np.isfinite(maps)).sum())} NaN/inf values")
    if not np.isin(masks, (0, 1)).all():
        raise ValueError("masks must hold 0 (defect-free) and 1 (defect) only; binarize first")
    return maps, masks


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Region id per pixel (0 for defect-free), 8-connected within each image, never across
    images (the structure connects nothing along the image axis)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    return ndimage.label(masks.astype(bool), structure=structure)


def threshold_curves(
    maps: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, PRO) at every distinct map value, from the highest down, starting at 0.

    Ties share one point, so a tie between a defect and a defect-free pixel counts half in the
    AUROC, as in the Mann-Whitney statistic."""
    maps, masks = _check_maps(maps, masks)
    regions, n_regions = _regions(masks)
    regions = regions.ravel()
    n_negative = int((regions == 0).sum())
    n_positive = len(regions) - n_negative
    if n_negative == 0 or n_positive == 0:
        nan = np.array([np.nan])
        return nan, nan, nan
    order = np.argsort(maps.ravel())[::-1]  # ties are grouped below: no stable sort needed
    sorted_regions = regions[order]
    del regions
    sorted_scores = maps.ravel()[order]
    del order
    # The last pixel of each run of equal scores closes one threshold.
    closes = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    del sorted_scores
    count = np.int32 if len(sorted_regions) < 2**31 else np.int64
    false_positives = np.cumsum(sorted_regions == 0, dtype=count)[closes]
    fpr = false_positives / n_negative
    tpr = (closes + 1 - false_positives) / n_positive  # pixels above a threshold, less the FPs
    region_share = 1.0 / (np.bincount(sorted_regions, minlength=n_regions + 1) * n_regions)
    region_share[0] = 0.0
    overlap = region_share[sorted_regions]
    del sorted_regions
    pro = np.cumsum(overlap, out=overlap)[closes]
    start = np.zeros(1)
    return np.r_[start, fpr], np.r_[start, tpr], np.r_[start, pro]


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) from 0 to `x_max`, with y linearly interpolated at `x_max`.
    `x` is non-decreasing (vertical steps add no area)."""
    end = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:end], y[:end]
    if end < len(x) and xs[-1] < x_max:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)]
    return float(np.trapezoid(ys, xs))


def _check_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit={fpr_limit}; expected a false positive rate in (0, 1]")


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> dict:
    """{"pixel_auroc", "aupro"} from one sort; NaN when there is no defect or no clean pixel."""
    _check_limit(fpr_limit)
    fpr, tpr, pro = threshold_curves(maps, masks)
    if np.isnan(fpr).any():
        return {"pixel_auroc": float("nan"), "aupro": float("nan")}
    return {
        "pixel_auroc": float(np.trapezoid(tpr, fpr)),
        "aupro": area_up_to(fpr, pro, fpr_limit) / fpr_limit,
    }


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Area under the pixel-level ROC curve over all pixels of all images."""
    return pixel_metrics(maps, masks)["pixel_auroc"]


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalized by `fpr_limit`."""
    return pixel_metrics(maps, masks, fpr_limit)["aupro"]


def per_defect_metrics(
    scores: np.ndarray, defects: np.ndarray, good: str = GOOD
) -> dict[str, dict[str, float]]:
    """Image AUROC/AUPRC of each defect type against all defect-free images:
    {defect: {"image_auroc", "image_auprc", "n"}} (n: images of that defect)."""
    scores, defects = np.asarray(scores, dtype=np.float64), np.asarray(defects).astype(str)
    if scores.shape != defects.shape or scores.ndim != 1:
        raise ValueError(
            f"scores {list(scores.shape)} and defects {list(defects.shape)}; expected one "
            "defect name per image score"
        )
    is_good = defects == good
    table = {}
    for defect in sorted(set(defects[~is_good].tolist())):
        rows = is_good | (defects == defect)
        metrics = ranking_metrics((defects[rows] == defect).astype(int), scores[rows])
        table[defect] = {
            "image_auroc": metrics["auroc"],
            "image_auprc": metrics["auprc"],
            "n": int((defects == defect).sum()),
        }
    return table
