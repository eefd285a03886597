"""The recalibrate flow: a new threshold for the champion's graph from a batch, as a new version."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from prefect import flow

from normalcy import monitoring, registry, release
from normalcy.config import load_params
from normalcy.recalibration import exclusive, recalibrate, recalibrated_graphs

log = logging.getLogger("normalcy.recalibrate")


@flow(name="normalcy-recalibrate", log_prints=True)
def recalibrate_flow(
    batch_path: str, params_path: str = "params.yaml", overrides: list[str] | None = None
) -> dict:
    """Re-estimate the threshold on the batch (its anomalous tail trimmed), write it and the kept
    batch scores (the new calibration scores) into the champion's graph and register that graph
    as the new champion version."""
    params = load_params(params_path, overrides)
    registry.setup_tracking(params.mlflow)
    name = params.mlflow.model_name
    with exclusive(), tempfile.TemporaryDirectory() as workdir:
        champion = monitoring.fetch_champion(params.mlflow, workdir)
        batch = monitoring.read_batch(batch_path, champion)
        point = recalibrate(
            champion,
            batch,
            params.monitor.mad_threshold,
            params.calibration.target_fpr,
            params.export.max_calibration_scores,
        )
        with mlflow.start_run(
            run_name="recalibrate", tags={"normalcy.run_type": "recalibrate"}
        ) as run:
            path, int8_path = recalibrated_graphs(name, champion, point, run.info.run_id, workdir)
            mlflow.log_metrics(point.metrics())
            mlflow.set_tags(
                {"recalibrated_from_version": champion.version, "batch_path": batch_path}
            )
            reference = release.save_drift_reference(
                batch, point, champion.feature_names, params.monitor, seed=0, folder=Path(workdir)
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
                release.recalibration_data(
                    batch_path, len(batch), len(point.calibration_scores), champion.version
                ),
                int8_path,
            )
            registry.set_champion(name, registered.version)
    log.info(
        "threshold %.5g -> %.5g; champion is now v%s",
        point.old_threshold,
        point.threshold,
        registered.version,
    )
    return {
        "old_threshold": point.old_threshold,
        "threshold": point.threshold,
        "model_version": registered.version,
        "recalibrated_from_version": champion.version,
    }
