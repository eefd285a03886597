"""The training flow: version, validate, clean, train candidates, calibrate, export, register."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from onnxruntime import InferenceSession
from prefect import flow, task

from normalcy import registry, stages
from normalcy.config import Params, load_params
from normalcy.data.splits import Split, Splits
from normalcy.data.versioning import DataVersion, snapshot_data
from normalcy.detectors import Detector
from normalcy.evaluation.selection import validation_metric
from normalcy.export import ParityReport, require_parity
from normalcy.jsonio import write_json
from normalcy.model_card import model_card
from normalcy.scoring import load_session, read_metadata, score_onnx

log = logging.getLogger("normalcy.train")
SUMMARY = stages.ARTIFACTS / "summary.json"
DRIFT_REFERENCE = stages.ARTIFACTS / "drift_reference.npz"


@task
def prepare_data(params: Params) -> Splits:
    """Load the source and write deterministic, leakage-checked splits."""
    return stages.prepare(params.data, params.prepare)


@task
def version_data(params: Params) -> DataVersion | None:
    """Snapshot the prepared data with DVC (cache + local remote)."""
    if not params.versioning.enabled:
        return None
    return snapshot_data(params.prepare.output_dir, params.versioning)


@task
def validate_data(splits: Splits, params: Params) -> dict:
    """Great Expectations suite from the training split; every split must pass it."""
    try:
        spec, _ = stages.validate(splits, params.validate_)
    finally:
        if Path(params.validate_.report_path).exists():
            mlflow.log_artifact(params.validate_.report_path, "validation")
    return spec


@task
def clean_data(splits: Splits, params: Params) -> Split:
    """Remove the contaminated tail of the training split, iteratively."""
    cleaned, result = stages.clean(splits.train, params.clean)
    mlflow.log_artifact(params.clean.log_path, "cleaning")
    if result is not None:
        for it in result.iterations:  # one step per cleaning iteration
            quality = {}
            if it.precision is not None:
                quality = {"clean_precision": it.precision, "clean_recall": it.recall}
            mlflow.log_metrics({"clean_removed": it.n_removed, **quality}, step=it.iteration)
    return cleaned


@task
def train_and_select(train: Split, splits: Splits, params: Params) -> tuple[Detector, dict]:
    """Fit every candidate and pick the winner on validation data."""
    detectors, results, winner = stages.train_candidates(train, splits.val, params.train)
    for result in results:
        mlflow.log_metric(f"{result.name}.{result.metric_name}", result.metric)
        mlflow.log_metric(f"{result.name}.fit_seconds", result.fit_seconds)
    mlflow.log_artifact(str(stages.CANDIDATES), "candidates")
    mlflow.set_tag("winner", winner.name)
    return detectors[winner.name], {
        "name": winner.name,
        "metric_name": winner.metric_name,
        "metric": winner.metric,
    }


@task
def evaluate_winner(detector: Detector, splits: Splits, params: Params) -> stages.Evaluation:
    """Calibrate the threshold on validation normals; test metrics for the report."""
    evaluation = stages.evaluate(detector, splits, params.evaluate, params.calibration)
    mlflow.log_metric("threshold", evaluation.threshold)
    mlflow.log_metrics({f"test_{k}": v for k, v in evaluation.test.items() if np.isfinite(v)})
    for plot in evaluation.plots:
        mlflow.log_artifact(plot, "plots")
    mlflow.log_artifact(params.evaluate.metrics_path, "evaluation")
    return evaluation


@task
def export_winner(
    detector: Detector, evaluation: stages.Evaluation, splits: Splits, params: Params, extra: dict
) -> tuple[Path, ParityReport]:
    """ONNX graph with the threshold and calibration scores inside, every output checked against
    torch before anything is registered."""
    metadata = stages.model_metadata(
        detector,
        splits.feature_names,
        splits.test.X,
        evaluation.threshold,
        evaluation.target_fpr,
        evaluation.n_calibration,
        params.export.opset,
        extra,
    )
    path, report = stages.export(
        detector,
        evaluation.threshold,
        splits.test.X,
        params.export,
        metadata,
        evaluation.calibration_scores,
    )
    mlflow.log_dict(report.to_dict(), "parity/parity.json")
    mlflow.log_metrics(
        {
            "parity_max_abs_diff": report.max_abs_diff,
            "parity_spearman": report.spearman,
            "parity_p_value_mismatches": report.n_p_value_mismatches,
        }
    )
    require_parity(report)
    return path, report


@task
def quantize_winner(
    detector: Detector,
    evaluation: stages.Evaluation,
    splits: Splits,
    params: Params,
    onnx_path: Path,
) -> tuple[Path | None, ParityReport | None]:
    """INT8 twin of the graph under its own tolerances; its failure never blocks the float model."""
    try:
        path, report = stages.quantize(
            detector,
            evaluation.threshold,
            splits.test.X,
            params.export,
            evaluation.calibration_scores,
            onnx_path,
        )
    except Exception as exc:  # e.g. an operator the quantizer cannot handle: float model only
        log.warning("INT8 quantization failed, the float model stands alone: %s", exc)
        mlflow.set_tag("int8", f"failed: {exc}"[:500])
        return None, None
    mlflow.log_dict(report.to_dict(), "parity/parity_int8.json")
    mlflow.log_metrics(
        {
            "int8_spearman": report.spearman,
            "int8_is_anomaly_agreement": report.is_anomaly_agreement,
            "int8_max_rel_diff": report.max_rel_diff,
        }
    )
    mlflow.set_tag("int8", "passed" if report.passed else "rejected")
    if not report.passed:
        log.warning("%s; only the float model is registered", report.message())
        return None, report
    return path, report


def save_drift_reference(
    train: Split, evaluation: stages.Evaluation, feature_names: list[str], size: int, seed: int
) -> Path:
    """A sample of the cleaned training data and the calibration scores, for monitor."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(train.X), min(size, len(train.X)), replace=False)
    DRIFT_REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        DRIFT_REFERENCE,
        X=train.X[np.sort(rows)],
        scores=evaluation.calibration_scores,
        feature_names=np.array(feature_names),
        threshold=evaluation.threshold,
    )
    return DRIFT_REFERENCE


def promotion_metric(session: InferenceSession, test: Split, seed: int) -> tuple[str, float]:
    """The promotion metric of a graph on the test split, from onnxruntime alone, so the
    challenger and the champion are measured by exactly the same code."""
    name, value = validation_metric(lambda X: score_onnx(session, X)[0], test.X, test.y, seed)
    return name.replace("val_", "test_"), value


@task
def register_and_promote(
    onnx_path: Path, splits: Splits, params: Params, tags: dict
) -> tuple[registry.Registered, dict]:
    """Register the winner as challenger; make it champion only if it beats the champion."""
    name = params.mlflow.model_name
    with tempfile.TemporaryDirectory() as tmp:
        champion = registry.load_champion(name, tmp)
        champion_metric = None
        challenger = load_session(onnx_path)
        metric_name, challenger_metric = promotion_metric(
            challenger, splits.test, params.prepare.seed
        )
        if champion is not None:
            incumbent = load_session(champion.onnx_path)
            # same input name, dtype, shape and feature names: the same test data fits both
            if read_metadata(challenger).get("input") == read_metadata(incumbent).get("input"):
                _, champion_metric = promotion_metric(incumbent, splits.test, params.prepare.seed)
            else:  # another schema: no fair comparison, so the champion stays
                log.warning(
                    "champion v%s expects another input; it is kept (use another "
                    "mlflow.model_name for a new data schema)",
                    champion.version,
                )
                champion_metric = float("inf")
    registered = registry.register_challenger(onnx_path, name, tags)
    decision = registry.promote_if_better(
        name, registered.version, metric_name, challenger_metric, champion_metric
    )
    mlflow.log_metric(f"promotion_{metric_name}", challenger_metric)
    log.info("registered %s v%s: %s", name, registered.version, decision.reason)
    return registered, {
        "model_version": registered.version,
        "promoted": decision.promoted,
        "promotion_reason": decision.reason,
    }


def describe_data(splits: Splits, cleaned: Split, params: Params) -> dict:
    """What the model card says about the training data."""
    rows = {"train": len(cleaned), "val": len(splits.val), "test": len(splits.test)}
    labelled = {"train": cleaned.y, "val": splits.val.y, "test": splits.test.y}
    return {
        "source": params.data.source,
        "path": params.data.path,
        "rows": rows,
        "anomaly_share": {k: float(np.mean(y)) for k, y in labelled.items() if y is not None},
        "removed_by_cleaning": len(splits.train) - len(cleaned),
    }


@task
def publish_model_card(
    registered: registry.Registered,
    metrics: dict,
    data: dict,
    int8_path: Path | None,
) -> str:
    """Log the registered file's metadata JSON next to its markdown model card (and the INT8
    twin, when it passed its gate); the card is also the version's description."""
    mlflow.log_dict(registered.metadata, "model_card/metadata.json")
    if int8_path is not None:
        uri = registry.log_int8_twin(int8_path, registered)
        log.info("INT8 twin of v%s logged at %s", registered.version, uri)
    card = model_card(registered.metadata, metrics, data)
    mlflow.log_text(card, "model_card/model_card.md")
    registry.describe_version(registered.name, registered.version, card)
    return card


@flow(name="normalcy-train", log_prints=True)
def train_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """prepare, DVC snapshot, validate, clean, candidates, calibrate, export, register."""
    params = load_params(params_path, overrides)
    registry.setup_tracking(params.mlflow)
    with mlflow.start_run() as run:
        registry.log_params_flat(params.flat())
        splits = prepare_data(params)
        data_version = version_data(params)
        md5 = data_version.md5 if data_version else "unversioned"
        mlflow.set_tag("data_version", md5)
        validate_data(splits, params)
        cleaned = clean_data(splits, params)
        detector, winner = train_and_select(cleaned, splits, params)
        evaluation = evaluate_winner(detector, splits, params)
        extra = {
            "data_version": md5,
            "mlflow_run_id": run.info.run_id,
            "model_name": params.mlflow.model_name,
        }
        onnx_path, parity = export_winner(detector, evaluation, splits, params, extra)
        int8_path, int8_report = None, None
        if params.export.quantize:
            int8_path, int8_report = quantize_winner(
                detector, evaluation, splits, params, onnx_path
            )
        mlflow.log_artifact(str(stages.VALIDATION_SPEC), "reference")
        reference = save_drift_reference(
            cleaned,
            evaluation,
            splits.feature_names,
            params.monitor.reference_size,
            params.prepare.seed,
        )
        mlflow.log_artifact(str(reference), "reference")
        tags = {
            "data_version": md5,
            "detector": winner["name"],
            "threshold": f"{evaluation.threshold:.6g}",
        }
        registered, registration = register_and_promote(onnx_path, splits, params, tags)
        metrics = {
            "selection_metric": winner["metric_name"],
            "selection_value": winner["metric"],
            **{f"test_{key}": value for key, value in evaluation.test.items()},
            "parity_max_abs_diff": parity.max_abs_diff,
            "parity_spearman": parity.spearman,
        }
        if int8_report is not None:
            metrics["int8_spearman"] = int8_report.spearman
            metrics["int8_is_anomaly_agreement"] = int8_report.is_anomaly_agreement
        publish_model_card(registered, metrics, describe_data(splits, cleaned, params), int8_path)
        summary = {
            "winner": winner["name"],
            "selection_metric": winner["metric_name"],
            "selection_value": winner["metric"],
            "test_auroc": evaluation.test.get("auroc"),
            "test_auprc": evaluation.test.get("auprc"),
            "test_fpr_at_threshold": evaluation.test.get("fpr"),
            "test_recall_at_threshold": evaluation.test.get("recall"),
            "threshold": evaluation.threshold,
            "target_fpr": evaluation.target_fpr,
            "data_version": md5,
            "mlflow_run_id": run.info.run_id,
            "model_name": params.mlflow.model_name,
            **registration,
            "onnx_path": str(onnx_path),
            "int8_onnx_path": None if int8_path is None else str(int8_path),
            "int8_passed": None if int8_report is None else int8_report.passed,
        }
        write_json(summary, SUMMARY)
        mlflow.log_artifact(str(SUMMARY))
    return summary
