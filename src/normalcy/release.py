"""Publish a version: what every registered model carries, for the train and recalibrate flows
alike. The drift reference and validation suite (what monitor compares new batches with), the
registered graph (alias `challenger`), its metadata, its INT8 twin when it has one, and its
model card as the version's description. Deciding on `champion` is promotion.py's job."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np

from normalcy import registry
from normalcy.calibration import OperatingPoint
from normalcy.config import MonitorParams
from normalcy.data.splits import Split, Splits
from normalcy.model_card import model_card
from normalcy.pipeline import artifacts

log = logging.getLogger(__name__)


def save_drift_reference(
    X: np.ndarray,
    point: OperatingPoint,
    feature_names: list[str],
    params: MonitorParams,
    seed: int,
    folder: str | Path = artifacts.ARTIFACTS,
) -> Path:
    """A seeded sample of at most `monitor.reference_size` rows of `X` (in their order) with the
    operating point's calibration scores and threshold: what monitor compares a batch with."""
    rows = np.random.default_rng(seed).choice(
        len(X), min(params.reference_size, len(X)), replace=False
    )
    path = Path(folder) / artifacts.DRIFT_REFERENCE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        X=X[np.sort(rows)],
        scores=point.calibration_scores,
        feature_names=np.array(feature_names),
        threshold=point.threshold,
    )
    return path


def version_tags(data_version: str, detector: str, threshold: float, **extra: str) -> dict:
    """The tags every registered version carries (and any particular to how it was made)."""
    return {
        "data_version": data_version,
        "detector": detector,
        "threshold": f"{threshold:.6g}",
        **extra,
    }


def training_data(splits: Splits, cleaned: Split, source: str, path: str | None) -> dict:
    """What the model card says about the data a trained version learnt from."""
    kept = {"val": splits.val, "test": splits.test, "holdout": splits.holdout}
    rows = {"train": len(cleaned), **{name: len(split) for name, split in kept.items()}}
    labelled = {"train": cleaned.y, **{name: split.y for name, split in kept.items()}}
    return {
        "source": source,
        "path": path,
        "rows": rows,
        "anomaly_share": {k: float(np.mean(y)) for k, y in labelled.items() if y is not None},
        "removed_by_cleaning": len(splits.train) - len(cleaned),
    }


def recalibration_data(batch_path: str, n_batch: int, n_kept: int, from_version: str) -> dict:
    """What the model card says about the batch a recalibrated version's threshold came from."""
    return {
        "source": "recalibration batch",
        "path": batch_path,
        "rows": {"batch": n_batch, "kept as normal": n_kept},
        "description": f"the network is version {from_version}'s; only the "
        "threshold and calibration scores come from this batch",
    }


def publish_version(
    onnx_path: str | Path,
    model_name: str,
    tags: dict,
    reference: Path,
    validation_spec: dict,
    metrics: dict,
    data: dict,
    int8_path: Path | None = None,
    promotion: dict | None = None,
) -> registry.Registered:
    """Log the reference and suite, register the graph as `challenger`, and log its metadata,
    its INT8 twin (when given) and its model card, which also becomes the version's
    description; `promotion` (the decision's tags) goes into the card. The version is tagged
    `normalcy_status: ready` last: one left `registering` belongs to a run that died (see
    normalcy.recovery). Runs inside the active MLflow run."""
    registry.log_json(validation_spec, artifacts.RUN_VALIDATION_SPEC)  # may hold numpy values
    mlflow.log_artifact(str(reference), artifacts.RUN_REFERENCE_DIR)
    registered = registry.register_challenger(onnx_path, model_name, tags)
    mlflow.log_dict(registered.metadata, artifacts.RUN_CARD_METADATA)
    if int8_path is not None:
        uri = registry.log_int8_twin(int8_path, registered)
        log.info("INT8 twin of v%s logged at %s", registered.version, uri)
    card = model_card(registered.metadata, metrics, data, promotion)
    mlflow.log_text(card, artifacts.RUN_CARD)
    registry.describe_version(registered.name, registered.version, card)
    registry.tag_version(registered.name, registered.version, {registry.STATUS_TAG: registry.READY})
    return registered
