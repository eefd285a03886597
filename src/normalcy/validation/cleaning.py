"""Iterative contamination cleaning: fit, score the training split, drop the tail, refit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from normalcy.calibration import robust_cutoff
from normalcy.config import CleanParams
from normalcy.data.splits import Split
from normalcy.detectors import Detector

log = logging.getLogger(__name__)


def contamination_cutoff(scores: np.ndarray, params: CleanParams) -> float:
    """Scores above this are treated as contamination: the top `top_fraction` when configured,
    otherwise a robust cutoff (median + k * scaled MAD) that needs no guess of the rate."""
    if params.top_fraction is not None:
        return float(np.quantile(scores, 1 - params.top_fraction))
    return robust_cutoff(scores, params.mad_threshold)


@dataclass
class CleaningIteration:
    iteration: int
    cutoff: float
    n_removed: int
    removed_ids: list
    changed: bool
    precision: float | None = None
    recall: float | None = None


@dataclass
class CleaningResult:
    """What was removed and why; precision/recall only where labels exist (benchmarks, tests)."""

    kept: np.ndarray
    iterations: list[CleaningIteration] = field(default_factory=list)
    converged: bool = False

    @property
    def n_removed(self) -> int:
        return int((~self.kept).sum())

    def to_dict(self) -> dict:
        return {
            "n_rows": int(len(self.kept)),
            "n_removed": self.n_removed,
            "converged": self.converged,
            "iterations": [asdict(it) for it in self.iterations],
        }


def removal_quality(
    removed: np.ndarray, labels: np.ndarray | None
) -> tuple[float | None, float | None]:
    """(precision, recall) of removing the labelled anomalies; (None, None) without labels."""
    if labels is None:
        return None, None
    anomalies = labels == 1
    hits = int((removed & anomalies).sum())
    precision = hits / int(removed.sum()) if removed.any() else float("nan")
    recall = hits / int(anomalies.sum()) if anomalies.any() else float("nan")
    return precision, recall


def clean_training_split(
    train: Split, make_detector: Callable[[], Detector], params: CleanParams
) -> tuple[Split, CleaningResult]:
    """Repeat: fit on the kept rows, score every training row, remove those above the cutoff;
    stop when the removed set stops changing or after `max_iter` fits. Labels are never used
    to decide, only to report precision and recall."""
    kept = np.ones(len(train), dtype=bool)
    result = CleaningResult(kept)
    for iteration in range(1, params.max_iter + 1):
        scores = make_detector().fit(train.X[kept]).score(train.X)
        # The scale comes from every row: MAD already ignores the tail, while re-estimating it on
        # the kept rows alone would shrink it each round and remove ever more normal rows.
        cutoff = contamination_cutoff(scores, params)
        new_kept = scores <= cutoff
        if not new_kept.any():
            raise ValueError("cleaning would remove every training row; check clean.* params")
        changed = bool((new_kept != kept).any())
        precision, recall = removal_quality(~new_kept, train.y)
        result.iterations.append(
            CleaningIteration(
                iteration,
                float(cutoff),
                int((~new_kept).sum()),
                train.ids[~new_kept].tolist(),
                changed,
                precision,
                recall,
            )
        )
        log.info(
            "cleaning iteration %d/%d: cutoff %.4g, %d of %d rows removed%s",
            iteration,
            params.max_iter,
            cutoff,
            int((~new_kept).sum()),
            len(train),
            "" if precision is None else f" (precision {precision:.2f}, recall {recall:.2f})",
        )
        kept = new_kept
        if not changed and iteration > 1:
            result.converged = True
            break
    result.kept = kept
    cleaned = Split(train.X[kept], None if train.y is None else train.y[kept], train.ids[kept])
    return cleaned, result
