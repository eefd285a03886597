"""One-off (issue 9): which quantile of its own map should each anomaly map be centred on?
Validation only.

The median (`map_centering: median`) is the offset of a good tile's surface as long as the
defect covers less than half the image; a large defect (a broken-off corner) lifts it and sinks
its own pixels. Lower quantiles trade that risk against a noisier offset. The maps are those
`image_validation.py --maps-dir DIR` saved for an uncentred config (`DIR/<index>.npy`), its
`--out` JSON giving each image's defect kind. Printed per quantile: pixel AUROC and AUPRO@0.3 of
all images and of the good ones with each kind's, and the image AUROC of the centred map's peak.
With `--save Q,...` the maps centred on those quantiles are written beside the input
(`DIR/q<Q>.npy`) for `paired_pixel_metrics.py`.

    PYTHONPATH=src:benchmarks python benchmarks/results/centring_quantile_scan.py \
        DIR/0.npy VALIDATION.json [--quantiles 0.05,0.1,0.25,0.5] [--save 0.25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from normalcy.detectors.image_features import own_quantile
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.evaluation.pixel_metrics import pixel_metrics


def own_offsets(maps: np.ndarray, quantile: float) -> np.ndarray:
    """Each map's own `quantile` `[N, 1, 1]`, by the graph's `own_quantile`."""
    return own_quantile(torch.as_tensor(maps), quantile).numpy()[:, None, None]


def centred(maps: np.ndarray, quantile: float | None) -> np.ndarray:
    """Each map less its own `quantile` (as the graph centres it), or as is."""
    return maps if quantile is None else maps - own_offsets(maps, quantile)


def report(maps: np.ndarray, masks: np.ndarray, kinds: np.ndarray) -> str:
    labels = (kinds != "good").astype(int)
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    parts = [f"image AUROC of the peak {ranking_metrics(labels, peaks)['auroc']:.4f}"]
    for kind in ["all", *sorted(set(kinds) - {"good"})]:
        rows = np.ones(len(kinds), bool) if kind == "all" else np.isin(kinds, ["good", kind])
        figures = pixel_metrics(maps[rows], masks[rows])
        parts.append(f"{kind} {figures['pixel_auroc']:.4f} / {figures['aupro']:.4f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("maps", type=Path)
    parser.add_argument("validation", type=Path)
    parser.add_argument("--quantiles", default="0.05,0.1,0.25,0.5")
    parser.add_argument("--save", default="")
    args = parser.parse_args()
    maps = np.load(args.maps).astype(np.float64)
    masks = np.load(args.maps.parent / "masks.npy")
    kinds = np.array(json.loads(args.validation.read_text())["kinds"])
    print("quantile: image AUROC of the map's peak; pixel AUROC / AUPRO of all images and per kind")
    print(f"none: {report(maps, masks, kinds)}", flush=True)
    for quantile in (float(q) for q in args.quantiles.split(",")):
        print(f"{quantile}: {report(centred(maps, quantile), masks, kinds)}", flush=True)
    for quantile in (float(q) for q in args.save.split(",") if q):
        path = args.maps.parent / f"q{quantile}.npy"
        np.save(path, centred(maps, quantile).astype(np.float32))
        print(f"saved {path}")


if __name__ == "__main__":
    main()
