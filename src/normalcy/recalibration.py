"""Recalibrating the champion from a batch: only the score scale moved, so the network stays
and the threshold and calibration scores are re-estimated on the batch (its anomalous tail
trimmed). One recalibration at a time: an OS lock guards the champion alias. Torch-free."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from normalcy import registry
from normalcy.artifact.calibration_head import subsample_calibration
from normalcy.artifact.recalibration import recalibrate_graph
from normalcy.calibration import OperatingPoint, recalibrated_threshold, robust_normal_scores
from normalcy.errors import RecalibrationBusy
from normalcy.monitoring import ChampionBundle
from normalcy.pipeline import artifacts
from normalcy.scoring import score_onnx


@contextmanager
def exclusive(lock_path: Path = artifacts.RECALIBRATION_LOCK) -> Iterator[None]:
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


@dataclass
class Recalibration(OperatingPoint):
    """The new operating point (its calibration scores are every batch score kept as normal),
    the champion's threshold before it, and the kept scores that go into the graph (at most
    `export.max_calibration_scores`)."""

    old_threshold: float
    stored_scores: np.ndarray
    n_batch: int

    def metrics(self) -> dict[str, float]:
        """What a recalibration run logs and its model card shows."""
        return {
            "old_threshold": self.old_threshold,
            "threshold": self.threshold,
            "batch_rows": self.n_batch,
            "trimmed_rows": self.n_batch - len(self.calibration_scores),
        }


def recalibrate(
    champion: ChampionBundle,
    batch: np.ndarray,
    mad_threshold: float,
    default_target_fpr: float,
    max_calibration_scores: int,
) -> Recalibration:
    """The champion's target FPR (the configured one if its metadata lacks it) re-estimated on
    the batch's scores after robust trimming of their anomalous tail."""
    scores, _ = score_onnx(str(champion.onnx_path), batch)
    target_fpr = float(champion.metadata.get("target_fpr", default_target_fpr))
    kept = robust_normal_scores(scores, mad_threshold)
    return Recalibration(
        threshold=recalibrated_threshold(scores, target_fpr, mad_threshold),
        target_fpr=target_fpr,
        calibration_scores=kept,
        old_threshold=float(champion.metadata["threshold"]),
        stored_scores=subsample_calibration(kept, max_calibration_scores),
        n_batch=len(batch),
    )


def _int8_twin(model_name: str, champion: ChampionBundle, workdir: str | Path) -> Path | None:
    """The champion's INT8 twin downloaded from its run, or None when it has none."""
    tags = MlflowClient().get_model_version(model_name, champion.version).tags
    uri = tags.get(registry.INT8_TAG, "")
    if not uri.startswith("runs:/"):
        return None
    run_id, _, artifact_path = uri.removeprefix("runs:/").partition("/")
    return registry.download_run_artifact(run_id, artifact_path, Path(workdir) / "int8")


def recalibrated_graphs(
    model_name: str,
    champion: ChampionBundle,
    point: Recalibration,
    run_id: str,
    workdir: str | Path,
) -> tuple[Path, Path | None]:
    """(recalibrated graph, recalibrated INT8 twin or None): the champion's graphs with the new
    threshold and calibration scores. Only the float calibration head changes, so the twin's
    INT8 parity still holds."""
    updates = {
        "n_calibration_scores": int(len(point.calibration_scores)),
        "recalibrated_from_version": champion.version,
        "mlflow_run_id": run_id,
    }
    new = (point.threshold, point.stored_scores)
    path = recalibrate_graph(champion.onnx_path, *new, artifacts.RECALIBRATED, updates)
    twin = _int8_twin(model_name, champion, workdir)
    if twin is None:
        return path, None
    return path, recalibrate_graph(twin, *new, artifacts.RECALIBRATED_INT8, updates)
