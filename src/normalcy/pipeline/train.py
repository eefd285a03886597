"""Step 4, train: fit every candidate and pick the winner on validation data only."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from normalcy.config import TrainParams
from normalcy.data.splits import Split
from normalcy.detectors import Detector
from normalcy.detectors.ensemble import ENSEMBLE, Ensemble
from normalcy.detectors.persistence import load_detector, save_detector
from normalcy.detectors.registry import create_with_settings
from normalcy.evaluation.selection import CandidateResult, select_winner, validation_metric
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts

log = logging.getLogger(__name__)

TRAINING_SETTINGS = {
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "patience",
    "seed",
    "threads",
}


def build_candidate(name: str, params: TrainParams) -> Detector:
    """A candidate with its own params from train.detectors plus the shared training settings."""
    settings = params.model_dump(include=TRAINING_SETTINGS)
    return create_with_settings(name, params.detectors.get(name, {}), settings)


def fit_detector(detector: Detector, train: Split, val: Split) -> Detector:
    """Fit on the training features only; labels reach only a detector that declares
    `uses_labels` (outlier exposure's supervised regime), so they cannot leak into training."""
    if not detector.uses_labels:
        return detector.fit(train.X, val.X)
    return detector.fit(train.X, val.X, val_labels=val.y, train_labels=train.y)


def fit_candidates(
    train: Split, val: Split, params: TrainParams
) -> tuple[dict[str, Detector], list[CandidateResult], CandidateResult]:
    """(fitted detectors by name, validation result of each, the winner's result).

    The `ensemble` candidate is not trained again: it combines the `ensemble_top_k` best
    exportable candidates (by the same validation metric) after score normalization."""
    detectors: dict[str, Detector] = {}
    results: list[CandidateResult] = []
    trained = [name for name in params.candidates if name != ENSEMBLE]
    for position, name in enumerate(trained, start=1):
        log.info("candidate %d/%d: %s", position, len(params.candidates), name)
        started = time.perf_counter()
        detector = fit_detector(build_candidate(name, params), train, val)
        results.append(_candidate_result(detector, val, params, time.perf_counter() - started))
        detectors[name] = detector
    if ENSEMBLE in params.candidates:
        started = time.perf_counter()
        detector = ensemble_of_best(detectors, results, val, params.ensemble_top_k)
        results.append(_candidate_result(detector, val, params, time.perf_counter() - started))
        detectors[ENSEMBLE] = detector
    return detectors, results, select_winner(results)


def _candidate_result(
    detector: Detector, val: Split, params: TrainParams, fit_seconds: float
) -> CandidateResult:
    metric_name, metric = validation_metric(
        detector.score, val.X, val.y, params.seed, detector.trains_on_synthetic_anomalies
    )
    log.info("candidate %s: %s = %.4f (%.1f s)", detector.name, metric_name, metric, fit_seconds)
    return CandidateResult(detector.name, metric_name, metric, detector.exportable, fit_seconds)


def ensemble_of_best(
    detectors: dict[str, Detector], results: list[CandidateResult], val: Split, top_k: int
) -> Ensemble:
    """The `top_k` best exportable fitted candidates by validation metric, normalized on val."""
    ranked = sorted(
        (r for r in results if r.exportable and np.isfinite(r.metric)),
        key=lambda r: r.metric,
        reverse=True,
    )
    chosen = [detectors[r.name] for r in ranked[:top_k]]
    if len(chosen) < 2:
        raise ValueError(
            f"the ensemble candidate needs at least 2 other exportable candidates with a finite "
            f"validation metric; got {[r.name for r in ranked]}"
        )
    log.info("ensemble of %s", [d.name for d in chosen])
    return Ensemble.from_fitted(chosen, val.X)


def train_candidates(
    train: Split, val: Split, params: TrainParams
) -> tuple[dict[str, Detector], list[CandidateResult], CandidateResult]:
    """`fit_candidates`, then write the candidates' table and the winner for the next steps."""
    detectors, results, winner = fit_candidates(train, val, params)
    write_json(
        {"winner": winner.name, "candidates": [asdict(r) for r in results]}, artifacts.CANDIDATES
    )
    save_detector(detectors[winner.name], artifacts.WINNER)
    return detectors, results, winner


def load_winner(path: str | Path = artifacts.WINNER) -> Detector:
    """The winner written by `train_candidates`."""
    return load_detector(path)
