"""The training window: vetted incoming batches folded into the training data.

When normality itself moves (feature drift), recalibrating the threshold is not enough: the
model must learn the new normal. The monitor folds the batch's vetted rows (it passed the
champion's suite; rows the champion does not flag) into `data.window_dir`, one `.npz` per batch
named by the hash of the whole batch, and retrains. Training then reads the source plus every window
file, so the prepared data, and its DVC version, include them. Folding the same batch twice
changes nothing (same name), so it yields one data version and one retraining, not two.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from normalcy.data.sources import DataError, Dataset


def batch_name(rows: np.ndarray) -> str:
    """The file a batch is folded into: the hash of its float32 rows."""
    data = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
    digest = hashlib.sha256(str(data.shape).encode() + data.tobytes()).hexdigest()
    return f"batch-{digest[:16]}.npz"


def fold_batch(
    rows: np.ndarray, window_dir: str | Path, batch: np.ndarray | None = None
) -> Path | None:
    """Add vetted `rows` of `batch` (default: the rows themselves) to the window; the new file,
    or None when this batch is already in it. The file is named after the whole batch, not
    the rows vetted from it: a new champion vets differently, and the same batch must still
    be folded once. Written under a temporary name and renamed, so a reader never sees half
    a batch."""
    if len(rows) == 0:
        raise DataError("no vetted rows to fold into the training window")
    folder = Path(window_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / batch_name(rows if batch is None else batch)
    if path.exists():
        return None
    partial = folder / f".{path.name}.tmp.npz"
    np.savez(partial, X=np.asarray(rows, dtype=np.float32))
    partial.rename(path)
    return path


def window_rows(window_dir: str | Path, row_shape: tuple[int, ...]) -> list[np.ndarray]:
    """Every folded batch's rows, in name order; a batch of another shape is an error."""
    batches = []
    for path in sorted(Path(window_dir).glob("batch-*.npz")):
        with np.load(path, allow_pickle=False) as archive:
            rows = archive["X"]
        if rows.shape[1:] != tuple(row_shape):
            raise DataError(
                f"{path}: window rows have shape {list(rows.shape[1:])}; the data's rows have "
                f"{list(row_shape)} (a window from another data schema?)"
            )
        batches.append(rows)
    return batches


def with_window(dataset: Dataset, window_dir: str | Path | None) -> Dataset:
    """The dataset with the window's rows appended: labelled normal (0) when the source has
    labels (they were vetted as normal), with ids after the source's own."""
    if window_dir is None or not Path(window_dir).is_dir():
        return dataset
    batches = window_rows(window_dir, dataset.X.shape[1:])
    if not batches:
        return dataset
    if dataset.times is not None or dataset.groups is not None:
        raise DataError(
            f"{window_dir}: folded batches have no time or group, so the training window works "
            "with prepare.split random only"
        )
    extra = np.concatenate(batches)
    if np.issubdtype(dataset.ids.dtype, np.number):
        ids = np.arange(len(extra)) + int(dataset.ids.max()) + 1
    else:
        ids = np.array([f"window-{i}" for i in range(len(extra))])
    return replace(
        dataset,
        X=np.concatenate([dataset.X, extra.astype(dataset.X.dtype)]),
        y=None if dataset.y is None else np.r_[dataset.y, np.zeros(len(extra), dataset.y.dtype)],
        ids=np.concatenate([dataset.ids.astype(ids.dtype), ids]),
    )
