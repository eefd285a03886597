"""What a model expects of one input row, and the check that refuses rows that do not match.

`input_spec` reads the row shape, dtype, feature names and id column from the graph and its
'normalcy' metadata; `check_rows` refuses a wrong shape, non-numbers and NaN/inf, naming the
source, the feature (or pixel position) and the row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from normalcy.scoring.session import ORT_DTYPES, read_metadata
from normalcy.scoring.sources import ModelSourceError


class InputError(ValueError):
    """Input the model cannot take; the message names the file, column or field and what the
    model expects."""


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
    # Image models trained on an image folder: how image files are resized to `shape` (the way
    # the training images were: "bilinear"); None: image files must already have that size.
    image_resize: str | None = None

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
            text += f", features {preview_names(self.feature_names)}"
        elif self.is_image:
            channels, height, width = self.shape
            text += f", {channels}-channel {height}x{width} images"
        return text

    def position(self, flat_index: int) -> str:
        """A human name for one value of a row: its feature name, or its index in the shape."""
        if self.feature_names:
            return repr(self.feature_names[flat_index])
        return f"position {[int(i) for i in np.unravel_index(flat_index, self.shape)]}"


def preview_names(names: tuple[str, ...] | list[str], n: int = 8) -> str:
    """The first `n` names and how many there are, for error messages."""
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
        dtype=np.dtype(ORT_DTYPES.get(graph_input.type, np.float32)),
        feature_names=names,
        id_column=id_column,
        image_resize=(metadata.get("input") or {}).get("image_resize"),
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
