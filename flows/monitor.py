"""The monitor flow: compare a new batch with the champion's reference; recalibrate on drift."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import flow, task

from normalcy import registry
from normalcy.config import Params, load_params
from normalcy.data.sources import load_batch
from normalcy.drift import DriftReport, detect_drift
from normalcy.jsonio import write_json
from normalcy.scoring import read_metadata, score_onnx
from normalcy.stages import ARTIFACTS
from normalcy.validation.suite import ValidationReport, save_report, validate_batch

log = logging.getLogger("normalcy.monitor")
DRIFT_REPORT = ARTIFACTS / "drift_report.json"
BATCH_VALIDATION = ARTIFACTS / "monitor_validation.json"


class NoChampionError(RuntimeError):
    """Monitoring needs a registered champion."""


@dataclass
class ChampionBundle:
    """The champion's graph, its metadata and the reference it was trained with."""

    version: str
    run_id: str
    onnx_path: Path
    metadata: dict
    reference_X: np.ndarray
    reference_scores: np.ndarray
    feature_names: list[str]
    validation_spec: dict


def fetch_champion(params: Params, workdir: str | Path) -> ChampionBundle:
    """Download the champion's ONNX file, drift reference and validation suite from MLflow."""
    champion = registry.load_champion(params.mlflow.model_name, workdir)
    if champion is None:
        raise NoChampionError(
            f"model {params.mlflow.model_name!r} has no 'champion' "
            f"in {params.mlflow.tracking_uri}; "
            "run `normalcy train` first"
        )
    reference_path = registry.download_run_artifact(
        champion.run_id, "reference/drift_reference.npz", workdir
    )
    with np.load(reference_path, allow_pickle=False) as reference:
        X, scores, names = reference["X"], reference["scores"], reference["feature_names"].tolist()
    metadata = read_metadata(str(champion.onnx_path))
    spec_path = registry.download_run_artifact(
        champion.run_id, "reference/validation_spec.json", workdir
    )
    spec = json.loads(Path(spec_path).read_text())
    return ChampionBundle(
        champion.version, champion.run_id, champion.onnx_path, metadata, X, scores, names, spec
    )


def read_batch(batch_path: str | Path, champion: ChampionBundle) -> np.ndarray:
    """The batch, checked against the champion's input (columns, shape, finite values)."""
    return load_batch(batch_path, champion.feature_names, list(champion.reference_X.shape[1:]))


@task
def validate_monitor_batch(batch: np.ndarray, champion: ChampionBundle) -> ValidationReport:
    """The champion's Great Expectations suite on the batch; reported, not blocking: values out
    of the training range are themselves a sign of drift."""
    report = validate_batch(batch, champion.validation_spec, "monitor batch")
    save_report([report], BATCH_VALIDATION)
    return report


@task
def check_drift(batch: np.ndarray, champion: ChampionBundle, params: Params) -> DriftReport:
    """Per-feature KS tests with BH-FDR, plus a shift of the score distribution."""
    batch_scores, _ = score_onnx(str(champion.onnx_path), batch)
    return detect_drift(
        champion.reference_X,
        batch,
        champion.feature_names,
        champion.reference_scores,
        batch_scores,
        params.monitor.fdr,
        params.monitor.score_shift_alpha,
        threshold=float(champion.metadata["threshold"]),
    )


@flow(name="normalcy-monitor", log_prints=True)
def monitor_flow(
    batch_path: str | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict:
    """Check a batch for drift against the champion; on drift, run the recalibrate flow."""
    from normalcy.flows.recalibrate import recalibrate_flow

    params = load_params(params_path, overrides)
    batch_path = batch_path or params.monitor.batch_path
    registry.setup_tracking(params.mlflow)
    with tempfile.TemporaryDirectory() as workdir:
        champion = fetch_champion(params, workdir)
        batch = read_batch(batch_path, champion)
        with mlflow.start_run(run_name="monitor", tags={"normalcy.run_type": "monitor"}):
            mlflow.set_tags({"champion_version": champion.version, "batch_path": str(batch_path)})
            validation = validate_monitor_batch(batch, champion)
            mlflow.log_artifact(str(BATCH_VALIDATION), "validation")
            report = check_drift(batch, champion, params)
            write_json(report.to_dict(), DRIFT_REPORT)
            mlflow.log_artifact(str(DRIFT_REPORT), "drift")
            mlflow.log_metrics(
                {
                    "features_drifted": report.n_features_drifted,
                    "score_shift_p_value": report.score_p_value,
                    "alert_rate_batch": report.alert_rate_batch or 0.0,
                    "drifted": float(report.drifted),
                    "validation_failures": len(validation.failures),
                }
            )
    print(validation.summary())
    print(report.summary())
    result = {
        "drifted": report.drifted,
        "features_drifted": report.n_features_drifted,
        "score_shifted": report.score_shifted,
        "retrain_recommended": report.n_features_drifted > 0,
        "validation_passed": validation.success,
        "validation_failures": len(validation.failures),
        "champion_version": champion.version,
        "report_path": str(DRIFT_REPORT),
        "recalibration": None,
    }
    if report.drifted and params.monitor.recalibrate_on_drift:
        result["recalibration"] = recalibrate_flow(str(batch_path), params_path, overrides)
    return result
