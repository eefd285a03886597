"""Input checks shared by calibration and the drift tests: levels, row matrices and score
vectors, each refused early with a message that names the argument."""

from __future__ import annotations

import numpy as np


def check_rate(value: float, name: str) -> float:
    """A level or rate as a float in (0, 1); a bool, a string or NaN is refused by name."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return float(value)


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """`[n, ...]` -> `[n, d]` float64; images `[n, c, h, w]` become `[n, c*h*w]`."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"{name} must be [n, d] (or [n, c, h, w]), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    arr = arr.reshape(arr.shape[0], -1)
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Scores as a flat float64 array; empty or non-finite input is refused by name (not
    carried on as a silent NaN)."""
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf) of {arr.size}")
    return arr
