"""The pipeline's stages. `normalcy stage NAME` (dvc repro) and the Prefect flow call the same
functions, so both produce the same artifacts. Each stage reads only its own params section."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import normalcy
from normalcy.artifact.calibration_head import subsample_calibration
from normalcy.calibration import threshold_at_fpr
from normalcy.config import (
    CalibrationParams,
    CleanParams,
    DataParams,
    EvaluateParams,
    ExportParams,
    PrepareParams,
    TrainParams,
    ValidateParams,
)
from normalcy.data.sources import DataError, load_dataset
from normalcy.data.splits import Split, Splits, save_splits, split_dataset
from normalcy.detectors import Detector, accepted_params
from normalcy.detectors.ensemble import ENSEMBLE, Ensemble
from normalcy.detectors.persistence import load_detector, save_detector
from normalcy.detectors.registry import create_with_settings
from normalcy.evaluation.metrics import ranking_metrics, threshold_metrics
from normalcy.evaluation.plots import plot_roc_pr, plot_score_histogram
from normalcy.evaluation.selection import CandidateResult, select_winner, validation_metric
from normalcy.export import (
    ParityReport,
    export_onnx,
    parity_check,
    quantize_int8,
    quantized_parity_check,
)
from normalcy.jsonio import write_json
from normalcy.validation.cleaning import CleaningResult, clean_training_split
from normalcy.validation.suite import (
    ValidationReport,
    build_suite_spec,
    save_report,
    validate_batch,
)

log = logging.getLogger(__name__)

ARTIFACTS = Path("artifacts")
VALIDATION_SPEC = ARTIFACTS / "validation_spec.json"
CLEANED_TRAIN = ARTIFACTS / "cleaned_train.npz"
CANDIDATES = ARTIFACTS / "candidates.json"
WINNER = ARTIFACTS / "winner.pt"
PARITY = ARTIFACTS / "parity.json"
PARITY_INT8 = ARTIFACTS / "parity_int8.json"


# -- prepare -------------------------------------------------------------------------------


def prepare(data: DataParams, prepare_params: PrepareParams) -> Splits:
    """Load the source, split it (stratified, seeded, leakage-checked) and write the splits."""
    splits = split_dataset(load_dataset(data), prepare_params)
    save_splits(splits, prepare_params.output_dir, {"source": data.source, "path": data.path})
    return splits


# -- validate ------------------------------------------------------------------------------


class DataValidationFailed(DataError):
    """A split failed its Great Expectations suite; the report names each failed expectation."""

    def __init__(self, reports: list[ValidationReport], report_path: Path) -> None:
        failed = [r for r in reports if not r.success]
        body = "\n".join(r.summary() for r in failed)
        super().__init__(f"data validation failed (report: {report_path}):\n{body}")
        self.reports = reports
        self.report_path = report_path


def validate(splits: Splits, params: ValidateParams) -> tuple[dict, list[ValidationReport]]:
    """Build the suite from the training split and check every split against it.

    The report is written whether or not it passes; a failure raises before any training."""
    spec = build_suite_spec(splits.train.X, splits.feature_names, params)
    write_json(spec, VALIDATION_SPEC)
    reports = [validate_batch(split.X, spec, name) for name, split in splits.items()]
    report_path = save_report(reports, params.report_path)
    if not all(r.success for r in reports):
        raise DataValidationFailed(reports, Path(report_path))
    return spec, reports


# -- clean ---------------------------------------------------------------------------------


def cleaning_detector(params: CleanParams) -> Callable[[], Detector]:
    """A factory of fresh cleaning detectors, one per cleaning iteration."""

    def make() -> Detector:
        settings = {"epochs": params.epochs, "seed": params.seed}
        return create_with_settings(params.detector, params.detector_params, settings)

    return make


def clean(train: Split, params: CleanParams) -> tuple[Split, CleaningResult | None]:
    """Iteratively drop the contaminated tail of the training split; write the audit log."""
    if not params.enabled:
        cleaned, result = train, None
    else:
        cleaned, result = clean_training_split(train, cleaning_detector(params), params)
    write_json(result.to_dict() if result else {"enabled": False}, params.log_path)
    arrays = {"X": cleaned.X, "ids": cleaned.ids}
    if cleaned.y is not None:
        arrays["y"] = cleaned.y
    CLEANED_TRAIN.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CLEANED_TRAIN, **arrays)
    return cleaned, result


# -- train ---------------------------------------------------------------------------------


TRAINING_SETTINGS = {"epochs", "batch_size", "learning_rate", "weight_decay", "patience", "seed"}


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


def train_candidates(
    train: Split, val: Split, params: TrainParams
) -> tuple[dict[str, Detector], list[CandidateResult], CandidateResult]:
    """`fit_candidates`, then write the candidates' table and the winner for the next stage."""
    detectors, results, winner = fit_candidates(train, val, params)
    write_json({"winner": winner.name, "candidates": [asdict(r) for r in results]}, CANDIDATES)
    save_detector(detectors[winner.name], WINNER)
    return detectors, results, winner


def fit_candidates(
    train: Split, val: Split, params: TrainParams
) -> tuple[dict[str, Detector], list[CandidateResult], CandidateResult]:
    """Fit every candidate, score validation, and pick the winner on validation data only.

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


def load_winner(path: str | Path = WINNER) -> Detector:
    """The winner written by the train stage (a pickled detector: trusted, local file)."""
    return load_detector(path)


# -- evaluate ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    threshold: float
    target_fpr: float
    n_calibration: int
    calibration_scores: np.ndarray
    val_scores: np.ndarray
    test_scores: np.ndarray
    test: dict[str, float]
    plots: list[str]

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("calibration_scores", "val_scores", "test_scores"):
            out.pop(key)
        return out


def calibration_scores_path(params: EvaluateParams) -> Path:
    """Where the evaluate stage keeps the scores the threshold came from (beside metrics)."""
    return Path(params.metrics_path).with_name("calibration_scores.npy")


def evaluate(
    detector: Detector,
    splits: Splits,
    params: EvaluateParams,
    calibration: CalibrationParams,
) -> Evaluation:
    """Threshold from held-out normal validation scores at the target FPR; test metrics once,
    for reporting only (nothing is chosen on them)."""
    val_scores = detector.score(splits.val.X)
    calibration_scores = val_scores if splits.val.y is None else val_scores[splits.val.y == 0]
    threshold = threshold_at_fpr(calibration_scores, calibration.target_fpr)
    test_scores = detector.score(splits.test.X)
    test: dict[str, float] = {}
    plots: list[str] = []
    plots_dir = Path(params.plots_dir)
    if splits.test.y is not None:
        test = {
            **ranking_metrics(splits.test.y, test_scores),
            **threshold_metrics(splits.test.y, test_scores, threshold),
        }
        if splits.test.has_both_classes:
            plots.append(
                str(plot_roc_pr(splits.test.y, test_scores, "test", plots_dir / "roc_pr_test.png"))
            )
    plots.append(
        str(
            plot_score_histogram(
                test_scores, splits.test.y, threshold, "test scores", plots_dir / "scores_test.png"
            )
        )
    )
    plots.append(
        str(
            plot_score_histogram(
                val_scores,
                splits.val.y,
                threshold,
                "validation scores",
                plots_dir / "scores_val.png",
            )
        )
    )
    evaluation = Evaluation(
        threshold,
        calibration.target_fpr,
        len(calibration_scores),
        calibration_scores,
        val_scores,
        test_scores,
        test,
        plots,
    )
    write_json(evaluation.to_dict(), params.metrics_path)
    np.save(calibration_scores_path(params), calibration_scores)
    log.info("threshold %.5g at target FPR %.3f; test %s", threshold, calibration.target_fpr, test)
    return evaluation


def load_evaluation(params: EvaluateParams) -> tuple[float, np.ndarray]:
    """(threshold, calibration scores) written by the evaluate stage."""
    metrics = json.loads(Path(params.metrics_path).read_text())
    scores = np.load(calibration_scores_path(params))
    return float(metrics["threshold"]), scores


# -- export --------------------------------------------------------------------------------


def detector_params(detector: Detector) -> dict:
    """The detector's constructor arguments as set, for the metadata and the model card."""
    return {
        name: getattr(detector, name)
        for name in accepted_params(detector.name)
        if hasattr(detector, name)
    }


def model_metadata(
    detector: Detector,
    feature_names: list[str],
    example: np.ndarray,
    threshold: float,
    target_fpr: float,
    n_calibration: int,
    opset: int,
    extra: dict | None = None,
) -> dict:
    """What an ops team needs to know about the graph, stored inside it.

    `export_onnx` adds `outputs` (name, dtype, shape of each, read from the graph) and
    `n_p_value_scores`; the registry writes `model_version` in at registration, so a file that
    was never registered says `null` there. The flow passes model_name, data_version and
    mlflow_run_id in `extra`."""
    return {
        "model_name": None,
        "model_version": None,
        "detector": detector.name,
        "detector_params": detector_params(detector),
        "input": {
            "name": "input",
            "dtype": "float32",
            "shape": ["N", *example.shape[1:]],
            "feature_names": feature_names if example.ndim == 2 else [],
        },
        "decision_rule": "is_anomaly = score > threshold",
        "p_value_rule": "p_value = (1 + #{calibration scores >= score}) / (n_p_value_scores + 1)",
        "threshold": threshold,
        "target_fpr": target_fpr,
        "n_calibration_scores": n_calibration,
        "data_version": None,
        "mlflow_run_id": None,
        "normalcy_version": normalcy.__version__,
        "opset": opset,
        **(extra or {}),
    }


def int8_path(params: ExportParams) -> Path:
    """Where the INT8 twin of `params.path` goes: model.onnx -> model.int8.onnx."""
    path = Path(params.path)
    return path.with_name(path.stem + ".int8.onnx")


def _rejected(path: Path) -> Path:
    """Keep a rejected graph for inspection, but never where a scorer would pick it up."""
    return path.replace(path.with_name(path.stem + ".rejected.onnx"))


def export(
    detector: Detector,
    threshold: float,
    test_X: np.ndarray,
    params: ExportParams,
    metadata: dict,
    calibration_scores: np.ndarray,
) -> tuple[Path, ParityReport]:
    """Write the ONNX graph (threshold and calibration scores inside) and compare every output
    with torch on the test split.

    At most `params.max_calibration_scores` calibration scores go into the graph (a seeded
    subsample). An INT8 file from an earlier export is removed: it is no twin of this graph.
    The caller refuses to register when `report.passed` is false (`require_parity`)."""
    if not detector.exportable:
        raise ValueError(f"detector {detector.name!r} is not exportable; it cannot be the winner")
    module = detector.scoring_module()
    stored = subsample_calibration(calibration_scores, params.max_calibration_scores)
    path = export_onnx(
        module,
        threshold,
        test_X[:2],
        params.path,
        params.opset,
        metadata,
        calibration_scores=stored,
    )
    int8_path(params).unlink(missing_ok=True)
    report = parity_check(
        module,
        threshold,
        path,
        test_X,
        params.parity_max_abs,
        params.parity_max_rel,
        params.parity_min_agreement,
        calibration_scores=stored,
    )
    write_json(report.to_dict(), PARITY)
    log.info("parity: %s", report.message())
    if not report.passed:
        path = _rejected(path)
    return path, report


def quantize(
    detector: Detector,
    threshold: float,
    test_X: np.ndarray,
    params: ExportParams,
    calibration_scores: np.ndarray,
    onnx_path: Path,
) -> tuple[Path, ParityReport]:
    """INT8 twin of the exported graph, compared with torch under the `quantized_*` tolerances.

    Never raises on a failed gate: a rejected INT8 file is renamed `.rejected.onnx` and the
    float model stands alone. Returns the path (accepted or rejected) and the report."""
    module = detector.scoring_module()
    stored = subsample_calibration(calibration_scores, params.max_calibration_scores)
    path = quantize_int8(onnx_path, int8_path(params))
    report = quantized_parity_check(
        module,
        threshold,
        path,
        test_X,
        params.quantized_max_rel,
        params.quantized_min_spearman,
        params.quantized_min_agreement,
        calibration_scores=stored,
    )
    write_json(report.to_dict(), PARITY_INT8)
    log.info("INT8 parity: %s", report.message())
    if not report.passed:
        path = _rejected(path)
    return path, report
