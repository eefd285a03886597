"""Serving-side scoring of an exported model: numpy + onnxruntime only.

Deliberately free of torch (and of the rest of normalcy) so a scoring container or a batch job
needs nothing but the .onnx file and onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

METADATA_KEY = "normalcy"
SCORE_NAME = "score"
DECISION_NAME = "is_anomaly"
P_VALUE_NAME = "p_value"
ANOMALY_MAP_NAME = "anomaly_map"


def load_session(path: str | Path, intra_op_threads: int | None = None) -> ort.InferenceSession:
    """CPU session with all graph optimizations; `intra_op_threads` caps threads per session
    (useful when several scoring workers share one machine)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
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


def score_onnx(
    session_or_path: ort.InferenceSession | str | Path,
    X: np.ndarray,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """(score float32 `[N]`, is_anomaly bool `[N]`) for raw rows `X`, in batches of
    `batch_size` to bound memory. Pass a session to reuse it across calls."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    session = _session(session_or_path)
    X = np.ascontiguousarray(X, dtype=np.float32)
    _check_shape(session, X)
    input_name = session.get_inputs()[0].name
    scores, flags = [], []
    for start in range(0, len(X), batch_size):
        score, flag = session.run(
            [SCORE_NAME, DECISION_NAME], {input_name: X[start : start + batch_size]}
        )
        scores.append(np.asarray(score, dtype=np.float32).reshape(-1))
        flags.append(np.asarray(flag, dtype=bool).reshape(-1))
    if not scores:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
    return np.concatenate(scores), np.concatenate(flags)
