"""The Detector contract: the only thing the pipeline knows about a method."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

SCORE = "score"
ANOMALY_MAP = "anomaly_map"
# Output names the graph's calibration head and input own; an explanation may not take them.
RESERVED_OUTPUT_NAMES = frozenset({SCORE, ANOMALY_MAP, "is_anomaly", "p_value", "input"})
_OUTPUT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class Prediction(NamedTuple):
    """What every scoring module returns, like anomalib's `InferenceBatch`.

    `score` `[N]` (higher = more anomalous); `anomaly_map` `[N, H, W]` for methods that localize;
    `explanations`: named tensors `[N, ...]` (per-feature contributions, the nearest normal
    row, ...). Export, parity, `normalcy score` and `serve` carry every field by name, so a new
    explanation needs no edit outside the detector that produces it."""

    score: torch.Tensor
    anomaly_map: torch.Tensor | None = None
    explanations: dict[str, torch.Tensor] | None = None

    def named_outputs(self) -> dict[str, torch.Tensor]:
        """Every field present, in graph output order: score, anomaly_map, then explanations
        sorted by name."""
        outputs = {SCORE: self.score}
        if self.anomaly_map is not None:
            outputs[ANOMALY_MAP] = self.anomaly_map
        for name in sorted(self.explanations or {}):
            outputs[check_output_name(name)] = self.explanations[name]
        return outputs


def check_output_name(name: str) -> str:
    """An explanation's name, if it can be a graph output that no other field uses."""
    if name in RESERVED_OUTPUT_NAMES or not _OUTPUT_NAME.match(name):
        raise ValueError(
            f"explanation name {name!r} is not allowed: expected lower_snake_case (letters, "
            f"digits, _; at most 64) and none of {sorted(RESERVED_OUTPUT_NAMES)}"
        )
    return name


def as_prediction(out: Any) -> Prediction:
    """A scoring module's output as a `Prediction` (a bare score tensor is accepted)."""
    if isinstance(out, Prediction):
        return out
    if isinstance(out, torch.Tensor):
        return Prediction(out)
    raise TypeError(
        f"a scoring module must return a Prediction or a score tensor, got {type(out).__name__}"
    )


def check_input(
    X: np.ndarray,
    who: str,
    what: str,
    expected_shape: tuple[int, ...] | None = None,
    min_rows: int = 1,
) -> np.ndarray:
    """`X` as a float array `[N, ...]`, or a ValueError naming what is wrong and what was expected.

    Every detector goes through this in `fit` and `score`, so no method can silently train on
    NaN, score rows of the wrong width, or accept a single unbatched row."""
    X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise ValueError(f"{who}: {what} must be numeric, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float64 if X.dtype == np.float64 else np.float32)
    if X.ndim < 2:
        raise ValueError(
            f"{who}: {what} must be a batch [N, features] or [N, C, H, W], got shape {X.shape}"
        )
    if len(X) < min_rows:
        raise ValueError(f"{who}: need at least {min_rows} {what} rows, got {len(X)}")
    if expected_shape is not None and tuple(X.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"{who}: {what} rows have shape {list(X.shape[1:])}, but the detector was fitted on "
            f"rows of shape {list(expected_shape)}"
        )
    finite = np.isfinite(X.reshape(len(X), -1))
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{who}: {what} has {len(bad_rows)} rows with NaN or inf (first rows "
            f"{bad_rows[:5].tolist()}); expected finite values"
        )
    return X


def check_labels(labels: np.ndarray | None, n_rows: int, who: str, what: str) -> np.ndarray | None:
    """0/1 labels aligned with their rows, or None."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n_rows,):
        raise ValueError(f"{who}: {what} must have shape ({n_rows},), got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{who}: {what} must be 0 (normal) or 1 (anomaly)")
    return labels.astype(np.int64)


class Detector(ABC):
    """Learns normality from (mostly) normal data; higher scores mean more anomalous.

    `fit(train, val, val_labels, train_labels)`: labels reach a detector only when it declares
    `uses_labels = True`; the pipeline strips them otherwise, so labels cannot leak into training.
    `fit` and `score` check their input (numeric, finite, batched, the fitted row shape) and then
    call the method's `_fit` / `_score`, so no method can skip the checks.
    `scoring_module()` is the whole inference path, raw input in data units -> score, as one
    `nn.Module`. It is what gets exported. A method that cannot be a graph sets
    `exportable = False`.
    """

    name: ClassVar[str] = "detector"
    exportable: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    min_train_rows: ClassVar[int] = 2
    # Trained to separate data from synthetic outliers: the label-free selection criterion
    # (synthetic anomalies too) would measure its own training task, so it cannot judge it.
    trains_on_synthetic_anomalies: ClassVar[bool] = False

    input_shape: tuple[int, ...] | None = None

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray | None = None,
        val_labels: np.ndarray | None = None,
        train_labels: np.ndarray | None = None,
    ) -> Detector:
        """Learn from `train`; `val` (unlabelled unless `uses_labels`) is for early stopping."""
        train = check_input(train, self.name, "training", min_rows=self.min_train_rows)
        train_labels = check_labels(train_labels, len(train), self.name, "train_labels")
        if val is not None and len(val):
            val = check_input(val, self.name, "validation", expected_shape=train.shape[1:])
            val_labels = check_labels(val_labels, len(val), self.name, "val_labels")
        else:
            val, val_labels = None, None
        self._fit(train, val, val_labels, train_labels)
        self.input_shape = tuple(train.shape[1:])
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores, float64 `[N]`, higher = more anomalous."""
        if self.input_shape is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        x = check_input(x, self.name, "input", expected_shape=self.input_shape, min_rows=0)
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(self._score(x), dtype=np.float64).reshape(-1)

    @abstractmethod
    def _fit(
        self,
        train: np.ndarray,
        val: np.ndarray | None,
        val_labels: np.ndarray | None,
        train_labels: np.ndarray | None,
    ) -> None:
        """The method's own training, on checked input."""

    @abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray:
        """The method's own scoring of checked, non-empty input."""

    @abstractmethod
    def scoring_module(self) -> nn.Module:
        """Raw input `[N, ...]` (float32, data units) -> score `[N]`, ready for export."""
