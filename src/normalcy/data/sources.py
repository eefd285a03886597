"""Data sources: sklearn digits (embedded default), npz, csv and parquet (image folders:
`data.mvtec`). Bad input fails here."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from normalcy.config import DataParams


class DataError(ValueError):
    """Unusable input; the message names the file, column or shape and what was expected."""


@dataclass
class Dataset:
    """Features `X` (float32, `[n, d]` or `[n, c, h, w]`), optional 0/1 labels, names, row ids;
    image folders add ground-truth `masks` and a defect name per row (never shown to `fit`)."""

    X: np.ndarray
    y: np.ndarray | None
    feature_names: list[str]
    ids: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: str = ""
    times: np.ndarray | None = None  # float64 per row (dates as seconds), for time splits
    groups: np.ndarray | None = None  # a group id per row, for group splits
    masks: np.ndarray | None = None  # uint8 0/1 [n, h, w] defect pixels (images with masks)
    defects: np.ndarray | None = None  # str per row: "good" or the defect type (image folders)

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = np.arange(len(self.X))

    @property
    def is_image(self) -> bool:
        return self.X.ndim == 4


def check_features(X: np.ndarray, feature_names: list[str], source: str) -> None:
    """Reject empty data, wrong rank and NaN/inf, naming the offending columns."""
    if X.ndim not in (2, 4):
        raise DataError(
            f"{source}: features have shape {X.shape}; "
            "expected [n, d] vectors or [n, c, h, w] images"
        )
    if len(X) == 0:
        raise DataError(f"{source}: no rows; expected at least one")
    bad = ~np.isfinite(X.reshape(len(X), -1))
    if bad.any():
        columns = np.flatnonzero(bad.any(axis=0))
        named = [feature_names[c] for c in columns[:10]]
        raise DataError(
            f"{source}: {int(bad.sum())} NaN/inf values in {len(columns)} feature(s) "
            f"(first: {named}, rows {np.flatnonzero(bad.any(axis=1))[:5].tolist()}); "
            "expected finite numbers: impute or drop them first"
        )


def check_labels(y: np.ndarray, n_rows: int, source: str) -> np.ndarray:
    """Labels must be 0 (normal) / 1 (anomaly), one per row."""
    y = np.asarray(y).ravel()
    if len(y) != n_rows:
        raise DataError(f"{source}: {len(y)} labels for {n_rows} rows; expected one per row")
    if not np.isin(y, (0, 1)).all():
        raise DataError(
            f"{source}: labels {np.unique(y)[:10].tolist()}; expected 0 (normal) / 1 (anomaly)"
        )
    return y.astype(np.int64)


def load_digits_dataset(params: DataParams, seed: int = 0) -> Dataset:
    """One-class digits: `normal_digits` are normal; other digits, subsampled to
    `anomaly_fraction` of the data, are anomalies. Deterministic for the seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    is_anomaly = ~np.isin(digits.target, params.normal_digits)
    normal_idx = np.flatnonzero(~is_anomaly)
    anomaly_idx = np.flatnonzero(is_anomaly)
    n_anomalies = int(
        round(params.anomaly_fraction * len(normal_idx) / (1 - params.anomaly_fraction))
    )
    rng = np.random.default_rng(seed)
    keep = np.sort(
        np.concatenate(
            [normal_idx, rng.choice(anomaly_idx, min(n_anomalies, len(anomaly_idx)), replace=False)]
        )
    )
    X = digits.data[keep].astype(np.float32)
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    if params.as_images:
        X = X.reshape(-1, 1, 8, 8)
    return Dataset(X, is_anomaly[keep].astype(np.int64), names, keep, "sklearn_digits")


def load_npz_dataset(path: Path) -> Dataset:
    """`X` (`[n, d]` or `[n, c, h, w]`) and optional `y`."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # numpy raises several types for a corrupted archive
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    with archive:
        if "X" not in archive.files:
            raise DataError(
                f"{path}: no array 'X' (found {archive.files}); expected X and optional y"
            )
        X = archive["X"]
        y = archive["y"] if "y" in archive.files else None
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{path}: X has dtype {X.dtype}; expected a numeric array")
    names = [f"x{i}" for i in range(int(np.prod(X.shape[1:])))] if X.ndim > 1 else []
    X = X.astype(np.float32)
    check_features(X, names, str(path))
    return Dataset(
        X, None if y is None else check_labels(y, len(X), str(path)), names, source=str(path)
    )


def check_file(path: Path) -> None:
    """The file exists and is not empty."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; expected a header and at least one row")


def table_columns(path: Path, kind: str) -> list[str]:
    """The column names as written in the file, read from the csv header or the parquet
    schema alone. pandas renames a repeated name (`x`, `x.1`), so repeats are refused here."""
    try:
        if kind == "csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                columns = next(csv.reader(handle), [])
        else:
            import pyarrow.parquet as pq

            columns = list(pq.read_schema(path).names)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as {kind} ({exc})") from None
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise DataError(
            f"{path}: column name(s) {repeated} appear more than once; expected unique column "
            "names (rename or drop the repeats)"
        )
    return columns


def read_table(path: Path, kind: str) -> pd.DataFrame:
    """Read csv/parquet, turning pandas' many failure types into one DataError."""
    check_file(path)
    table_columns(path, kind)
    try:
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as {kind} ({exc})") from None
    if frame.empty:
        raise DataError(f"{path}: no rows; expected at least one")
    return frame


def reserved_columns(params: DataParams) -> list[str]:
    """The columns `data` names that are not features."""
    named = (params.label_column, params.id_column, params.time_column, params.group_column)
    return [c for c in named if c is not None]


def time_values(column: pd.Series, source: str) -> np.ndarray:
    """A time column as float64 (numbers as they are, dates as seconds since the epoch)."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(dtype=np.float64)
    else:
        try:
            parsed = pd.to_datetime(column, utc=True)
        except (ValueError, TypeError) as exc:
            raise DataError(
                f"{source}: time column {column.name!r} cannot be read as dates ({exc}); "
                "expected numbers or ISO dates"
            ) from None
        values = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    if not np.isfinite(values).all():
        raise DataError(
            f"{source}: time column {column.name!r} has {int((~np.isfinite(values)).sum())} "
            "missing or non-finite value(s); expected a time for every row"
        )
    return values


def check_named_columns(columns: list[str], params: DataParams, source: str) -> None:
    """The label, id and feature columns named in `data` are in the table."""
    missing = [c for c in reserved_columns(params) if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing} named in data.label_column/id_column/"
            f"time_column/group_column; the file has {columns[:20]}"
        )
    missing = [c for c in params.feature_columns or [] if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing} named in data.feature_columns; "
            f"the file has {columns[:20]}"
        )


def check_source(params: DataParams) -> None:
    """What can be checked without reading the data: the file exists, opens, and (csv/parquet)
    has unique column names including every one `data` names. Run before a flow starts, so
    these mistakes end in one message instead of a failed run."""
    if params.source == "sklearn_digits":
        return
    if params.source == "mvtec":
        from normalcy.data.mvtec import check_folder  # it imports this module

        check_folder(Path(params.path))
        if params.validation_path:
            check_folder(Path(params.validation_path), ("test",))
        return
    path = Path(params.path)
    check_file(path)
    if params.source == "npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                files = list(archive.files)
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
        if "X" not in files:
            raise DataError(f"{path}: no array 'X' (found {files}); expected X and optional y")
        return
    check_named_columns(table_columns(path, params.source), params, str(path))


def table_features(frame: pd.DataFrame, feature_columns: list[str], source: str) -> np.ndarray:
    """Exactly `feature_columns`, numeric; names any missing or non-numeric column."""
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; expected {feature_columns}")
    wrong = {
        c: str(frame[c].dtype)
        for c in feature_columns
        if not pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c])
    }
    if wrong:
        raise DataError(f"{source}: non-numeric column(s) {wrong}; expected int or float columns")
    X = frame[feature_columns].to_numpy(dtype=np.float32)
    check_features(X, feature_columns, source)
    return X


def load_table_dataset(params: DataParams) -> Dataset:
    """csv/parquet with named feature, label and id columns."""
    path = Path(params.path)
    frame = read_table(path, params.source)
    reserved = set(reserved_columns(params))
    check_named_columns(list(frame.columns), params, str(path))
    feature_columns = params.feature_columns or [c for c in frame.columns if c not in reserved]
    extra = sorted(set(frame.columns) - set(feature_columns) - reserved)
    if params.feature_columns and extra:
        raise DataError(
            f"{path}: unexpected column(s) {extra}; expected only {feature_columns} "
            "plus the label/id/time/group columns (list them in data.feature_columns or drop "
            "them)"
        )
    X = table_features(frame, feature_columns, str(path))
    y = (
        check_labels(frame[params.label_column].to_numpy(), len(X), str(path))
        if params.label_column
        else None
    )
    ids = None
    if params.id_column:
        ids = frame[params.id_column].to_numpy()
        if ids.dtype == object or not np.issubdtype(ids.dtype, np.number):
            ids = ids.astype(str)  # fixed-width strings: saved and loaded without pickle
        if len(np.unique(ids)) != len(ids):
            raise DataError(f"{path}: id column {params.id_column!r} has duplicate ids")
    times = time_values(frame[params.time_column], str(path)) if params.time_column else None
    groups = None
    if params.group_column:
        if frame[params.group_column].isna().any():
            raise DataError(
                f"{path}: group column {params.group_column!r} has missing values; expected a "
                "group for every row"
            )
        groups = frame[params.group_column].astype(str).to_numpy().astype(str)
    return Dataset(X, y, list(feature_columns), ids, str(path), times, groups)


def load_dataset(params: DataParams) -> Dataset:
    """The configured source, checked: finite, non-empty, well-shaped, 0/1 labels."""
    if params.source == "sklearn_digits":
        return load_digits_dataset(params)
    if params.source == "npz":
        return load_npz_dataset(Path(params.path))
    return load_table_dataset(params)


def check_batch_file(path: str | Path) -> str:
    """A batch file exists, is npz/csv/parquet and (a table) has unique column names; its
    suffix. What can be checked before a monitor or recalibrate run starts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; expected .npz, .csv or .parquet"
        )
    check_file(path)
    if suffix != ".npz":
        table_columns(path, suffix.lstrip("."))
    return suffix


def load_batch(path: str | Path, feature_names: list[str], input_shape: list[int]) -> np.ndarray:
    """A new batch for scoring or monitoring, checked against the model's input: the same
    columns (csv/parquet) or the same trailing shape (npz), finite values."""
    path = Path(path)
    suffix = check_batch_file(path)
    if suffix == ".npz":
        X = load_npz_dataset(path).X
        if list(X.shape[1:]) != list(input_shape):
            raise DataError(
                f"{path}: rows have shape {list(X.shape[1:])}; "
                f"the model expects {list(input_shape)}"
            )
        return X
    frame = read_table(path, suffix.lstrip("."))
    missing = [c for c in feature_names if c not in frame.columns]
    extra = [c for c in frame.columns if c not in feature_names]
    if missing or extra:
        raise DataError(
            f"{path}: columns differ from the model's: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {extra[:10]}; "
            f"expected the {len(feature_names)} columns {feature_names[:5]}..."
        )
    X = table_features(frame, feature_names, str(path))
    return X.reshape(len(X), *input_shape)
