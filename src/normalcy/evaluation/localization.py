"""What the evaluate step adds for image folders: pixel metrics on the test maps, the per-defect
table, and overlays of the highest- and lowest-scoring test images of each defect type.

Reporting only: nothing is chosen on the test split."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normalcy.data.splits import Split
from normalcy.evaluation.pixel_metrics import per_defect_metrics, pixel_metrics
from normalcy.evaluation.plots import plot_overlay

OVERLAYS_PER_END = 2  # images at each end of a defect type's score ranking


@dataclass
class Localization:
    """Pixel metrics (empty without maps), {defect: image metrics}, overlay PNG paths."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_defect: dict[str, dict[str, float]] = field(default_factory=dict)
    overlays: list[str] = field(default_factory=list)


def overlay_picks(
    scores: np.ndarray, defects: np.ndarray, per_end: int = OVERLAYS_PER_END
) -> list[tuple[int, str, str]]:
    """(row, defect, "highest" or "lowest") for the `per_end` highest- and lowest-scoring rows
    of each defect type (good included); a type with few rows is shown once per row."""
    picks = []
    for defect in sorted(set(defects.tolist())):
        rows = np.flatnonzero(defects == defect)
        ranked = rows[np.argsort(-scores[rows], kind="stable")]
        top = ranked[:per_end].tolist()
        bottom = [r for r in ranked[::-1][:per_end].tolist() if r not in top]
        picks += [(r, defect, "highest") for r in top] + [(r, defect, "lowest") for r in bottom]
    return picks


def _file_name(defect: str, end: str, rank: int, image_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(image_id)).stem)
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', defect)}_{end}_{rank}_{stem}.png"


def draw_overlays(test: Split, scores: np.ndarray, maps: np.ndarray, folder: Path) -> list[str]:
    """Overlay PNGs of the picked test images, one shared colour range for all."""
    picks = overlay_picks(scores, test.defects)
    shown = np.array([row for row, _, _ in picks])
    map_range = (float(maps[shown].min()), float(maps[shown].max()))
    paths, ranks = [], {}
    for row, defect, end in picks:
        rank = ranks[(defect, end)] = ranks.get((defect, end), 0) + 1
        title = f"{defect}, {end} score #{rank}: {scores[row]:.4g}\n{test.ids[row]}"
        mask = None if test.masks is None else test.masks[row]
        path = folder / _file_name(defect, end, rank, test.ids[row])
        paths.append(str(plot_overlay(test.X[row], maps[row], mask, map_range, title, path)))
    return paths


def localization(
    test: Split, scores: np.ndarray, maps: np.ndarray | None, folder: Path
) -> Localization:
    """The image-folder report of a test split with defect names (and masks): the per-defect
    table always; pixel AUROC, AUPRO and overlays when the model gives anomaly maps."""
    if test.defects is None:
        return Localization()
    result = Localization(per_defect=per_defect_metrics(scores, test.defects))
    if maps is None:
        return result
    if test.masks is not None:
        result.metrics = pixel_metrics(maps, test.masks)
    result.overlays = draw_overlays(test, scores, maps, folder)
    return result
