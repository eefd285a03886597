"""JSON for pipeline reports: numpy values, paths and sets serialised one way, files atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from normalcy.atomic import atomic_path


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for what reports contain: numpy scalars/arrays, paths, sets."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically (temp file + rename), so a failure leaves no half-written file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=json_default))
    return path
