"""What the monitor flow checks: the champion with the reference it was trained on, a new batch
against its input and Great Expectations suite, and drift between the two. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime import InferenceSession

from normalcy import registry
from normalcy.artifact.names import DECISION_NAME, EMBEDDING_NAME, SCORE_NAME
from normalcy.config import MlflowParams, MonitorParams
from normalcy.data.sources import load_batch
from normalcy.data.window import fold_batch
from normalcy.drift import DriftReport, detect_drift
from normalcy.drift_sequential import (
    SequentialState,
    load_sequential_state,
    save_sequential_state,
)
from normalcy.errors import NoChampionError
from normalcy.pipeline import artifacts
from normalcy.scoring import (
    as_session,
    load_session,
    output_names,
    read_metadata,
    score_outputs,
)
from normalcy.validation.suite import (
    IMAGE_STATISTICS,
    PER_PIXEL_LIMIT,
    ValidationReport,
    image_statistics,
    save_report,
    validate_batch,
)


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
    reference_embeddings: np.ndarray | None = None  # an image model's, for drift


def has_embedding(session_or_path: InferenceSession | str | Path) -> bool:
    """Whether the graph gives the `embedding` output that image drift compares."""
    return EMBEDDING_NAME in output_names(as_session(session_or_path))


def fetch_champion(params: MlflowParams, workdir: str | Path) -> ChampionBundle:
    """Download the champion's ONNX file, drift reference and validation suite from MLflow."""
    champion = registry.load_champion(params.model_name, workdir)
    if champion is None:
        raise NoChampionError(
            f"model {params.model_name!r} has no 'champion' in {params.tracking_uri}; "
            "run `normalcy train` first"
        )
    reference_path = registry.download_run_artifact(
        champion.run_id, artifacts.RUN_DRIFT_REFERENCE, workdir
    )
    with np.load(reference_path, allow_pickle=False) as reference:
        X, scores, names = reference["X"], reference["scores"], reference["feature_names"].tolist()
    session = load_session(str(champion.onnx_path))  # read once: metadata, outputs, embeddings
    metadata = read_metadata(session)
    spec_path = registry.download_run_artifact(
        champion.run_id, artifacts.RUN_VALIDATION_SPEC, workdir
    )
    spec = json.loads(Path(spec_path).read_text())
    embeddings = None
    if has_embedding(session):  # the reference images as the champion sees them
        embeddings = score_outputs(session, X, names=[EMBEDDING_NAME])[EMBEDDING_NAME]
    return ChampionBundle(
        champion.version,
        champion.run_id,
        champion.onnx_path,
        metadata,
        X,
        scores,
        names,
        spec,
        embeddings,
    )


def read_batch(batch_path: str | Path, champion: ChampionBundle) -> np.ndarray:
    """The batch, checked against the champion's input (columns, shape, finite values)."""
    return load_batch(batch_path, champion.feature_names, list(champion.reference_X.shape[1:]))


@dataclass
class ScoredBatch:
    """A batch with the champion's scores and decisions: scored once, read by every check."""

    rows: np.ndarray
    scores: np.ndarray
    alerts: np.ndarray
    embeddings: np.ndarray | None = None  # an image model's, for drift


def score_batch(rows: np.ndarray, champion: ChampionBundle) -> ScoredBatch:
    names = [SCORE_NAME, DECISION_NAME]
    if champion.reference_embeddings is not None:
        names.append(EMBEDDING_NAME)
    out = score_outputs(str(champion.onnx_path), rows, names=names)
    return ScoredBatch(rows, out[SCORE_NAME], out[DECISION_NAME], out.get(EMBEDDING_NAME))


def validate_monitor_batch(batch: np.ndarray, champion: ChampionBundle) -> ValidationReport:
    """The champion's Great Expectations suite on the batch, written to the monitor report;
    reported, not blocking: values out of the training range are themselves a sign of drift."""
    report = validate_batch(batch, champion.validation_spec, "monitor batch")
    save_report([report], artifacts.MONITOR_VALIDATION)
    return report


def target_alert_rate(champion: ChampionBundle) -> float:
    """The rate of alerts the champion was calibrated for: `target_fpr` in its ONNX metadata
    (every exported and recalibrated graph stores it); a graph without it gets the rate of its
    own calibration scores above its threshold, which is what the threshold was set to give."""
    if "target_fpr" in champion.metadata:
        return float(champion.metadata["target_fpr"])
    threshold = float(champion.metadata["threshold"])
    return max(
        float(np.mean(champion.reference_scores > threshold)),
        1.0 / (1 + len(champion.reference_scores)),
    )


def drift_features(
    reference: np.ndarray,
    batch: np.ndarray,
    feature_names: list[str],
    embeddings: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(reference, batch, names) as the drift tests see them: rows as they are, except images
    that are large (more than `PER_PIXEL_LIMIT` values, as in validation) or come with the
    model's `embeddings` (reference, batch). Those are compared by their per-image statistics
    (mean and std brightness, darkest, brightest) and, when given, the backbone embedding the
    model scores from: a KS test per pixel position would be tens of thousands of tests of one
    thing, blind to a shifted camera, and a texture can change while every statistic stays."""
    large = int(np.prod(reference.shape[1:])) > PER_PIXEL_LIMIT
    if reference.ndim != 4 or not (large or embeddings is not None):
        return reference, batch, feature_names
    stats = [image_statistics(x).to_numpy() for x in (reference, batch)]
    if embeddings is None:
        return stats[0], stats[1], list(IMAGE_STATISTICS)
    width = embeddings[0].shape[1]
    names = [*IMAGE_STATISTICS, *(f"embedding_{i}" for i in range(width))]
    combined = [
        np.hstack([s, e.astype(np.float64)]) for s, e in zip(stats, embeddings, strict=True)
    ]
    return combined[0], combined[1], names


def check_drift(
    batch: ScoredBatch,
    champion: ChampionBundle,
    params: MonitorParams,
    sequential_state: SequentialState,
) -> DriftReport:
    """Per-feature KS tests (BH inside), a shift of the score distribution, the alert rate
    against the champion's target, the CUSUM across batches and the MMD on whole rows, at one
    overall level (images: on per-image statistics and embeddings, see `drift_features`)."""
    embeddings = None
    if champion.reference_embeddings is not None and batch.embeddings is not None:
        embeddings = (champion.reference_embeddings, batch.embeddings)
    reference, rows, names = drift_features(
        champion.reference_X, batch.rows, champion.feature_names, embeddings
    )
    return detect_drift(
        reference,
        rows,
        names,
        champion.reference_scores,
        batch.scores,
        params.alpha,
        threshold=float(champion.metadata["threshold"]),
        target_alert_rate=target_alert_rate(champion),
        batch_alerts=batch.alerts,
        calibrated_on=len(champion.reference_scores),  # the scores its threshold was set on
        sequential_state=sequential_state,
        cusum_allowance=params.cusum_allowance,
        mmd_rows=params.mmd_max_rows if params.mmd else None,
        mmd_permutations=params.mmd_permutations,
    )


def sequential_state(champion: ChampionBundle) -> SequentialState:
    """The CUSUM state of this champion version from earlier monitor runs (fresh if none)."""
    return load_sequential_state(artifacts.DRIFT_SEQUENTIAL_STATE, champion.version)


def keep_sequential_state(report: DriftReport) -> None:
    """Save the state after this batch for the next monitor run."""
    if report.sequential_state is not None:
        save_sequential_state(report.sequential_state, artifacts.DRIFT_SEQUENTIAL_STATE)


def drift_metrics(report: DriftReport, validation: ValidationReport) -> dict[str, float]:
    """What a monitor run logs as MLflow metrics: the verdict and each family's evidence."""
    evidence = {
        f"{t.family}_{'p_value' if t.p_value is not None else 'statistic'}": (
            t.p_value if t.p_value is not None else t.statistic
        )
        for t in report.tests
    }
    return {
        "features_drifted": report.n_features_drifted,
        **evidence,
        "alert_rate_batch": report.alert_rate_batch or 0.0,
        "drifted": float(report.drifted),
        "validation_failures": len(validation.failures),
    }


def monitor_result(
    report: DriftReport, validation: ValidationReport, champion: ChampionBundle
) -> dict:
    """The monitor flow's answer: drift, validation and which champion was checked."""
    return {
        "drifted": report.drifted,
        "features_drifted": report.n_features_drifted,
        "score_shifted": report.score_shifted,
        "families_fired": report.fired(),
        "retrain_recommended": report.n_features_drifted > 0,
        "validation_passed": validation.success,
        "validation_failures": len(validation.failures),
        "champion_version": champion.version,
        "report_path": str(artifacts.DRIFT_REPORT),
        "recalibration": None,
        "retraining": None,
    }


def fold_vetted_rows(
    batch: ScoredBatch, validation: ValidationReport, window_dir: str
) -> tuple[Path | None, str]:
    """Fold the batch's vetted rows into the training window: (the new window file or None,
    why). Only a batch that passed the champion's suite is folded, and only the rows the
    champion does not flag: a retraining must learn the new normal, not its anomalies."""
    if not validation.success:
        return None, "the batch failed the champion's Great Expectations suite; it is not folded"
    vetted = batch.rows[~batch.alerts]
    folded = fold_batch(vetted, window_dir, batch.rows)
    if folded is None:
        return None, "this batch is already in the training window; nothing to retrain on"
    return folded, f"{len(vetted)} of {len(batch.rows)} rows folded into {folded}"


def plot_drift_report(
    batch: ScoredBatch, champion: ChampionBundle, report: DriftReport, path: str | Path
) -> Path:
    """The drift report as a picture for MLflow: scores against the reference, and the
    features that moved most."""
    from normalcy.evaluation.plots import plot_drift

    features = [(f.feature, f.statistic, f.drifted) for f in report.features]
    title = f"champion v{champion.version}, {'drift' if report.drifted else 'no drift'}"
    threshold = float(champion.metadata["threshold"])
    return plot_drift(champion.reference_scores, batch.scores, threshold, features, title, path)
