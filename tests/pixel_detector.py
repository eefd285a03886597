"""A tiny real detector that outputs an anomaly map, for testing the image plumbing (pixel
metrics, overlays, map export, `normalcy score --maps`) before the image detectors exist.

Per pixel: |x - mean| / std of the training images, averaged over channels, is the map at the
input resolution; the image score is the map's maximum. Registered as `pixel_zscore` on import
(it is a test detector, not a method normalcy ships)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from normalcy.detectors.base import Detector, FitData, Prediction
from normalcy.detectors.registry import _FACTORIES, register

NAME = "pixel_zscore"


class PixelZScoreGraph(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> Prediction:
        anomaly_map = ((x - self.mean) / self.std).abs().mean(dim=1)
        return Prediction(anomaly_map.flatten(1).amax(dim=1), anomaly_map)


class PixelZScore(Detector):
    name = NAME
    input_kind = "image"  # the suites that iterate over registered detectors feed it images

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.graph: PixelZScoreGraph | None = None

    def _fit(self, data: FitData) -> None:
        train = data.train.astype(np.float64)
        mean, std = train.mean(axis=0), train.std(axis=0) + 1.0
        self.graph = PixelZScoreGraph(
            torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        )

    def scoring_module(self) -> PixelZScoreGraph:
        if self.graph is None:
            raise RuntimeError(f"{self.name}: call fit() before scoring_module()")
        return self.graph

    def fitted_state(self) -> dict[str, torch.Tensor]:
        return dict(self.scoring_module().state_dict())

    def load_fitted_state(self, state: dict[str, torch.Tensor], input_shape: tuple) -> None:
        self.graph = PixelZScoreGraph(state["mean"], state["std"])
        self.input_shape = tuple(input_shape)


if NAME not in _FACTORIES:
    register(NAME)(PixelZScore)
