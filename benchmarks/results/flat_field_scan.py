"""One-off check behind benchmarks/README.md ("intensity: per_image", flat field): does dividing
each image by its own heavily blurred copy (a flat-field correction for lighting that varies
within an image) help padim beyond `intensity: per_image`? Validation data only (the paired set
of `image_validation.py --defective-copies 2`), the transform applied to the images before fit
and scoring, as a graph layer would.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=src:benchmarks \
        python benchmarks/results/flat_field_scan.py SIGMA_FRACTION OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from image_validation import evaluate, validation_set
from scipy.ndimage import gaussian_filter

from normalcy.data.mvtec import load_mvtec


def flat_field(images: np.ndarray, sigma_fraction: float) -> np.ndarray:
    """Each image divided by its Gaussian-blurred copy (sigma a fraction of the side, reflected
    at the borders), times its own mean: lighting at scales above sigma is removed, the
    overall level is kept."""
    x = images.astype(np.float64)
    sigma = (0, 0, sigma_fraction * x.shape[-2], sigma_fraction * x.shape[-1])
    low = gaussian_filter(x, sigma=sigma, mode="reflect", truncate=4.0)
    level = x.mean(axis=(1, 2, 3), keepdims=True)
    out = x / np.maximum(low, 1.0) * level
    return np.clip(out, 0, 255).astype(images.dtype)


def main() -> None:
    sigma_fraction, out = float(sys.argv[1]), Path(sys.argv[2])
    train = load_mvtec(Path("../shared/data/images/magnetic_tile"), "train", 256)
    fit, images, labels, masks, kinds = validation_set(train.X, 0, copies=2)
    fit, images = flat_field(fit, sigma_fraction), flat_field(images, sigma_fraction)
    config = {
        "detector": "padim",
        "backbone": "efficientnet_lite2",
        "image_size": 448,
        "blur_sigma": 8.0,
        "intensity": "per_image",
    }
    row = evaluate(config, fit, (images, labels, masks, kinds))
    row["flat_field_sigma_fraction"] = sigma_fraction
    print({k: v for k, v in row.items() if k != "image_scores"}, flush=True)
    out.write_text(json.dumps({"labels": labels.tolist(), "rows": [row]}, indent=2))


if __name__ == "__main__":
    main()
