"""The Detector contract: the only thing the pipeline knows about a method."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from torch import nn


class Detector(ABC):
    """Learns normality from (mostly) normal data; higher scores mean more anomalous.

    `fit(train, val, val_labels)`: `val_labels` reaches a detector only when it declares
    `uses_labels = True`; the pipeline strips them otherwise, so labels cannot leak into training.
    `scoring_module()` is the whole inference path, raw input in data units -> score, as one
    `nn.Module`. It is what gets exported. A method that cannot be a graph sets
    `exportable = False`.
    """

    name: ClassVar[str] = "detector"
    exportable: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False

    @abstractmethod
    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray | None = None,
        val_labels: np.ndarray | None = None,
    ) -> Detector:
        """Learn from `train`; `val` (unlabelled unless `uses_labels`) is for early stopping."""

    @abstractmethod
    def score(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores, float64 `[N]`, higher = more anomalous."""

    @abstractmethod
    def scoring_module(self) -> nn.Module:
        """Raw input `[N, ...]` (float32, data units) -> score `[N]`, ready for export."""
