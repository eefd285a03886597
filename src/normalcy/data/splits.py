"""Deterministic splits with leakage checks, and their files on disk: stratified train/val/test,
and a holdout that only the promotion decision reads."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from normalcy.config import PrepareParams
from normalcy.data.sources import DataError, Dataset

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "test", "holdout")


@dataclass
class Split:
    """One split: features, optional labels (never shown to a detector that does not use them),
    and the source row ids, which the leakage check compares. Image folders add ground-truth
    `masks` `[n, h, w]` and a defect name per row, for the metrics only (never for `fit`)."""

    X: np.ndarray
    y: np.ndarray | None
    ids: np.ndarray
    masks: np.ndarray | None = None
    defects: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.X)

    @property
    def normal_X(self) -> np.ndarray:
        """Rows known to be normal (all rows when there are no labels)."""
        return self.X if self.y is None else self.X[self.y == 0]

    @property
    def has_both_classes(self) -> bool:
        return self.y is not None and 0 < int(self.y.sum()) < len(self.y)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    holdout: Split
    feature_names: list[str]
    dropped_duplicates: int = 0
    dropped_train_anomalies: int = 0

    def items(self) -> list[tuple[str, Split]]:
        return [(name, getattr(self, name)) for name in SPLIT_NAMES]


def row_hashes(X: np.ndarray) -> np.ndarray:
    """A content hash per row, to find the same row in two places."""
    flat = np.ascontiguousarray(X.reshape(len(X), -1))
    return np.array([hashlib.sha1(row.tobytes()).hexdigest() for row in flat])


def check_no_leakage(splits: Splits) -> None:
    """No id and no identical row may appear in two splits."""
    parts = splits.items()
    for i, (name_a, a) in enumerate(parts):
        for name_b, b in parts[i + 1 :]:
            shared_ids = np.intersect1d(a.ids, b.ids)
            if len(shared_ids):
                raise DataError(
                    f"leakage: ids {shared_ids[:5].tolist()} are in both {name_a} and {name_b}"
                )
            shared_rows = np.intersect1d(row_hashes(a.X), row_hashes(b.X))
            if len(shared_rows):
                raise DataError(
                    f"leakage: {len(shared_rows)} identical row(s) in both {name_a} and {name_b}"
                )


def in_holdout(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each row (by its content hash) belongs to the promotion holdout.

    By hash, not by a seeded draw: a row held out now was held out in every earlier run with
    the same fraction, whatever else the data holds. So the champion, trained on an earlier
    version of the data, never trained on or was chosen with a row that now decides whether
    it stays. At least one row is held out (tiny data sets), the one with the lowest hash."""
    position = np.array([int(h[:8], 16) for h in hashes], dtype=np.float64) / 16**8
    held = position < fraction
    if len(held) and not held.any():  # tiny data: the row nearest to joining, still by hash
        held[np.argmin(position)] = True
    return held


def _split_indices(
    n: int, y: np.ndarray | None, fraction: float, seed: int, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    stratify = (
        y[indices] if y is not None and np.bincount(y[indices], minlength=2).min() >= 2 else None
    )
    return train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)


def _cut_after_ties(sorted_times: np.ndarray, cut: int) -> int:
    """Move a cut forward past rows with the same time, so no time is on both sides."""
    if cut <= 0 or cut >= len(sorted_times):
        return cut
    return int(np.searchsorted(sorted_times, sorted_times[cut - 1], side="right"))


def time_split(
    indices: np.ndarray, times: np.ndarray | None, val_share: float, test_share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test): the past trains, later rows validate, the latest test. Nothing from
    the future of a split's rows leaks into its training data."""
    if times is None:
        raise DataError("prepare.split 'time' needs data.time_column")
    order = indices[np.argsort(times[indices], kind="stable")]
    ordered_times = times[order]
    n = len(order)
    val_start = _cut_after_ties(ordered_times, int(round(n * (1 - val_share - test_share))))
    test_start = _cut_after_ties(ordered_times, max(val_start, int(round(n * (1 - test_share)))))
    parts = order[:val_start], order[val_start:test_start], order[test_start:]
    if any(len(part) == 0 for part in parts):
        raise DataError(
            f"a time split of {n} rows left a split empty (train/val/test "
            f"{[len(part) for part in parts]} rows); expected more distinct times"
        )
    return parts


def group_split(
    indices: np.ndarray,
    groups: np.ndarray | None,
    val_share: float,
    test_share: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) with every group whole in one split: groups in a seeded random order
    fill test, then validation, up to their shares of the rows; the rest train."""
    if groups is None:
        raise DataError("prepare.split 'group' needs data.group_column")
    names, inverse, counts = np.unique(groups[indices], return_inverse=True, return_counts=True)
    if len(names) < 3:
        raise DataError(
            f"a group split needs at least 3 groups (train, val, test); the data has {len(names)}"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    filled = np.cumsum(counts[order]) / len(indices)
    in_test = order[: max(1, int(np.searchsorted(filled, test_share)))]
    rest = order[len(in_test) :]
    filled_val = np.cumsum(counts[rest]) / len(indices)
    in_val = rest[: max(1, int(np.searchsorted(filled_val, val_share)))]
    if len(in_test) + len(in_val) >= len(names):
        raise DataError(
            f"a group split of {len(names)} groups left none to train on; expected more groups "
            "or smaller prepare.val_fraction/test_fraction"
        )
    test_mask, val_mask = np.isin(inverse, in_test), np.isin(inverse, in_val)
    return indices[~test_mask & ~val_mask], indices[val_mask], indices[test_mask]


def split_dataset(dataset: Dataset, params: PrepareParams) -> Splits:
    """Drop duplicate rows, hold out the promotion rows, split the rest (`prepare.split`:
    stratified at random, by time, or by group), cap train contamination, check leakage."""
    hashes = row_hashes(dataset.X)
    _, first = np.unique(hashes, return_index=True)
    unique = np.sort(first)
    y = dataset.y
    if y is not None and int(y[unique].sum()) == len(unique):
        raise DataError(
            f"{dataset.source}: every row is labelled anomalous; expected normal rows to learn from"
        )
    # A group is held out whole (a group split must never straddle two splits).
    keys = hashes[unique] if dataset.groups is None else row_hashes(dataset.groups[unique])
    held = in_holdout(keys, params.holdout_fraction)
    holdout_idx, unique = unique[held], unique[~held]
    remaining = 1 - params.holdout_fraction
    test_share, val_share = params.test_fraction / remaining, params.val_fraction / remaining
    if params.split == "time":
        train_idx, val_idx, test_idx = time_split(unique, dataset.times, val_share, test_share)
    elif params.split == "group":
        train_idx, val_idx, test_idx = group_split(
            unique, dataset.groups, val_share, test_share, params.seed
        )
    else:
        rest, test_idx = _split_indices(len(dataset.X), y, test_share, params.seed, unique)
        rest_share = val_share / (1 - test_share)
        train_idx, val_idx = _split_indices(len(dataset.X), y, rest_share, params.seed, rest)
    dropped_anomalies = 0
    if y is not None and params.train_contamination is not None:
        train_idx, dropped_anomalies = cap_contamination(
            train_idx, y, params.train_contamination, params.seed
        )
    if y is not None and not (y[train_idx] == 0).any():
        raise DataError(
            f"{dataset.source}: the training split has no normal rows; expected mostly normal data"
        )

    def make(idx: np.ndarray) -> Split:
        idx = np.sort(idx)
        return Split(dataset.X[idx], None if y is None else y[idx], dataset.ids[idx])

    splits = Splits(
        make(train_idx),
        make(val_idx),
        make(test_idx),
        make(holdout_idx),
        dataset.feature_names,
        len(dataset.X) - len(unique) - len(holdout_idx),
        dropped_anomalies,
    )
    check_no_leakage(splits)
    log.info(
        "split %s: train %d, val %d, test %d, holdout %d rows (%d duplicates, %d train "
        "anomalies dropped)",
        dataset.source,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        len(splits.holdout),
        splits.dropped_duplicates,
        dropped_anomalies,
    )
    return splits


def cap_contamination(
    train_idx: np.ndarray, y: np.ndarray, cap: float, seed: int
) -> tuple[np.ndarray, int]:
    """Keep at most `cap` anomalies in the training split (a random, seeded subset)."""
    anomalies = train_idx[y[train_idx] == 1]
    normals = train_idx[y[train_idx] == 0]
    allowed = int(np.floor(cap * len(normals) / (1 - cap)))
    if len(anomalies) <= allowed:
        return train_idx, 0
    kept = np.random.default_rng(seed).choice(anomalies, allowed, replace=False)
    return np.concatenate([normals, kept]), len(anomalies) - allowed


def stored_X(split: Split) -> np.ndarray:
    """X as written to disk: images of an image folder (whole numbers 0..255, as decoded) as
    uint8, a quarter of float32 in the prepared data, the DVC cache and the remote."""
    X = split.X
    if split.defects is not None and len(X) and X.min() >= 0 and X.max() <= 255:
        as_bytes = X.astype(np.uint8)
        if np.array_equal(as_bytes, X):
            return as_bytes
    return X


def split_arrays(split: Split) -> dict[str, np.ndarray]:
    """The arrays of a split file: X and ids, and y, masks and defects when present."""
    arrays = {"X": stored_X(split), "ids": split.ids}
    for key in ("y", "masks", "defects"):
        if getattr(split, key) is not None:
            arrays[key] = getattr(split, key)
    return arrays


def load_split(path: Path) -> Split:
    """What `split_arrays` wrote."""
    with np.load(path, allow_pickle=False) as archive:
        optional = {
            k: archive[k] if k in archive.files else None for k in ("y", "masks", "defects")
        }
        X = archive["X"]
        X = X.astype(np.float32) if X.dtype == np.uint8 else X  # see `stored_X`
        return Split(X, optional["y"], archive["ids"], optional["masks"], optional["defects"])


def save_splits(splits: Splits, output_dir: str | Path, meta: dict) -> Path:
    """Write train/val/test .npz and meta.json: the prepared data set that DVC versions."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        np.savez(output_dir / f"{name}.npz", **split_arrays(split))
    (output_dir / "meta.json").write_text(
        json.dumps(
            {
                **meta,
                "feature_names": splits.feature_names,
                "input_shape": list(splits.train.X.shape[1:]),
                "rows": {name: len(split) for name, split in splits.items()},
                "dropped_duplicates": splits.dropped_duplicates,
                "dropped_train_anomalies": splits.dropped_train_anomalies,
            },
            indent=2,
            default=str,
        )
    )
    return output_dir


def load_splits(output_dir: str | Path) -> Splits:
    """Read what `save_splits` wrote (used by the DVC stages)."""
    output_dir = Path(output_dir)
    if not (output_dir / "meta.json").exists():
        raise DataError(
            f"{output_dir}: no prepared data (meta.json missing); run the prepare stage first"
        )
    meta = json.loads((output_dir / "meta.json").read_text())
    parts = {}
    missing = [name for name in SPLIT_NAMES if not (output_dir / f"{name}.npz").exists()]
    if missing:
        raise DataError(
            f"{output_dir}: no {', '.join(missing)} split (prepared by an older normalcy); run "
            "the prepare stage again"
        )
    for name in SPLIT_NAMES:
        parts[name] = load_split(output_dir / f"{name}.npz")
    return Splits(
        parts["train"],
        parts["val"],
        parts["test"],
        parts["holdout"],
        meta["feature_names"],
        meta.get("dropped_duplicates", 0),
        meta.get("dropped_train_anomalies", 0),
    )
