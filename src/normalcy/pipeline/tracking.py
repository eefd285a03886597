"""What each step of the train flow records in the active MLflow run, and the run's summary.

The step modules stay free of MLflow (dvc repro runs them without a run); the train flow calls
these after each step. Nothing here trains or exports: types are for annotations only."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import mlflow
import numpy as np

from normalcy.config import CleanParams, EvaluateParams, ValidateParams
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts

if TYPE_CHECKING:
    from normalcy.evaluation.selection import CandidateResult
    from normalcy.export import ParityReport
    from normalcy.pipeline.evaluate import Evaluation
    from normalcy.pipeline.export import Exported
    from normalcy.promotion import PromotionDecision
    from normalcy.validation.cleaning import CleaningResult


def log_validation(params: ValidateParams) -> None:
    """The validation report, passed or failed (a failure is what a user needs to read)."""
    report = artifacts.validation_report(params)
    if report.exists():
        mlflow.log_artifact(str(report), "validation")


def log_cleaning(result: CleaningResult | None, params: CleanParams) -> None:
    """The cleaning log, and one metrics step per cleaning iteration."""
    mlflow.log_artifact(str(artifacts.cleaning_log(params)), "cleaning")
    if result is None:
        return
    for it in result.iterations:
        quality = {}
        if it.precision is not None:
            quality = {"clean_precision": it.precision, "clean_recall": it.recall}
        mlflow.log_metrics({"clean_removed": it.n_removed, **quality}, step=it.iteration)


def log_candidates(results: list[CandidateResult], winner: CandidateResult) -> None:
    """Each candidate's validation metric and fit time, the table, and the winner's name."""
    for result in results:
        mlflow.log_metric(f"{result.name}.{result.metric_name}", result.metric)
        mlflow.log_metric(f"{result.name}.fit_seconds", result.fit_seconds)
    mlflow.log_artifact(str(artifacts.CANDIDATES), "candidates")
    mlflow.set_tag("winner", winner.name)


def log_evaluation(evaluation: Evaluation, params: EvaluateParams) -> None:
    """Threshold, finite test metrics, plots and the metrics file."""
    mlflow.log_metric("threshold", evaluation.threshold)
    mlflow.log_metrics({f"test_{k}": v for k, v in evaluation.test.items() if np.isfinite(v)})
    for plot in evaluation.plots:
        mlflow.log_artifact(plot, "plots")
    for overlay in evaluation.overlays:
        mlflow.log_artifact(overlay, artifacts.OVERLAYS_DIR)
    if evaluation.per_defect:
        mlflow.log_table(per_defect_table(evaluation.per_defect), "evaluation/per_defect.json")
        mlflow.log_metrics(
            {
                f"test_{metric_key(defect)}_{name}": value
                for defect, row in evaluation.per_defect.items()
                for name, value in row.items()
                if name != "n" and np.isfinite(value)
            }
        )
    mlflow.log_artifact(str(artifacts.metrics(params)), "evaluation")


def metric_key(name: str) -> str:
    """A defect name as part of an MLflow metric key (letters, digits, _ - . / and space)."""
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", name)


def per_defect_table(per_defect: dict[str, dict[str, float]]) -> dict[str, list]:
    """{defect: {metric: value}} as columns, for `mlflow.log_table`."""
    columns = sorted({key for row in per_defect.values() for key in row})
    table: dict[str, list] = {"defect": list(per_defect)}
    for column in columns:
        table[column] = [row.get(column) for row in per_defect.values()]
    return table


def log_parity(report: ParityReport) -> None:
    """The float graph's parity report and its headline numbers, passed or failed."""
    mlflow.log_dict(report.to_dict(), f"{artifacts.RUN_PARITY_DIR}/{artifacts.PARITY.name}")
    mlflow.log_metrics(
        {
            "parity_max_abs_diff": report.max_abs_diff,
            "parity_spearman": report.spearman,
            "parity_p_value_mismatches": report.n_p_value_mismatches,
        }
    )


def log_int8(exported: Exported) -> None:
    """The INT8 twin's outcome (tag `int8`) and, when it was measured, its parity report."""
    if exported.int8_status is None:
        return
    mlflow.set_tag("int8", exported.int8_status)
    report = exported.int8_parity
    if report is None:
        return
    mlflow.log_dict(report.to_dict(), f"{artifacts.RUN_PARITY_DIR}/{artifacts.PARITY_INT8.name}")
    mlflow.log_metrics(
        {
            "int8_spearman": report.spearman,
            "int8_is_anomaly_agreement": report.is_anomaly_agreement,
            "int8_max_rel_diff": report.max_rel_diff,
        }
    )


def card_metrics(winner: CandidateResult, evaluation: Evaluation, exported: Exported) -> dict:
    """The figures the model card shows: selection, test, parity (and INT8 parity)."""
    metrics = {
        "selection_metric": winner.metric_name,
        "selection_value": winner.metric,
        "threshold_rule": evaluation.threshold_how,
        **{f"test_{key}": value for key, value in evaluation.test.items()},
        "parity_max_abs_diff": exported.parity.max_abs_diff,
        "parity_spearman": exported.parity.spearman,
    }
    if exported.int8_parity is not None:
        metrics["int8_spearman"] = exported.int8_parity.spearman
        metrics["int8_is_anomaly_agreement"] = exported.int8_parity.is_anomaly_agreement
    return metrics


def run_identity(data_version: str, mlflow_run_id: str, model_name: str) -> dict:
    """What ties a training run's outputs together (export metadata, version tags, summary)."""
    return {"data_version": data_version, "mlflow_run_id": mlflow_run_id, "model_name": model_name}


def training_summary(
    winner: CandidateResult,
    evaluation: Evaluation,
    exported: Exported,
    run: dict,
    model_version: str,
    decision: PromotionDecision,
) -> dict:
    """`artifacts/summary.json`: what won, how well, where it is, and the promotion decision.
    `run` holds data_version, mlflow_run_id and model_name."""
    int8 = exported.int8_parity
    summary = {
        "winner": winner.name,
        "selection_metric": winner.metric_name,
        "selection_value": winner.metric,
        "test_auroc": evaluation.test.get("auroc"),
        "test_auprc": evaluation.test.get("auprc"),
        "test_pixel_auroc": evaluation.test.get("pixel_auroc"),
        "test_aupro": evaluation.test.get("aupro"),
        "test_fpr_at_threshold": evaluation.test.get("fpr"),
        "test_recall_at_threshold": evaluation.test.get("recall"),
        "threshold": evaluation.threshold,
        "target_fpr": evaluation.target_fpr,
        "data_version": run["data_version"],
        "mlflow_run_id": run["mlflow_run_id"],
        "model_name": run["model_name"],
        "model_version": model_version,
        "promoted": decision.promoted,
        "promotion_reason": decision.reason,
        "onnx_path": str(exported.onnx_path),
        "int8_onnx_path": None if exported.int8_path is None else str(exported.int8_path),
        "int8_passed": None if int8 is None else int8.passed,
    }
    write_json(summary, artifacts.SUMMARY)
    mlflow.log_artifact(str(artifacts.SUMMARY))
    return summary
