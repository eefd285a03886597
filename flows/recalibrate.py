"""The recalibrate flow: a new threshold for the champion's graph from a vetted batch."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from prefect import flow

from normalcy import monitoring, promotion, registry, release
from normalcy.config import load_params
from normalcy.recalibration import exclusive, recalibrate, recalibrated_graphs
from normalcy.recovery import model_lock, run_tags
from normalcy.validation.suite import validate_batch

log = logging.getLogger("normalcy.recalibrate")


@flow(name="normalcy-recalibrate", log_prints=True)
def recalibrate_flow(
    batch_path: str, params_path: str = "params.yaml", overrides: list[str] | None = None
) -> dict:
    """Refuse a batch that fails a guard (RecalibrationRefused, nothing registered); otherwise
    move the champion's threshold and calibration scores with the batch's score scale, register
    that graph, with the batch's vetted rows as its drift reference, and make it champion
    (`recalibrate.promotion: auto`) or leave it challenger for a person (`manual`)."""
    params = load_params(params_path, overrides)
    registry.setup_tracking(params.mlflow)
    name = params.mlflow.model_name
    with exclusive(), model_lock(params), tempfile.TemporaryDirectory() as workdir:
        champion = monitoring.fetch_champion(params.mlflow, workdir)
        batch = monitoring.read_batch(batch_path, champion)
        validation = validate_batch(batch, champion.validation_spec, "recalibration batch")
        point = recalibrate(
            champion,
            batch,
            validation,
            params.recalibrate,
            params.calibration.target_fpr,
            params.export.max_calibration_scores,
        )
        with mlflow.start_run(
            run_name="recalibrate",
            tags={"normalcy.run_type": "recalibrate", **run_tags(holds_lock=True)},
        ) as run:
            path, int8_path = recalibrated_graphs(name, champion, point, run.info.run_id, workdir)
            mlflow.log_metrics(point.metrics())
            mlflow.set_tags(
                {"recalibrated_from_version": champion.version, "batch_path": batch_path}
            )
            vetted = batch[point.vetted_rows]
            reference = release.save_drift_reference(
                vetted, point, champion.feature_names, params.monitor, seed=0, folder=Path(workdir)
            )
            registered = release.publish_version(
                path,
                name,
                release.version_tags(
                    str(champion.metadata.get("data_version", "")),
                    str(champion.metadata.get("detector", "")),
                    point.threshold,
                    recalibrated_from_version=champion.version,
                ),
                reference,
                champion.validation_spec,
                point.metrics(),
                release.recalibration_data(batch_path, len(batch), len(vetted), champion.version),
                int8_path,
            )
            promoted = params.recalibrate.promotion == "auto"
            if promoted:
                reason = f"recalibrated from v{champion.version}; every guard passed"
                promotion.promote_version(name, registered.version, reason)
    log.info(
        "threshold %.5g -> %.5g; v%s is %s",
        point.old_threshold,
        point.threshold,
        registered.version,
        "champion"
        if promoted
        else f"challenger (promote it with `normalcy promote {registered.version}`)",
    )
    return {
        "old_threshold": point.old_threshold,
        "threshold": point.threshold,
        "model_version": registered.version,
        "recalibrated_from_version": champion.version,
        "promoted": promoted,
        "estimated_contamination": point.estimated_contamination,
    }
