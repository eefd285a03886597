"""One-off (issue 9): after the lower-decile centring, would more blur or dividing each map by
its own spread help localization? Validation only, offline, on the uncentred maps that
`image_validation.py --maps-dir DIR` saved (`DIR/0.npy`, `DIR/masks.npy`). Printed per set:
pixel AUROC and AUPRO@0.3 of the centred maps with extra Gaussian blur (total sigma given, the
graph's 8 included) and divided by three spreads of their own values.

    PYTHONPATH=src:benchmarks/results python benchmarks/results/map_rescaling_scan.py DIR [DIR ...]
"""

import sys

import numpy as np
from centring_quantile_scan import centred, own_offsets
from scipy.ndimage import gaussian_filter

from normalcy.evaluation.pixel_metrics import pixel_metrics

GRAPH_SIGMA = 8.0


def main() -> None:
    for folder in sys.argv[1:]:
        maps = np.load(f"{folder}/0.npy").astype(np.float64)
        masks = np.load(f"{folder}/masks.npy")
        base = centred(maps, 0.1)
        variants = {}
        for extra in (0.0, 4.0, 6.0, 8.9):
            blurred = base if extra == 0 else np.stack([gaussian_filter(m, extra) for m in base])
            variants[f"total sigma {np.hypot(GRAPH_SIGMA, extra):.1f}"] = blurred
        q05, q10, q25, q50 = (own_offsets(maps, q) for q in (0.05, 0.1, 0.25, 0.5))
        variants["/ (q50 - q10)"] = base / (q50 - q10)
        variants["/ (q25 - q05)"] = base / (q25 - q05)
        variants["/ sqrt(q50 - q10)"] = base / np.sqrt(q50 - q10)
        for name, variant in variants.items():
            figures = pixel_metrics(variant, masks)
            print(
                f"{folder} {name}: pixel {figures['pixel_auroc']:.4f} aupro {figures['aupro']:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
