"""Serving-side scoring of an exported model: numpy, pandas/pyarrow and onnxruntime only.

Deliberately free of torch (and of the rest of normalcy) so a scoring container or a batch job
needs nothing but the .onnx file and onnxruntime. MLflow is imported only inside
`resolve_model` / `alias_version`, for `models:/NAME@ALIAS` sources (MLflow does not need torch).

Layers, each usable alone:
- sessions: `load_session` with deliberate `SessionSettings` (threads, execution mode, graph
  optimization level);
- outputs: `score_outputs` (every graph output by name, in chunks) and `score_onnx`
  ((score, is_anomaly), what the parity check uses);
- input checks: `input_spec` reads what the model expects from its metadata and graph, and
  `check_rows` refuses rows that do not match, naming the column or field;
- files: `open_input` reads csv / parquet / npz / an image folder in bounded chunks, and
  `score_file` scores it into a csv or parquet file written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from normalcy.atomic import atomic_path

METADATA_KEY = "normalcy"
SCORE_NAME = "score"
DECISION_NAME = "is_anomaly"
P_VALUE_NAME = "p_value"
ANOMALY_MAP_NAME = "anomaly_map"
# Per-row outputs written to tables and returned by the service, in this order when present.
ROW_OUTPUTS = (SCORE_NAME, DECISION_NAME, P_VALUE_NAME)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")
# A chunk never holds more than this many bytes of model input, whatever chunk_rows says, so
# that large images (c*h*w floats a row) keep memory bounded too.
MAX_CHUNK_BYTES = 256 * 2**20
ROW_ID = "row"  # id column of the output when the input has none: the 0-based row number
FILE_ID = "file"  # id column for an image folder: the file's path relative to the folder

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXECUTION_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class InputError(ValueError):
    """Input the model cannot take; the message names the file, column or field and what the
    model expects."""


class ModelSourceError(ValueError):
    """A model path or registry URI that does not lead to a loadable model."""


# --- sessions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime session options, chosen on purpose rather than left to the defaults.

    `intra_op_threads` (None: onnxruntime's default, one per physical core) parallelises inside
    an operator (the GEMMs); `inter_op_threads` runs independent operators at once and matters
    only with `execution_mode="parallel"`, which rarely helps these chain-shaped graphs. Cap
    `intra_op_threads` when several workers share a machine.
    """

    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    execution_mode: str = "sequential"
    graph_optimization: str = "all"

    def options(self) -> ort.SessionOptions:
        """The `ort.SessionOptions` these settings describe; a wrong value names the choices."""
        for name, value, choices in (
            ("execution_mode", self.execution_mode, _EXECUTION_MODES),
            ("graph_optimization", self.graph_optimization, _OPTIMIZATION_LEVELS),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: expected one of {sorted(choices)}")
        for name, value in (
            ("intra_op_threads", self.intra_op_threads),
            ("inter_op_threads", self.inter_op_threads),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null for the default), got {value}")
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        options.execution_mode = _EXECUTION_MODES[self.execution_mode]
        options.intra_op_num_threads = self.intra_op_threads or 0  # 0: onnxruntime decides
        options.inter_op_num_threads = self.inter_op_threads
        return options


def load_session(
    path: str | Path,
    intra_op_threads: int | None = None,
    settings: SessionSettings | None = None,
) -> ort.InferenceSession:
    """CPU session for the model file, with `settings` (default: all graph optimizations,
    sequential execution); `intra_op_threads`, when given, overrides the settings' value."""
    settings = settings or SessionSettings()
    if intra_op_threads is not None:
        settings = replace(settings, intra_op_threads=intra_op_threads)
    options = settings.options()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file; expected an .onnx file")
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own types for a corrupted or foreign file
        raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from None


def _session(session_or_path: ort.InferenceSession | str | Path) -> ort.InferenceSession:
    if isinstance(session_or_path, ort.InferenceSession):
        return session_or_path
    return load_session(session_or_path)


def read_metadata(path_or_session: ort.InferenceSession | str | Path) -> dict[str, Any]:
    """The 'normalcy' JSON metadata stored at export (threshold, feature names, ...); {} if none."""
    meta = _session(path_or_session).get_modelmeta().custom_metadata_map
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file, hex; identifies a model file when it has no registry version."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- what the model expects -------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One row as the model takes it: `shape` without the batch dimension, e.g. (64,) or
    (1, 8, 8); `feature_names` in column order for table models (empty for images or when the
    metadata has none); `id_column` is the data's row-id column when the metadata names one."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    feature_names: tuple[str, ...] = ()
    id_column: str | None = None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def row_size(self) -> int:
        return int(np.prod(self.shape))

    def describe(self) -> str:
        """E.g. `float32 [N, 64] (features x0, x1, ...)`, for error messages."""
        text = f"{self.dtype} [N, {', '.join(map(str, self.shape))}]"
        if self.feature_names:
            text += f", features {_preview(self.feature_names)}"
        elif self.is_image:
            channels, height, width = self.shape
            text += f", {channels}-channel {height}x{width} images"
        return text

    def position(self, flat_index: int) -> str:
        """A human name for one value of a row: its feature name, or its index in the shape."""
        if self.feature_names:
            return repr(self.feature_names[flat_index])
        return f"position {[int(i) for i in np.unravel_index(flat_index, self.shape)]}"


def _preview(names: tuple[str, ...] | list[str], n: int = 8) -> str:
    shown = ", ".join(repr(str(name)) for name in list(names)[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}], {len(names)} in all"


def input_spec(session: ort.InferenceSession, metadata: dict | None = None) -> InputSpec:
    """What one input row must look like: the graph's static trailing shape and element type,
    with feature names and the id column from the 'normalcy' metadata."""
    metadata = read_metadata(session) if metadata is None else metadata
    graph_input = session.get_inputs()[0]
    declared = (metadata.get("input") or {}).get("shape") or []
    shape = []
    for i, dim in enumerate(graph_input.shape[1:], start=1):
        if isinstance(dim, int):
            shape.append(dim)
        elif i < len(declared) and isinstance(declared[i], int):
            shape.append(declared[i])
        else:
            raise ModelSourceError(
                f"the model's input '{graph_input.name}' has an unknown size in dimension {i} "
                f"({graph_input.shape}); normalcy scores graphs whose only dynamic dimension is "
                "the batch"
            )
    names = tuple((metadata.get("input") or {}).get("feature_names") or ())
    if names and len(names) != int(np.prod(shape)):
        raise ModelSourceError(
            f"the model's metadata lists {len(names)} feature names for an input of shape "
            f"{shape}; the model file is inconsistent"
        )
    id_column = (metadata.get("input") or {}).get("id_column") or metadata.get("id_column")
    return InputSpec(
        name=graph_input.name,
        shape=tuple(shape),
        dtype=np.dtype(_ORT_DTYPES.get(graph_input.type, np.float32)),
        feature_names=names,
        id_column=id_column,
    )


def check_rows(X: np.ndarray, spec: InputSpec, source: str, first_row: int = 0) -> np.ndarray:
    """`X` as the model's dtype, C-contiguous, after refusing a wrong row shape, non-numeric
    values and NaN/inf; messages name the source, the feature (or pixel position) and the row
    number (`first_row` + the index in `X`)."""
    X = np.asarray(X)
    if tuple(X.shape[1:]) != spec.shape or X.ndim != len(spec.shape) + 1:
        raise InputError(
            f"{source}: rows have shape {list(X.shape[1:])}; the model expects {spec.describe()}"
        )
    if X.dtype.kind not in "iuf":
        raise InputError(
            f"{source}: values have dtype {X.dtype}; expected numbers ({spec.dtype}), not "
            f"{'booleans' if X.dtype.kind == 'b' else 'text or objects'}"
        )
    X = np.ascontiguousarray(X, dtype=spec.dtype)
    flat = X.reshape(len(X), -1)
    bad = ~np.isfinite(flat)
    if bad.any():
        rows, columns = np.nonzero(bad)
        value = flat[rows[0], columns[0]]
        what = "NaN (a missing value)" if np.isnan(value) else f"{value} (out of float range)"
        raise InputError(
            f"{source}: {what} in {spec.position(int(columns[0]))} at row "
            f"{first_row + int(rows[0])} ({int(bad.sum())} non-finite values in this chunk); "
            "expected finite numbers: impute or drop them first"
        )
    return X


def _check_shape(session: ort.InferenceSession, X: np.ndarray) -> None:
    """Fail with a readable message instead of onnxruntime's terse shape error."""
    expected = session.get_inputs()[0].shape  # e.g. ['batch', 64]; str/None where dynamic
    got = X.shape
    static_mismatch = any(
        isinstance(want, int) and want != have
        for want, have in zip(expected[1:], got[1:], strict=False)
    )
    if len(expected) != len(got) or static_mismatch:
        shown = ["N" if not isinstance(d, int) else d for d in expected]
        raise ValueError(
            f"input shape mismatch: model expects [{', '.join(map(str, shown))}], got {list(got)}"
        )


# --- running the graph ------------------------------------------------------------------------


def onnx_type_name(ort_type: str) -> str:
    """numpy's name for an onnxruntime type string: 'tensor(float)' -> 'float32'."""
    dtype = _ORT_DTYPES.get(ort_type)
    return np.dtype(dtype).name if dtype is not None else ort_type


def output_names(session: ort.InferenceSession) -> list[str]:
    """The graph's outputs in graph order, e.g. ['score', 'is_anomaly', 'p_value']."""
    return [o.name for o in session.get_outputs()]


def _empty_output(session: ort.InferenceSession, name: str) -> np.ndarray:
    meta = next(o for o in session.get_outputs() if o.name == name)
    trailing = [d if isinstance(d, int) else 0 for d in meta.shape[1:]]
    return np.zeros((0, *trailing), dtype=_ORT_DTYPES.get(meta.type, np.float32))


def score_outputs(
    session_or_path: ort.InferenceSession | str | Path,
    X: np.ndarray,
    chunk_rows: int = 4096,
    names: list[str] | tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Every graph output (or only `names`) for rows `X`, by name, run `chunk_rows` rows at a
    time to bound memory: `score` float32 `[N]`, `is_anomaly` bool `[N]`, and `p_value`
    float32 `[N]` / `anomaly_map` `[N, H, W]` when the graph has them.

    Checks only the shape; call `check_rows` first for the full input check (NaN, dtype)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    session = _session(session_or_path)
    available = output_names(session)
    names = list(available if names is None else names)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"the model has no output(s) {unknown}; it has {available}")
    graph_input = session.get_inputs()[0]
    X = np.ascontiguousarray(X, dtype=_ORT_DTYPES.get(graph_input.type, np.float32))
    _check_shape(session, X)
    input_name = graph_input.name
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(X), chunk_rows):
        chunk = X[start : start + chunk_rows]
        for name, value in zip(names, session.run(names, {input_name: chunk}), strict=True):
            value = np.asarray(value)
            parts[name].append(value.reshape(len(chunk)) if name in ROW_OUTPUTS else value)
    return {
        name: np.concatenate(chunks) if chunks else _empty_output(session, name)
        for name, chunks in parts.items()
    }


def score_onnx(
    session_or_path: ort.InferenceSession | str | Path,
    X: np.ndarray,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """(score float32 `[N]`, is_anomaly bool `[N]`) for raw rows `X`, in batches of
    `batch_size` to bound memory. Pass a session to reuse it across calls."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = score_outputs(session_or_path, X, batch_size, [SCORE_NAME, DECISION_NAME])
    return np.asarray(out[SCORE_NAME], dtype=np.float32), np.asarray(out[DECISION_NAME], dtype=bool)


# --- reading input files in chunks ------------------------------------------------------------


@dataclass
class ScoringInput:
    """An opened, header-checked input: `chunks` yields (ids, rows) with rows already checked
    by `check_rows`; `total_rows` is None when it is unknown before reading (csv)."""

    source: str
    id_name: str
    total_rows: int | None
    chunks: Iterator[tuple[np.ndarray, np.ndarray]]
    notes: list[str] = field(default_factory=list)


def chunk_rows_for(spec: InputSpec, chunk_rows: int) -> int:
    """`chunk_rows`, lowered so a chunk of input stays under MAX_CHUNK_BYTES."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    row_bytes = spec.row_size * spec.dtype.itemsize
    return max(1, min(chunk_rows, MAX_CHUNK_BYTES // max(row_bytes, 1)))


def open_input(path: str | Path, spec: InputSpec, chunk_rows: int = 65536) -> ScoringInput:
    """Open a csv, parquet or npz file, or an image folder, and check what can be checked
    before reading rows (columns and their types, array shape and dtype, image sizes), so a
    wrong file fails before any work is done."""
    path = Path(path)
    rows = chunk_rows_for(spec, chunk_rows)
    if path.is_dir():
        return _open_image_folder(path, spec, rows)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    openers = {".csv": _open_csv, ".parquet": _open_parquet, ".pq": _open_parquet}
    if suffix in openers and spec.is_image:
        raise InputError(
            f"{path}: a table cannot feed an image model ({spec.describe()}); "
            "pass an .npz with X of that shape, or a folder of images"
        )
    opener = {**openers, ".npz": _open_npz}.get(suffix)
    if opener is None:
        raise InputError(
            f"{path}: unsupported input {suffix!r}; expected .csv, .parquet, .npz"
            + (" or a folder of PNG/JPG images" if spec.is_image else "")
        )
    return opener(path, spec, rows)


def _table_columns(
    path: Path, columns: list[str], spec: InputSpec
) -> tuple[list[str], str | None, list[str]]:
    """(feature columns in the model's order, id column or None, notes) for a table's header."""
    notes = []
    id_column = spec.id_column if spec.id_column in columns else None
    if spec.id_column and id_column is None:
        notes.append(
            f"the model's id column {spec.id_column!r} is not in {path.name}; rows are "
            f"identified by their 0-based number ({ROW_ID!r})"
        )
    if spec.feature_names:
        features = list(spec.feature_names)
        missing = [c for c in features if c not in columns]
        if missing:
            raise InputError(
                f"{path}: missing column(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                f"; the model expects the columns {_preview(features)} (in any order)"
            )
    else:  # no names in the metadata: every column but the id, in file order
        features = [c for c in columns if c != id_column]
        if len(features) != spec.row_size:
            raise InputError(
                f"{path}: {len(features)} feature column(s) {_preview(features)}; the model "
                f"expects {spec.row_size} (its metadata names none, so every column but the id "
                "column is a feature, in file order)"
            )
    ignored = [c for c in columns if c not in features and c != id_column]
    if ignored:
        notes.append(f"column(s) not used by the model are ignored: {ignored[:10]}")
    return features, id_column, notes


def _numeric_block(
    frame: pd.DataFrame, features: list[str], source: str, first_row: int
) -> np.ndarray:
    """The feature columns as one array; a non-numeric column is named with its first bad value."""
    dtypes = frame.dtypes
    for column in features:
        dtype = dtypes[column]
        if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            series = frame[column]
            numeric = pd.to_numeric(series, errors="coerce")
            bad = np.flatnonzero(numeric.isna().to_numpy() & series.notna().to_numpy())
            where = (
                f"value {series.iloc[bad[0]]!r} at row {first_row + int(bad[0])}"
                if len(bad)
                else f"dtype {dtype}"
            )
            raise InputError(
                f"{source}: column {column!r} is not numeric ({where}); the model expects "
                "int or float values in every feature column"
            )
    return frame[features].to_numpy(dtype=np.float64)


def _open_csv(path: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; expected a header and at least one row")
    try:
        head = pd.read_csv(path, nrows=1)
    except Exception as exc:  # pandas raises several types for a malformed file
        raise InputError(f"{path}: cannot be read as csv ({exc})") from None
    if head.empty:
        raise InputError(f"{path}: no rows; expected a header and at least one row")
    header = list(head.columns)
    features, id_column, notes = _table_columns(path, header, spec)
    usecols = features + ([id_column] if id_column else [])

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        # Ids are read as text: a file's ids come back exactly as written (leading zeros too).
        reader = pd.read_csv(
            path,
            usecols=usecols,
            chunksize=chunk_rows,
            dtype={id_column: str} if id_column else None,
        )
        try:
            for frame in reader:
                X = _numeric_block(frame, features, str(path), start)
                ids = (
                    frame[id_column].to_numpy()
                    if id_column
                    else np.arange(start, start + len(frame))
                )
                yield ids, check_rows(X.reshape(len(X), *spec.shape), spec, str(path), start)
                start += len(frame)
        except pd.errors.ParserError as exc:
            raise InputError(f"{path}: malformed csv after row {start} ({exc})") from None
        finally:
            reader.close()

    return ScoringInput(str(path), id_column or ROW_ID, None, chunks(), notes)


def _open_parquet(path: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupted file
        raise InputError(f"{path}: cannot be read as parquet ({exc})") from None
    schema = parquet.schema_arrow
    features, id_column, notes = _table_columns(path, list(schema.names), spec)
    wrong = {
        c: str(schema.field(c).type)
        for c in features
        if not (
            pa.types.is_integer(schema.field(c).type) or pa.types.is_floating(schema.field(c).type)
        )
    }
    if wrong:
        raise InputError(
            f"{path}: non-numeric column(s) {wrong}; the model expects int or float columns"
        )
    total = parquet.metadata.num_rows
    if total == 0:
        raise InputError(f"{path}: no rows; expected at least one")
    usecols = features + ([id_column] if id_column else [])

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        start = 0
        try:
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=usecols):
                # zero_copy_only=False: nulls become NaN, which check_rows then names.
                X = np.column_stack(
                    [
                        batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                        for c in features
                    ]
                )
                ids = (
                    batch.column(id_column).to_numpy(zero_copy_only=False)
                    if id_column
                    else np.arange(start, start + batch.num_rows)
                )
                yield ids, check_rows(X.reshape(len(X), *spec.shape), spec, str(path), start)
                start += batch.num_rows
        finally:
            parquet.close()

    return ScoringInput(str(path), id_column or ROW_ID, total, chunks(), notes)


def _open_npz(path: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    """`X` is read from the archive as a stream, `chunk_rows` rows at a time, never whole
    (except a Fortran-ordered X, whose rows are not contiguous)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a readable .npz archive ({exc})") from None
    members = [name.removesuffix(".npy") for name in archive.namelist()]
    if "X" not in members:
        archive.close()
        raise InputError(f"{path}: no array 'X' (found {members}); expected X [n, ...]")
    stream = archive.open("X.npy")
    try:
        version = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(stream)
    except Exception as exc:
        archive.close()
        raise InputError(f"{path}: X is not a readable numpy array ({exc})") from None
    problem = None
    if dtype.kind not in "iuf" or dtype.hasobject:
        problem = f"X has dtype {dtype}; the model expects numbers ({spec.dtype})"
    elif len(shape) < 1 or tuple(shape[1:]) != spec.shape:
        problem = f"X has shape {list(shape)}; the model expects {spec.describe()}"
    elif shape[0] == 0:
        problem = "X has no rows; expected at least one"
    if problem:
        archive.close()
        raise InputError(f"{path}: {problem}")
    n_rows = int(shape[0])
    row_bytes = spec.row_size * dtype.itemsize

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            if fortran_order and len(shape) > 1:
                X_all = np.load(path, allow_pickle=False)["X"]
            for start in range(0, n_rows, chunk_rows):
                n = min(chunk_rows, n_rows - start)
                if fortran_order and len(shape) > 1:
                    X = X_all[start : start + n]
                else:
                    buffer = stream.read(n * row_bytes)
                    if len(buffer) != n * row_bytes:
                        raise InputError(f"{path}: X is truncated at row {start}")
                    X = np.frombuffer(buffer, dtype=dtype).reshape(n, *spec.shape)
                yield np.arange(start, start + n), check_rows(X, spec, str(path), start)
        finally:
            stream.close()
            archive.close()

    return ScoringInput(str(path), ROW_ID, n_rows, chunks())


_IMAGE_MODES = {1: ("L", "I", "I;16", "F"), 3: ("RGB",)}


def _open_image_folder(folder: Path, spec: InputSpec, chunk_rows: int) -> ScoringInput:
    """Every PNG/JPG under `folder` (sorted by relative path), as raw pixel values in float32.
    Sizes and colour modes are checked from the file headers before any pixel is decoded:
    images are never resized, since that would silently change what the model sees."""
    from PIL import Image, UnidentifiedImageError

    if not spec.is_image:
        raise InputError(
            f"{folder}: a folder of images cannot feed a table model ({spec.describe()}); "
            "pass a .csv, .parquet or .npz file"
        )
    channels, height, width = spec.shape
    if channels not in _IMAGE_MODES:
        raise InputError(
            f"{folder}: the model takes {channels}-channel images, which PNG/JPG files do not "
            "hold; pass an .npz with X of shape [n, "
            f"{channels}, {height}, {width}]"
        )
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise InputError(f"{folder}: no .png/.jpg/.jpeg images found (searched sub-folders too)")
    modes = _IMAGE_MODES[channels]
    for file in files:
        try:
            with Image.open(file) as image:
                size, mode = image.size, image.mode
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{file}: not a readable image ({exc})") from None
        if size != (width, height):
            raise InputError(
                f"{file}: image is {size[1]}x{size[0]} (HxW); the model expects {height}x{width}. "
                "normalcy does not resize: resize the images the way the training images were"
            )
        if mode not in modes:
            raise InputError(
                f"{file}: colour mode {mode}; the model expects {channels}-channel images "
                f"(mode {' or '.join(modes)})"
            )

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(files), chunk_rows):
            batch = files[start : start + chunk_rows]
            X = np.empty((len(batch), channels, height, width), dtype=np.float32)
            for i, file in enumerate(batch):
                with Image.open(file) as image:
                    pixels = np.asarray(image, dtype=np.float32)
                X[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            ids = np.asarray([f.relative_to(folder).as_posix() for f in batch])
            yield ids, check_rows(X, spec, str(folder), start)

    return ScoringInput(str(folder), FILE_ID, len(files), chunks())


# --- writing results --------------------------------------------------------------------------


def check_output_path(path: str | Path) -> Path:
    """The output file, if its extension says csv or parquet; fails before any work otherwise."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_OUTPUT_SUFFIXES:
        raise InputError(
            f"{path}: unsupported output {path.suffix!r}; expected a .csv or .parquet file name"
        )
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file name ending in .csv or .parquet")
    return path


class _TableWriter:
    """Appends frames to one csv or parquet file (the first frame fixes the columns)."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        self._csv: Any = None
        self._parquet: Any = None

    def write(self, frame: pd.DataFrame) -> None:
        if self.kind == ".csv":
            header = self._csv is None
            if header:
                self._csv = open(self.path, "w", newline="")  # closed in close()
            frame.to_csv(self._csv, header=header, index=False)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table.cast(self._parquet.schema))

    def close(self) -> None:
        for handle in (self._csv, self._parquet):
            if handle is not None:
                handle.close()


@contextlib.contextmanager
def _table_writer(path: Path) -> Iterator[Callable[[pd.DataFrame], None]]:
    """A function that appends frames to `path` (csv or parquet by extension), atomically."""
    with atomic_path(path) as tmp:
        writer = _TableWriter(tmp, ".csv" if path.suffix.lower() == ".csv" else ".parquet")
        try:
            yield writer.write
        finally:
            writer.close()


@dataclass
class ScoreFileResult:
    """What `score_file` wrote: rows, anomalies, the output file and its columns."""

    n_rows: int
    n_anomalies: int
    output: Path
    columns: list[str]
    notes: list[str]


def score_file(
    session: ort.InferenceSession,
    input_path: str | Path,
    output_path: str | Path,
    chunk_rows: int = 65536,
    progress: bool = True,
) -> ScoreFileResult:
    """Score a csv/parquet/npz file or an image folder into a csv/parquet file (by extension):
    the id column (the model's id column when the data has it, else the row number, or the file
    path for images), then score, is_anomaly and p_value (when the graph has it).

    Input is read, scored and written `chunk_rows` rows at a time, so memory stays bounded;
    the output appears only when every row is scored (temp file + rename), so a bad row late in
    a big file leaves no half-written output behind."""
    from tqdm import tqdm

    output = check_output_path(output_path)
    metadata = read_metadata(session)
    spec = input_spec(session, metadata)
    opened = open_input(input_path, spec, chunk_rows)
    names = [name for name in ROW_OUTPUTS if name in output_names(session)]
    if ANOMALY_MAP_NAME in output_names(session):
        opened.notes.append(
            f"'{ANOMALY_MAP_NAME}' is not written to tables; get it from score_outputs() or "
            'from normalcy serve with "anomaly_map": true'
        )
    n_rows = n_anomalies = 0
    bar = tqdm(
        total=opened.total_rows,
        unit="rows",
        desc="scoring",
        file=sys.stderr,
        disable=None if progress else True,  # None: only on a terminal
    )
    with bar, _table_writer(output) as write:
        for ids, X in opened.chunks:
            outputs = score_outputs(session, X, chunk_rows=len(X), names=names)
            write(pd.DataFrame({opened.id_name: ids, **outputs}))
            n_rows += len(X)
            n_anomalies += int(outputs[DECISION_NAME].sum())
            bar.update(len(X))
    return ScoreFileResult(n_rows, n_anomalies, output, [opened.id_name, *names], opened.notes)


# --- model sources: a file, or a registry version / alias -------------------------------------

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`, parsed."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}")


def parse_model_source(source: str | Path) -> ModelRef | Path:
    """A registry reference for `models:/...`, else a local path."""
    text = str(source)
    if not text.startswith("models:/"):
        return Path(text)
    match = _REGISTRY_URI.match(text)
    if match is None:
        raise ModelSourceError(
            f"{text}: not a registry model URI; expected models:/NAME@ALIAS (e.g. "
            "models:/normalcy@champion) or models:/NAME/VERSION"
        )
    return ModelRef(match["name"], match["alias"], match["version"])


def _mlflow_client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def alias_version(ref: ModelRef, tracking_uri: str | None = None) -> str:
    """The version a registry reference points at now (the alias is looked up; a version is
    itself). Imports MLflow lazily: plain-file scoring never needs it."""
    if ref.alias is None:
        return str(ref.version)
    from mlflow.exceptions import MlflowException

    try:
        return str(
            _mlflow_client(tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version
        )
    except MlflowException as exc:
        raise ModelSourceError(
            f"{ref.uri}: cannot resolve alias {ref.alias!r} of registered model {ref.name!r} "
            f"in the MLflow store {tracking_uri or '(MLflow default)'} ({exc.message}); "
            "check the name, the alias and --tracking-uri"
        ) from None


@dataclass(frozen=True)
class ResolvedModel:
    """A model file on local disk, with its registry version when it came from the registry."""

    path: Path
    source: str
    version: str | None = None


def resolve_model(
    source: str | Path, dst_dir: str | Path, tracking_uri: str | None = None
) -> ResolvedModel:
    """A local .onnx path as it is, or a registry model (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`) downloaded under `dst_dir/v<version>/`."""
    ref = parse_model_source(source)
    if isinstance(ref, Path):
        if not ref.is_file():
            raise ModelSourceError(
                f"{ref}: no such model file; expected an .onnx file or models:/NAME@ALIAS"
            )
        return ResolvedModel(ref, str(source))
    version = alias_version(ref, tracking_uri)
    return ResolvedModel(
        download_version(ref.name, version, dst_dir, tracking_uri), ref.uri, version
    )


def download_version(
    name: str, version: str, dst_dir: str | Path, tracking_uri: str | None = None
) -> Path:
    """Download registered model `name` version `version` into `dst_dir/v<version>/` and return
    its .onnx file (the one the MLmodel's onnx flavor names)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    dst = Path(dst_dir) / f"v{version}"
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}",
                dst_path=str(dst),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
    except MlflowException as exc:
        raise ModelSourceError(
            f"models:/{name}/{version}: cannot download it from {tracking_uri} ({exc.message})"
        ) from None
    flavor = {}
    if (local / "MLmodel").is_file():
        flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors.get("onnx", {})
    onnx_file = local / flavor["data"] if "data" in flavor else None
    if onnx_file is None or not onnx_file.is_file():
        found = sorted(local.rglob("*.onnx"))
        if not found:
            raise ModelSourceError(f"models:/{name}/{version}: no .onnx file in it ({local})")
        onnx_file = found[0]
    return onnx_file
