"""Recalibrating the champion from a batch: only the score scale moved, so the network stays and
the threshold and calibration scores follow the scale (`calibration.fit_score_shift`).

A batch is refused, with every reason, when it fails the champion's Great Expectations suite,
is too small, looks too contaminated, or would move the scale more than `recalibrate.*` allows:
a broken sensor or a sustained attack must not become the new normal. One recalibration at a
time: an OS lock guards the champion alias. Torch-free."""

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
from normalcy.calibration import OperatingPoint, ScoreShift, fit_score_shift
from normalcy.config import RecalibrateParams
from normalcy.errors import RecalibrationBusy, RecalibrationRefused
from normalcy.monitoring import ChampionBundle
from normalcy.pipeline import artifacts
from normalcy.scoring import score_onnx
from normalcy.validation.suite import ValidationReport


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
    """The new operating point (threshold and calibration scores mapped by `shift`), the
    champion's threshold before it, the scores that go into the graph (at most
    `export.max_calibration_scores`), and the batch rows below the new threshold: the vetted
    rows that may become the drift reference."""

    old_threshold: float
    stored_scores: np.ndarray
    n_batch: int
    shift: ScoreShift
    estimated_contamination: float
    vetted_rows: np.ndarray

    def metrics(self) -> dict[str, float]:
        """What a recalibration run logs and its model card shows."""
        return {
            "old_threshold": self.old_threshold,
            "threshold": self.threshold,
            "batch_rows": self.n_batch,
            "score_scale": self.shift.scale,
            "score_offset": self.shift.offset,
            "estimated_contamination": self.estimated_contamination,
        }


def refusals(
    n_rows: int,
    validation: ValidationReport,
    shift: ScoreShift,
    contamination: float,
    params: RecalibrateParams,
) -> list[str]:
    """Every reason to refuse this batch (empty: it may recalibrate the champion)."""
    problems = []
    if not validation.success:
        failed = ", ".join(
            f"{failure['expectation']}[{failure.get('column')}]" for failure in validation.failures
        )
        problems.append(
            f"it fails {len(validation.failures)} of {validation.checked} checks of the "
            f"champion's Great Expectations suite ({failed})"
        )
    if n_rows < params.min_rows:
        problems.append(f"it has {n_rows} rows, fewer than recalibrate.min_rows={params.min_rows}")
    limit = params.max_scale_change
    if not 1 / limit <= shift.scale <= limit:
        problems.append(
            f"its score spread changed by a factor {shift.scale:.3g}, beyond "
            f"recalibrate.max_scale_change={limit:g}"
        )
    if shift.median_move_iqrs > limit:
        problems.append(
            f"its median score moved {shift.median_move_iqrs:.3g} calibration IQRs, beyond "
            f"recalibrate.max_scale_change={limit:g}"
        )
    if contamination > params.max_contamination:
        problems.append(
            f"about {contamination:.1%} of it looks anomalous, above "
            f"recalibrate.max_contamination={params.max_contamination:g}"
        )
    return problems


def shift_with_contamination(
    calibration_scores: np.ndarray,
    batch_scores: np.ndarray,
    old_threshold: float,
    target_fpr: float,
    rounds: int = 3,
) -> tuple[ScoreShift, float, float]:
    """(shift, new threshold, estimated contamination), refined together: the share of batch
    rows above the mapped threshold beyond the target rate estimates the contamination, which
    corrects the quartiles the next map is fitted on. A few rounds settle it."""
    contamination = 0.0
    for _ in range(rounds):
        shift = fit_score_shift(calibration_scores, batch_scores, min(contamination, 0.5))
        threshold = float(shift.apply([old_threshold])[0])
        contamination = max(0.0, float(np.mean(batch_scores > threshold)) - target_fpr)
    return shift, threshold, contamination


def recalibrate(
    champion: ChampionBundle,
    batch: np.ndarray,
    validation: ValidationReport,
    params: RecalibrateParams,
    default_target_fpr: float,
    max_calibration_scores: int,
) -> Recalibration:
    """The champion's operating point moved with the batch's score scale, or
    RecalibrationRefused naming every guard the batch fails.

    The contamination estimate is the share of batch rows above the new threshold beyond the
    target rate: what the recalibrated model would flag in excess on this very batch."""
    scores, _ = score_onnx(str(champion.onnx_path), batch)
    target_fpr = float(champion.metadata.get("target_fpr", default_target_fpr))
    shift, threshold, contamination = shift_with_contamination(
        champion.reference_scores, scores, float(champion.metadata["threshold"]), target_fpr
    )
    problems = refusals(len(batch), validation, shift, contamination, params)
    if problems:
        raise RecalibrationRefused(
            f"recalibration refused for champion v{champion.version}: " + "; ".join(problems)
        )
    calibration = shift.apply(champion.reference_scores).astype(np.float32)
    return Recalibration(
        threshold=threshold,
        target_fpr=target_fpr,
        calibration_scores=calibration,
        old_threshold=float(champion.metadata["threshold"]),
        stored_scores=subsample_calibration(calibration, max_calibration_scores),
        n_batch=len(batch),
        shift=shift,
        estimated_contamination=contamination,
        vetted_rows=scores <= threshold,
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
