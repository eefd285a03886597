"""One-off (issue 9): would re-centring each anomaly map help localization? Validation only.

The paired validation set with faint cracks (`image_validation.py --defective-copies 2
--crack-opacity 0.2`); padim (lite2, 448 px, blur 8, per_image, the example's default) fitted
on 400 of the 533 fit images, the other 133 (good, held out) giving each map position's mean and
standard deviation. Printed: pixel AUROC, AUPRO@0.3 and the image AUROC of the map's peak for
the raw maps, each position standardized, and each map minus its own median. Run from the
repository root (about 7 minutes on 2 threads):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=src:benchmarks \
        python benchmarks/results/map_centering_scan.py ../shared/data/images/magnetic_tile
"""

import sys
import time

import numpy as np
from image_validation import validation_set
from quality_images import image_and_pixel_metrics

from normalcy.data.mvtec import load_mvtec
from normalcy.detectors import create_detector
from normalcy.evaluation.metrics import ranking_metrics

PADIM = {
    "backbone": "efficientnet_lite2",
    "image_size": 448,
    "blur_sigma": 8.0,
    "intensity": "per_image",
}


def report(name: str, maps: np.ndarray, labels, masks, kinds) -> None:  # noqa: ANN001
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    r = image_and_pixel_metrics(peaks, maps, labels, masks, kinds)
    print(
        f"{name}: pixel AUROC {r['pixel_auroc']:.4f}, AUPRO {r['aupro']:.4f}, "
        f"image AUROC of the map's peak {r['image_auroc']:.4f}",
        flush=True,
    )


def main() -> int:
    train = load_mvtec(sys.argv[1], "train", 256)
    fit, images, labels, masks, kinds = validation_set(train.X, 0, 2, 0.2)
    order = np.random.default_rng(1).permutation(len(fit))
    reference, fit = fit[np.sort(order[:133])], fit[np.sort(order[133:])]
    started = time.perf_counter()
    detector = create_detector("padim", **PADIM).fit(fit)
    print(f"fitted on {len(fit)} images in {time.perf_counter() - started:.0f} s", flush=True)
    good = detector.predict(reference)["anomaly_map"].astype(np.float64)
    out = detector.predict(images)
    maps = out["anomaly_map"].astype(np.float64)
    mean, std = good.mean(axis=0), good.std(axis=0) + 1e-6
    own_median = np.median(maps.reshape(len(maps), -1), axis=1)[:, None, None]
    print(f"position means of the held-out good maps: {mean.min():.2f} to {mean.max():.2f}")
    low, middle, high = np.percentile(own_median[labels == 0, 0, 0], [5, 50, 95])
    print(f"median of each good validation map, 5/50/95%: {low:.2f} / {middle:.2f} / {high:.2f}")
    own_score = ranking_metrics(labels, out["score"])["auroc"]  # no pixel metrics needed here
    print(f"image AUROC of the detector's own score: {own_score:.4f}")
    report("raw maps", maps, labels, masks, kinds)
    report("each position standardized", (maps - mean) / std, labels, masks, kinds)
    report("each map minus its own median", maps - own_median, labels, masks, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
