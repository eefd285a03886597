"""The paired bootstrap behind the image AUROC gains in benchmarks/README.md ("intensity:
per_image"): two `image_validation.py` (or `flat_field_scan.py`) JSON files scored on the same
validation images, the first config of each (or the config at index K with `FILE.json#K`),
2000 resamples of the images (seed 0).

    PYTHONPATH=src python benchmarks/results/paired_image_auroc.py A.json B.json[#K]
"""

from __future__ import annotations

import json
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from normalcy.evaluation.bootstrap import paired_bootstrap_deltas, percentile_interval


def image_scores(argument: str) -> tuple[list[int], np.ndarray]:
    """(labels, image scores) of `FILE.json` (its first config) or `FILE.json#K`."""
    path, _, row = argument.partition("#")
    result = json.load(open(path))
    return result["labels"], np.array(result["rows"][int(row or 0)]["image_scores"])


def main() -> None:
    (labels_a, scores_a), (labels_b, scores_b) = (image_scores(arg) for arg in sys.argv[1:3])
    if labels_a != labels_b:
        raise SystemExit("the two files were not scored on the same validation images")
    labels = np.array(labels_a)
    deltas = paired_bootstrap_deltas(roc_auc_score, labels, scores_a, scores_b, 2000, 0)
    low90, high90 = percentile_interval(deltas, 0.9)
    low95, high95 = percentile_interval(deltas, 0.95)
    auroc_a, auroc_b = roc_auc_score(labels, scores_a), roc_auc_score(labels, scores_b)
    print(
        f"image AUROC A {auroc_a:.4f}, B {auroc_b:.4f}; "
        f"A - B mean {deltas.mean():+.4f}, 90% [{low90:+.4f}, {high90:+.4f}], "
        f"95% [{low95:+.4f}, {high95:+.4f}], share <= 0: {np.mean(deltas <= 0):.4f}"
    )


if __name__ == "__main__":
    main()
