"""onnxruntime sessions over an exported model, and running them: every output, by name.

`load_session` builds a CPU session with deliberate `SessionSettings`; `score_outputs` runs the
graph in chunks and returns every output (or the ones asked for) by name, whatever they are;
`score_onnx` is the (score, is_anomaly) pair the parity check uses."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from normalcy.artifact.names import (
    ANOMALY_MAP_NAME,
    DECISION_NAME,
    EMBEDDING_NAME,
    METADATA_KEY,
    ROW_OUTPUTS,
    SCORE_NAME,
)
from normalcy.threads import scoring_threads

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
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime session options, chosen on purpose rather than left to the defaults.

    `intra_op_threads` parallelises inside an operator (the GEMMs); None applies the rule of
    `normalcy.threads`: every CPU this process may use (affinity and cgroup quota), where
    onnxruntime's own default counts the machine's cores and oversubscribes a container.
    `inter_op_threads` runs independent operators at once and matters only with
    `execution_mode="parallel"`, which rarely helps these chain-shaped graphs. Cap
    `intra_op_threads` when several workers share a machine.
    `allow_spinning` lets idle intra-op threads busy-wait for the next operator (onnxruntime's
    default). Off here: on a shared or small machine the spinning threads take CPU from the
    thread doing the work (the 448 px padim graph, 48 images on 2 busy cores: 3.3-4.1 s
    without spinning, 5.6-5.7 s with it); turn it on for the last microseconds of latency on
    dedicated cores.
    """

    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    execution_mode: str = "sequential"
    graph_optimization: str = "all"
    allow_spinning: bool = False

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
                raise ValueError(f"{name} must be >= 1 (or null for automatic), got {value}")
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        options.execution_mode = _EXECUTION_MODES[self.execution_mode]
        options.intra_op_num_threads = scoring_threads(self.intra_op_threads)
        options.inter_op_num_threads = self.inter_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
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


def as_session(session_or_path: ort.InferenceSession | str | Path) -> ort.InferenceSession:
    """The session itself, or a default session for a model file."""
    if isinstance(session_or_path, ort.InferenceSession):
        return session_or_path
    return load_session(session_or_path)


def read_metadata(path_or_session: ort.InferenceSession | str | Path) -> dict[str, Any]:
    """The 'normalcy' JSON metadata stored at export (threshold, feature names, ...); {} if none."""
    meta = as_session(path_or_session).get_modelmeta().custom_metadata_map
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file, hex; identifies a model file when it has no registry version."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_type_name(ort_type: str) -> str:
    """numpy's name for an onnxruntime type string: 'tensor(float)' -> 'float32'."""
    dtype = ORT_DTYPES.get(ort_type)
    return np.dtype(dtype).name if dtype is not None else ort_type


def output_names(session: ort.InferenceSession) -> list[str]:
    """The graph's outputs in graph order, e.g. ['score', 'is_anomaly', 'p_value']."""
    return [o.name for o in session.get_outputs()]


def per_row_outputs(available: list[str] | tuple[str, ...]) -> list[str]:
    """The outputs a table row or a JSON response carries by default: score, is_anomaly and
    p_value first (those present), then every other output (named explanations) in graph
    order. `anomaly_map` (an image per row) and an image model's `embedding` (what drift
    compares) are left out: they are asked for by name."""
    first = [name for name in ROW_OUTPUTS if name in available]
    asked_for = (*ROW_OUTPUTS, ANOMALY_MAP_NAME, EMBEDDING_NAME)
    rest = [name for name in available if name not in asked_for]
    return first + rest


@dataclass(frozen=True)
class GraphIO:
    """A session's (first) input and its outputs, as `score_outputs` needs them."""

    input_name: str
    input_dtype: type
    input_shape: tuple  # e.g. ('batch', 64): str/None where dynamic
    outputs: tuple[str, ...]


_GRAPH_IO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_io(session: ort.InferenceSession) -> GraphIO:
    """The session's input and outputs, read once per session: onnxruntime builds new Python
    objects for them at every call, which costs more than scoring one row does."""
    known = _GRAPH_IO.get(session)
    if known is None:
        graph_input = session.get_inputs()[0]
        known = GraphIO(
            input_name=graph_input.name,
            input_dtype=ORT_DTYPES.get(graph_input.type, np.float32),
            input_shape=tuple(graph_input.shape),
            outputs=tuple(output_names(session)),
        )
        _GRAPH_IO[session] = known
    return known


def _check_batch_shape(expected: tuple, X: np.ndarray) -> None:
    """Fail with a readable message instead of onnxruntime's terse shape error."""
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


def _empty_output(session: ort.InferenceSession, name: str) -> np.ndarray:
    meta = next(o for o in session.get_outputs() if o.name == name)
    trailing = [d if isinstance(d, int) else 0 for d in meta.shape[1:]]
    if name in ROW_OUTPUTS:
        trailing = []
    return np.zeros((0, *trailing), dtype=ORT_DTYPES.get(meta.type, np.float32))


def _per_row(name: str, value: np.ndarray, n_rows: int) -> np.ndarray:
    """One chunk's output with its rows first; score/is_anomaly/p_value become `[N]`."""
    if name in ROW_OUTPUTS:
        if value.size != n_rows:
            raise ValueError(
                f"the model's output '{name}' has shape {list(value.shape)} for {n_rows} rows; "
                f"expected [{n_rows}]"
            )
        return value.reshape(n_rows)
    if value.ndim == 0 or value.shape[0] != n_rows:
        raise ValueError(
            f"the model's output '{name}' has shape {list(value.shape)} for {n_rows} rows; "
            f"normalcy expects every output to have one entry per row ([{n_rows}, ...])"
        )
    return value


# Rows per onnxruntime run when a caller reads more at a time: activations grow with the rows of
# one run, and a leave-feature-out graph runs d + 1 copies of each row (flow, 32 features:
# +4 GB for one run of 65536 rows, +0.25 GB for 4096).
ROWS_PER_RUN = 4096


def score_outputs(
    session_or_path: ort.InferenceSession | str | Path,
    X: np.ndarray,
    chunk_rows: int = ROWS_PER_RUN,
    names: list[str] | tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Every graph output (or only `names`) for rows `X`, by name, run `chunk_rows` rows at a
    time to bound memory: `score` float32 `[N]`, `is_anomaly` bool `[N]`, and, when the graph
    has them, `p_value` float32 `[N]`, `anomaly_map` `[N, H, W]` and any named explanation
    `[N]` or `[N, ...]` (float or int), whatever its name.

    Checks only the shape; call `check_rows` first for the full input check (NaN, dtype)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    session = as_session(session_or_path)
    io = graph_io(session)
    available = list(io.outputs)
    names = list(available if names is None else names)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"the model has no output(s) {unknown}; it has {available}")
    X = np.ascontiguousarray(X, dtype=io.input_dtype)
    _check_batch_shape(io.input_shape, X)
    input_name = io.input_name
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(X), chunk_rows):
        chunk = X[start : start + chunk_rows]
        for name, value in zip(names, session.run(names, {input_name: chunk}), strict=True):
            parts[name].append(_per_row(name, np.asarray(value), len(chunk)))
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
