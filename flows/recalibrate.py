"""The recalibrate flow: a new threshold for the champion's graph from a batch, as a new version."""

from __future__ import annotations

import fcntl
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from prefect import flow

from normalcy import registry
from normalcy.artifact.calibration_head import subsample_calibration
from normalcy.artifact.recalibration import recalibrate_graph
from normalcy.calibration import recalibrated_threshold, robust_normal_scores
from normalcy.config import load_params
from normalcy.flows.monitor import ChampionBundle, fetch_champion, read_batch
from normalcy.model_card import model_card
from normalcy.scoring import score_onnx
from normalcy.stages import ARTIFACTS

log = logging.getLogger("normalcy.recalibrate")
LOCK = ARTIFACTS / "recalibrate.lock"
RECALIBRATED = ARTIFACTS / "model.recalibrated.onnx"
RECALIBRATED_INT8 = ARTIFACTS / "model.recalibrated.int8.onnx"


class RecalibrationBusy(RuntimeError):
    """Another recalibration holds the lock: two at once would race on the champion alias."""


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An OS file lock: one recalibration at a time on this machine, released if it crashes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecalibrationBusy(f"another recalibration holds {lock_path}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recalibrate_int8_twin(
    model_name: str,
    champion: ChampionBundle,
    threshold: float,
    calibration_scores: np.ndarray,
    updates: dict,
    workdir: str | Path,
) -> Path | None:
    """The champion's INT8 twin (if it has one) with the same new threshold and calibration
    scores; only the float calibration head changes, so its INT8 parity still holds."""
    tags = MlflowClient().get_model_version(model_name, champion.version).tags
    uri = tags.get(registry.INT8_TAG, "")
    if not uri.startswith("runs:/"):
        return None
    run_id, _, artifact_path = uri.removeprefix("runs:/").partition("/")
    twin = registry.download_run_artifact(run_id, artifact_path, Path(workdir) / "int8")
    return recalibrate_graph(twin, threshold, calibration_scores, RECALIBRATED_INT8, updates)


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
    with exclusive(LOCK), tempfile.TemporaryDirectory() as workdir:
        champion = fetch_champion(params, workdir)
        batch = read_batch(batch_path, champion)
        scores, _ = score_onnx(str(champion.onnx_path), batch)
        target_fpr = float(champion.metadata.get("target_fpr", params.calibration.target_fpr))
        old_threshold = float(champion.metadata["threshold"])
        kept_scores = robust_normal_scores(scores, params.monitor.mad_threshold)
        threshold = recalibrated_threshold(scores, target_fpr, params.monitor.mad_threshold)
        stored = subsample_calibration(kept_scores, params.export.max_calibration_scores)
        with mlflow.start_run(
            run_name="recalibrate", tags={"normalcy.run_type": "recalibrate"}
        ) as run:
            updates = {
                "n_calibration_scores": int(len(kept_scores)),
                "recalibrated_from_version": champion.version,
                "mlflow_run_id": run.info.run_id,
            }
            path = recalibrate_graph(champion.onnx_path, threshold, stored, RECALIBRATED, updates)
            int8_path = recalibrate_int8_twin(name, champion, threshold, stored, updates, workdir)
            reference = Path(workdir) / "drift_reference.npz"
            rows = np.random.default_rng(0).permutation(len(batch))[: params.monitor.reference_size]
            np.savez(
                reference,
                X=batch[np.sort(rows)],
                scores=kept_scores,
                feature_names=np.array(champion.feature_names),
                threshold=threshold,
            )
            mlflow.log_artifact(str(reference), "reference")
            mlflow.log_dict(champion.validation_spec, "reference/validation_spec.json")
            metrics = {
                "old_threshold": old_threshold,
                "threshold": threshold,
                "batch_rows": len(batch),
                "trimmed_rows": len(batch) - len(kept_scores),
            }
            mlflow.log_metrics(metrics)
            mlflow.set_tags(
                {"recalibrated_from_version": champion.version, "batch_path": batch_path}
            )
            tags = {
                "data_version": str(champion.metadata.get("data_version", "")),
                "detector": str(champion.metadata.get("detector", "")),
                "threshold": f"{threshold:.6g}",
                "recalibrated_from_version": champion.version,
            }
            registered = registry.register_challenger(path, name, tags)
            mlflow.log_dict(registered.metadata, "model_card/metadata.json")
            if int8_path is not None:
                registry.log_int8_twin(int8_path, registered)
            data = {
                "source": "recalibration batch",
                "path": batch_path,
                "rows": {"batch": len(batch), "kept as normal": len(kept_scores)},
                "description": f"the network is version {champion.version}'s; only the "
                "threshold and calibration scores come from this batch",
            }
            card = model_card(registered.metadata, metrics, data)
            mlflow.log_text(card, "model_card/model_card.md")
            registry.describe_version(name, registered.version, card)
            registry.set_champion(name, registered.version)
    log.info(
        "threshold %.5g -> %.5g; champion is now v%s", old_threshold, threshold, registered.version
    )
    return {
        "old_threshold": old_threshold,
        "threshold": threshold,
        "model_version": registered.version,
        "recalibrated_from_version": champion.version,
    }
