"""The training flow: version, validate, clean, train candidates, calibrate, export, register."""

from __future__ import annotations

import mlflow
from prefect import flow, task

from normalcy import promotion, registry, release
from normalcy.config import Params, load_params
from normalcy.data.splits import Split, Splits
from normalcy.data.versioning import snapshot_data
from normalcy.detectors import Detector
from normalcy.evaluation.selection import CandidateResult
from normalcy.export import ParityError
from normalcy.memory import keep_freed_memory
from normalcy.pipeline import clean, evaluate, export, parallel, prepare, tracking, train, validate
from normalcy.pipeline.evaluate import Evaluation
from normalcy.pipeline.export import Exported
from normalcy.promotion import PromotionDecision
from normalcy.recovery import model_lock, run_tags


@task
def prepare_data(params: Params) -> Splits:
    """Load the source and write deterministic, leakage-checked splits."""
    return prepare.prepare(params.data, params.prepare)


@task
def version_data(params: Params) -> str:
    """Snapshot the prepared data with DVC (cache + local remote); its md5, or 'unversioned'."""
    if not params.versioning.enabled:
        return "unversioned"
    return snapshot_data(params.prepare.output_dir, params.versioning).md5


@task
def validate_data(splits: Splits, params: Params) -> dict:
    """Great Expectations suite from the training split; every split must pass it."""
    try:
        spec, _ = validate.validate(splits, params.validate_)
    finally:
        tracking.log_validation(params.validate_)
    return spec


@task
def clean_data(splits: Splits, params: Params) -> Split:
    """Remove the contaminated tail of the training split, iteratively."""
    cleaned, result = clean.clean(splits.train, params.clean)
    tracking.log_cleaning(result, params.clean)
    return cleaned


@task
def train_and_select(
    cleaned: Split, splits: Splits, params: Params
) -> tuple[Detector, CandidateResult]:
    """Fit every candidate and pick the winner on validation data."""
    detectors, results, winner = train.train_candidates(cleaned, splits.val, params.train)
    tracking.log_candidates(results, winner)
    return detectors[winner.name], winner


@task
def evaluate_winner(
    detector: Detector, splits: Splits, cleaned: Split, params: Params
) -> Evaluation:
    """Calibrate the threshold on validation normals; test metrics for the report."""
    evaluation = evaluate.evaluate(detector, splits, params.evaluate, params.calibration, cleaned)
    tracking.log_evaluation(evaluation, params.evaluate)
    return evaluation


@task
def export_winner(
    detector: Detector, evaluation: Evaluation, splits: Splits, params: Params, run: dict
) -> Exported:
    """ONNX graph checked against torch before anything is registered; optional INT8 twin."""
    try:
        point = evaluation.operating_point()
        exported = export.export_and_gate(detector, splits, point, params.export, run)
    except ParityError as failed:
        tracking.log_parity(failed.report)
        raise
    tracking.log_parity(exported.parity)
    tracking.log_int8(exported)
    return exported


@task
def publish_and_promote(
    cleaned: Split,
    splits: Splits,
    spec: dict,
    winner: CandidateResult,
    evaluation: Evaluation,
    exported: Exported,
    params: Params,
    run: dict,
) -> tuple[str, PromotionDecision]:
    """Register the winner as challenger with its card; champion only if the holdout says so."""
    name = params.mlflow.model_name
    decision = promotion.plan_promotion(exported.onnx_path, splits.holdout, params)
    reference = release.save_drift_reference(
        cleaned.X,
        evaluation.operating_point(),
        splits.feature_names,
        params.monitor,
        params.prepare.seed,
    )
    registered = release.publish_version(
        exported.onnx_path,
        name,
        release.version_tags(run["data_version"], winner.name, evaluation.threshold),
        reference,
        spec,
        tracking.card_metrics(winner, evaluation, exported),
        release.training_data(splits, cleaned, params.data.source, params.data.path),
        exported.int8_path,
        decision.tags(),
    )
    return registered.version, promotion.apply_promotion(registered, decision)


@flow(name="normalcy-train", log_prints=True)
def train_flow(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """prepare, DVC snapshot, validate, clean, candidates, calibrate, export, register."""
    keep_freed_memory()  # a deployment's worker runs this flow without the CLI
    params = load_params(params_path, overrides)
    with parallel.training_cluster(params.train):  # checked before any work, started early
        registry.setup_tracking(params.mlflow)
        tags = run_tags(params.mlflow.model_name)
        with model_lock(params), mlflow.start_run(tags=tags) as active:
            registry.log_params_flat(params.flat())
            splits = prepare_data(params)
            snapshot = version_data.submit(params)  # DVC works in its own processes while GX runs
            spec = validate_data(splits, params)  # a failure ends the flow once DVC is done too
            data_version = snapshot.result()
            mlflow.set_tag("data_version", data_version)
            cleaned = clean_data(splits, params)
            detector, winner = train_and_select(cleaned, splits, params)
            evaluation = evaluate_winner(detector, splits, cleaned, params)
            run = tracking.run_identity(data_version, active.info.run_id, params.mlflow.model_name)
            exported = export_winner(detector, evaluation, splits, params, run)
            version, decision = publish_and_promote(
                cleaned, splits, spec, winner, evaluation, exported, params, run
            )
            return tracking.training_summary(winner, evaluation, exported, run, version, decision)
