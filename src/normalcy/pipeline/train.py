"""Step 4, train: fit every candidate and pick the winner on validation data only."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from normalcy.config import TrainParams, preprocessing_variants
from normalcy.data.splits import Split
from normalcy.detectors import Detector
from normalcy.detectors.ensemble import ENSEMBLE, Ensemble
from normalcy.detectors.persistence import load_detector, save_detector
from normalcy.detectors.registry import create_with_settings
from normalcy.evaluation.selection import (
    CONSENSUS,
    LABEL_FREE_METRIC,
    CandidateResult,
    choose_label_free,
    select_winner,
    synthetic_evidence,
    validation_metric,
)
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts

log = logging.getLogger(__name__)

PREPROCESSING = "preprocessing"
TRAINING_SETTINGS = {
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "patience",
    "seed",
    "threads",
}


def build_candidate(
    name: str, params: TrainParams, detector_params: dict[str, Any] | None = None
) -> Detector:
    """A candidate with `detector_params` (default: its train.detectors entry) plus the shared
    training settings."""
    settings = params.model_dump(include=TRAINING_SETTINGS)
    given = params.detectors.get(name, {}) if detector_params is None else detector_params
    return create_with_settings(name, given, settings)


def fit_best_variant(
    name: str, train: Split, val: Split, params: TrainParams
) -> tuple[Detector, CandidateResult]:
    """Fit every variant of a candidate (one per `preprocessing` choice: see
    `config.preprocessing_variants`) and keep the one with the best validation metric (the first
    listed on a tie); the result records every variant's metric."""
    best: tuple[Detector, CandidateResult] | None = None
    trials: dict[str, float] = {}
    started = time.perf_counter()
    variants = preprocessing_variants(params.detectors.get(name, {}))
    for detector_params in variants:
        fit_started = time.perf_counter()
        detector = fit_detector(build_candidate(name, params, detector_params), train, val)
        choice = describe(detector_params.get(PREPROCESSING, "default"))
        variant = f"preprocessing {choice}" if len(variants) > 1 else ""
        result = _candidate_result(
            detector, val, params, time.perf_counter() - fit_started, variant
        )
        trials[choice] = result.metric
        if best is None or _comparable(result.metric) > _comparable(best[1].metric):
            best = (detector, result)
    detector, result = best
    if len(trials) > 1:
        chosen = describe(detector.constructor_params()[PREPROCESSING])
        result.fit_seconds = time.perf_counter() - started  # every variant's fit counts
        result.extra.update(preprocessing=chosen, preprocessing_trials=trials)
        log.info("candidate %s: preprocessing %s chosen on validation (%s)", name, chosen, trials)
    return detector, result


def describe(preprocessing: str | dict[str, Any]) -> str:
    """A preprocessing choice as one short string: its name, or its mapping as JSON."""
    return preprocessing if isinstance(preprocessing, str) else json.dumps(preprocessing)


def fit_detector(detector: Detector, train: Split, val: Split) -> Detector:
    """Fit on the training features only; labels reach only a detector that declares
    `uses_labels` (outlier exposure's supervised regime), so they cannot leak into training."""
    if not detector.uses_labels:
        return detector.fit(train.X, val.X)
    return detector.fit(train.X, val.X, val_labels=val.y, train_labels=train.y)


class CandidateError(RuntimeError):
    """Fitting or validating one candidate failed; the message names the candidate and the
    cause (also chained where it ran in this process)."""


def fit_candidate(
    name: str, train: Split, val: Split, params: TrainParams
) -> tuple[Detector, CandidateResult]:
    """`fit_best_variant`, with any failure raised as a `CandidateError` naming the candidate,
    the same whether it ran here or in a Dask worker."""
    try:
        return fit_best_variant(name, train, val, params)
    except Exception as failure:
        raise CandidateError(
            f"candidate {name!r} failed: {type(failure).__name__}: {failure}"
        ) from failure


def fit_each(
    names: list[str], train: Split, val: Split, params: TrainParams
) -> dict[str, tuple[Detector, CandidateResult]]:
    """Every named candidate fitted, in the order given: one after another, or as Prefect tasks
    on a Dask cluster (`train.parallel`, see normalcy.pipeline.parallel)."""
    if params.parallel.backend == "dask":
        from normalcy.pipeline.parallel import fit_in_parallel

        return fit_in_parallel(names, train, val, params)
    fitted = {}
    for position, name in enumerate(names, start=1):
        log.info("candidate %d/%d: %s", position, len(names), name)
        fitted[name] = fit_candidate(name, train, val, params)
    return fitted


def fit_candidates(
    train: Split, val: Split, params: TrainParams
) -> tuple[dict[str, Detector], list[CandidateResult], CandidateResult]:
    """(fitted detectors by name, validation result of each, the winner's result).

    The `ensemble` candidate is not trained again: it combines the `ensemble_top_k` best
    exportable candidates (by the same validation metric) after score normalization."""
    started = time.perf_counter()
    trained = [name for name in params.candidates if name != ENSEMBLE]
    fitted = fit_each(trained, train, val, params)
    log.info("%d candidates fitted in %.2f s", len(fitted), time.perf_counter() - started)
    detectors = {name: detector for name, (detector, _) in fitted.items()}
    results = [result for _, result in fitted.values()]
    if ENSEMBLE in params.candidates:
        started = time.perf_counter()
        detector = ensemble_of_best(detectors, results, val, params.ensemble_top_k)
        results.append(_candidate_result(detector, val, params, time.perf_counter() - started))
        detectors[ENSEMBLE] = detector
    label_free = results[0].metric_name == LABEL_FREE_METRIC
    members_fitted = all(name in detectors for name in params.consensus_members)
    if label_free and params.selection == CONSENSUS and members_fitted:
        return detectors, results, consensus_choice(detectors, results, val, params)
    winner = select_winner(results)
    winner.extra["selection"] = f"best {winner.metric_name} on the validation split" + (
        f" (the consensus needs the candidates {params.consensus_members})"
        if label_free and params.selection == CONSENSUS and len(results) > 1
        else ""
    )
    log.info("selection: %s", winner.extra["selection"])
    return detectors, results, winner


def consensus_choice(
    detectors: dict[str, Detector], results: list[CandidateResult], val: Split, params: TrainParams
) -> CandidateResult:
    """Add the `consensus` candidate (the `train.consensus_combine` of the robustly
    standardized scores of the fitted `train.consensus_members`) and choose by
    `choose_label_free`: the consensus unless the synthetic criterion is unanimous and beyond
    noise. Every candidate's per-type evidence is recorded in its result."""
    started = time.perf_counter()
    members = [detectors[name] for name in params.consensus_members]
    consensus = Ensemble.from_fitted(members, val.X, params.consensus_combine)
    result = _candidate_result(consensus, val, params, time.perf_counter() - started)
    result.name = CONSENSUS
    result.extra["members"] = list(params.consensus_members)
    result.extra["combine"] = params.consensus_combine
    results.append(result)
    detectors[CONSENSUS] = consensus
    evidence = {
        r.name: synthetic_evidence(detectors[r.name].score, val.X, params.seed)
        for r in results
        if r.exportable and np.isfinite(r.metric)
    }
    for r in results:
        if r.name in evidence:
            by_type = {kind: float(values.mean()) for kind, values in evidence[r.name].items()}
            r.extra["synthetic_auroc_by_type"] = by_type
    if CONSENSUS in evidence:
        winner, reason = choose_label_free(results, evidence, params.selection_margin)
    else:
        winner = select_winner(results)
        reason = f"best {winner.metric_name}: the consensus' validation scores are not all finite"
    winner.extra["selection"] = reason
    log.info("selection: %s", reason)
    return winner


def _comparable(metric: float) -> float:
    """A metric for ranking: NaN (not measurable) ranks below every number."""
    return metric if np.isfinite(metric) else -np.inf


def _candidate_result(
    detector: Detector, val: Split, params: TrainParams, fit_seconds: float, variant: str = ""
) -> CandidateResult:
    label = f"{detector.name} ({variant})" if variant else detector.name
    metric_name, metric = validation_metric(
        detector.score, val.X, val.y, params.seed, detector.trains_on_synthetic_anomalies, label
    )
    log.info("candidate %s: %s = %.4f (%.1f s)", label, metric_name, metric, fit_seconds)
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
    why = winner.extra.get("selection", "")
    table = {"winner": winner.name, "why": why, "candidates": [asdict(r) for r in results]}
    write_json(table, artifacts.CANDIDATES)
    save_detector(detectors[winner.name], artifacts.WINNER)
    return detectors, results, winner


def load_winner(path: str | Path = artifacts.WINNER) -> Detector:
    """The winner written by `train_candidates`."""
    return load_detector(path)
