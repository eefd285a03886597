"""A paired bootstrap of the pixel metrics (pixel AUROC, AUPRO@0.3) of two configs scored on the
same validation images: `image_validation.py --maps-dir DIR` saves each config's maps
(`DIR/<config index>.npy`) and the masks (`DIR/masks.npy`). Images are resampled with
replacement (`normalcy.evaluation.bootstrap.bootstrap_rows`: a draw without a defective or
without a good image is drawn again), the same draw for both configs.

Sorting every pixel per resample takes about 17 s for 399 maps of 256 x 256, so each config's
pixels are first counted per image (defect-free pixels) and per ground-truth region (8-connected,
as `normalcy.evaluation.pixel_metrics`) in score bins at 4096 quantiles of its map values; a
resample then only weights those counts. The binned figures are printed beside the exact ones.

    PYTHONPATH=src python benchmarks/results/paired_pixel_metrics.py DIR_A/0.npy DIR_B/1.npy \
        [--resamples 2000]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from normalcy.evaluation.bootstrap import bootstrap_rows, percentile_interval
from normalcy.evaluation.pixel_metrics import area_up_to, pixel_metrics

METRICS = ("pixel_auroc", "aupro")
BINS = 4096
FPR_LIMIT = 0.3


class BinnedPixels(NamedTuple):
    good: np.ndarray  # [images, bins] defect-free pixels per score bin, highest bin first
    defect: np.ndarray  # [images, bins] defect pixels per score bin
    region_share: np.ndarray  # [regions, bins] share of each region at or above each bin
    region_image: np.ndarray  # [regions] the image each region is in


def binned_pixels(maps: np.ndarray, masks: np.ndarray) -> BinnedPixels:
    """Count each image's pixels in score bins (edges at quantiles of all map values)."""
    quantiles = np.linspace(0, 1, BINS + 1)[1:-1]
    edges = np.unique(np.quantile(np.asarray(maps[:, ::2, ::2]).ravel(), quantiles))
    n_bins = len(edges) + 1
    good, defect, shares, owners = [], [], [], []
    for image, (values, mask) in enumerate(zip(maps, masks, strict=True)):
        bins = n_bins - 1 - np.searchsorted(edges, np.ravel(values), side="right")  # 0: highest
        labels, n_regions = ndimage.label(mask.astype(bool), structure=np.ones((3, 3)))
        labels = labels.ravel()
        counts = np.bincount(labels * n_bins + bins, minlength=(n_regions + 1) * n_bins)
        counts = counts.reshape(n_regions + 1, n_bins)
        good.append(counts[0])
        defect.append(counts[1:].sum(axis=0))
        if n_regions:
            regions = counts[1:]
            shares.append(np.cumsum(regions, axis=1) / regions.sum(axis=1, keepdims=True))
            owners.append(np.full(n_regions, image))
    return BinnedPixels(
        np.array(good), np.array(defect), np.concatenate(shares), np.concatenate(owners)
    )


def weighted_metrics(pixels: BinnedPixels, weights: np.ndarray) -> dict[str, float]:
    """Pixel AUROC and AUPRO with each image counted `weights[image]` times."""
    false_positives = np.cumsum(weights @ pixels.good)
    true_positives = np.cumsum(weights @ pixels.defect)
    region_weights = weights[pixels.region_image]
    if false_positives[-1] == 0 or region_weights.sum() == 0:
        return {metric: float("nan") for metric in METRICS}
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    pro = np.r_[0.0, region_weights @ pixels.region_share / region_weights.sum()]
    return {
        "pixel_auroc": float(np.trapezoid(tpr, fpr)),
        "aupro": area_up_to(fpr, pro, FPR_LIMIT) / FPR_LIMIT,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    masks = np.load(args.a.parent / "masks.npy")
    if not np.array_equal(masks, np.load(args.b.parent / "masks.npy")):
        raise SystemExit("the two configs were not scored on the same validation images")
    binned, observed = {}, {}
    for label, path in (("A", args.a), ("B", args.b)):
        maps = np.load(path)
        binned[label] = binned_pixels(maps, masks)
        exact = pixel_metrics(maps, masks)
        observed[label] = weighted_metrics(binned[label], np.ones(len(masks)))
        print(
            f"{label} {path}: "
            + ", ".join(f"{m} {exact[m]:.4f} (binned {observed[label][m]:.4f})" for m in METRICS)
        )
    has_defect = masks.reshape(len(masks), -1).any(axis=1)
    deltas: dict[str, list[float]] = {metric: [] for metric in METRICS}
    for rows in bootstrap_rows(has_defect, args.resamples, args.seed):
        weights = np.bincount(rows, minlength=len(masks))
        a, b = (weighted_metrics(binned[label], weights) for label in ("A", "B"))
        for metric in METRICS:
            deltas[metric].append(a[metric] - b[metric])
    for metric in METRICS:
        values = np.array(deltas[metric])
        low95, high95 = percentile_interval(values, 0.95)
        print(
            f"{metric}: A - B {observed['A'][metric] - observed['B'][metric]:+.4f} (binned), "
            f"95% [{low95:+.4f}, {high95:+.4f}], share <= 0: {np.mean(values <= 0):.3f} "
            f"({args.resamples} resamples, each with defective and good images)"
        )


if __name__ == "__main__":
    main()
