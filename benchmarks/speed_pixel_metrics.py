"""What pixel AUROC and AUPRO cost at the size of a real test split, and a cross-check.

    python benchmarks/speed_pixel_metrics.py [--images 543] [--size 256] [--sklearn]
        [--out pixel_metrics.json]

The default is the magnetic tile test folder at 256 px (543 maps, 35.6 M pixels). Maps are
smooth random fields with raised defect blobs (masks from thresholded smooth noise, so regions
vary in size and shape), as float32. It times `pixel_metrics` (one sort for both metrics) and
records the peak memory numpy allocated during the call (tracemalloc); with `--sklearn` it also
times scikit-learn's `roc_auc_score` on the same pixels and reports the difference between the
two AUROCs. One run each: the machine may be shared, so read the seconds as an order of size.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage


def synthetic_maps(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(maps float32 [n, size, size], masks uint8): half the images have defect regions."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    for i in range(n_images):
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 32)
        field = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 16)
        if i % 2:
            masks[i] = field > np.quantile(field, 0.97)
        maps[i] = noise / noise.std() + 1.5 * masks[i]
    return maps, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=543)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sklearn", action="store_true", help="also time roc_auc_score")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from normalcy.evaluation.pixel_metrics import pixel_metrics

    maps, masks = synthetic_maps(args.images, args.size)
    tracemalloc.start()
    start = time.perf_counter()
    metrics = pixel_metrics(maps, masks)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    result = {
        "images": args.images,
        "size": args.size,
        "pixels": int(maps.size),
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["aupro"],
        "seconds": seconds,
        "peak_bytes": peak,
        "peak_bytes_per_pixel": peak / maps.size,
    }
    if args.sklearn:
        from sklearn.metrics import roc_auc_score

        start = time.perf_counter()
        reference = roc_auc_score(masks.ravel(), maps.ravel())
        result["sklearn_seconds"] = time.perf_counter() - start
        result["sklearn_auroc_abs_diff"] = abs(reference - metrics["pixel_auroc"])
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(
            f"{key:>{width}}  {value:.6g}"
            if isinstance(value, float)
            else f"{key:>{width}}  {value}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
