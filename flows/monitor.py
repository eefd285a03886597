"""The monitor flow: compare a new batch with the champion's reference; on drift, retrain on
the training window or recalibrate."""

from __future__ import annotations

import tempfile

import mlflow
import numpy as np
from prefect import flow, task

from normalcy import monitoring, registry
from normalcy.config import Params, load_params
from normalcy.drift import DriftReport
from normalcy.errors import RecalibrationRefused
from normalcy.jsonio import write_json
from normalcy.monitoring import ChampionBundle, ScoredBatch
from normalcy.pipeline import artifacts
from normalcy.recovery import run_tags
from normalcy.validation.suite import ValidationReport


@task
def validate_monitor_batch(batch: np.ndarray, champion: ChampionBundle) -> ValidationReport:
    """The champion's Great Expectations suite on the batch: reported, not blocking."""
    report = monitoring.validate_monitor_batch(batch, champion)
    mlflow.log_artifact(str(artifacts.MONITOR_VALIDATION), "validation")
    return report


@task
def check_drift(batch: ScoredBatch, champion: ChampionBundle, params: Params) -> DriftReport:
    """Drift test families at one level (features, scores, alert rate, CUSUM across batches)."""
    state = monitoring.sequential_state(champion)
    report = monitoring.check_drift(batch, champion, params.monitor, state)
    monitoring.keep_sequential_state(report)
    write_json(report.to_dict(), artifacts.DRIFT_REPORT)
    mlflow.log_artifact(str(artifacts.DRIFT_REPORT), "drift")
    plot = monitoring.plot_drift_report(batch, champion, report, artifacts.DRIFT_PLOT)
    mlflow.log_artifact(str(plot), "drift")
    return report


def retrain_on_window(
    batch: ScoredBatch,
    validation: ValidationReport,
    params: Params,
    params_path: str,
    overrides: list[str] | None,
) -> dict:
    """Fold the batch's vetted rows into the training window and run the train flow on it;
    a batch already folded (or not vetted) retrains nothing."""
    from normalcy.flows.train import train_flow

    folded, why = monitoring.fold_vetted_rows(batch, validation, params.data.window_dir)
    print(why)
    if folded is None:
        return {"skipped": why}
    summary = train_flow(params_path, overrides)
    return {"folded": str(folded), **{k: summary[k] for k in RETRAIN_KEYS}}


RETRAIN_KEYS = ("model_version", "promoted", "promotion_reason", "data_version")


@flow(name="normalcy-monitor", log_prints=True)
def monitor_flow(
    batch_path: str | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict:
    """Check a batch for drift against the champion. On feature drift with
    `monitor.retrain_on_drift`, retrain on the window with the batch folded in; on other drift
    (or without it), run the recalibrate flow."""
    from normalcy.flows.recalibrate import recalibrate_flow

    params = load_params(params_path, overrides)
    batch_path = batch_path or params.monitor.batch_path
    registry.setup_tracking(params.mlflow)
    with tempfile.TemporaryDirectory() as workdir:
        champion = monitoring.fetch_champion(params.mlflow, workdir)
        batch = monitoring.score_batch(monitoring.read_batch(batch_path, champion), champion)
        tags = {"normalcy.run_type": "monitor", **run_tags(holds_lock=False)}
        with mlflow.start_run(run_name="monitor", tags=tags):
            mlflow.set_tags({"champion_version": champion.version, "batch_path": str(batch_path)})
            validation = validate_monitor_batch(batch.rows, champion)
            report = check_drift(batch, champion, params)
            mlflow.log_metrics(monitoring.drift_metrics(report, validation))
    print(validation.summary())
    print(report.summary())
    result = monitoring.monitor_result(report, validation, champion)
    if report.n_features_drifted and params.monitor.retrain_on_drift:  # normality moved
        result["retraining"] = retrain_on_window(batch, validation, params, params_path, overrides)
    elif report.drifted and params.monitor.recalibrate_on_drift:
        try:
            result["recalibration"] = recalibrate_flow(str(batch_path), params_path, overrides)
        except RecalibrationRefused as refused:  # the batch must not become the new normal
            print(refused)
            result["recalibration"] = {"refused": str(refused)}
    return result
