"""Outlier Exposure, one-class form: normal rows against exposure outliers, score = the logit."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from normalcy.detectors.base import Prediction
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector
from normalcy.detectors.training import Rows, TrainingHistory


class Logit(nn.Module):
    """The network's single output as the score `[N]` (higher = more anomalous)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> Prediction:
        return Prediction(self.network(x)[:, 0])


class SyntheticOutliers:
    """Exposure outliers generated from (preprocessed) normal rows `[n, ...]`: half uniform in
    their bounding box inflated by `margin` x its width on each side (covers the space around
    the data), half feature-wise shuffled rows, each feature taken from an independently drawn
    normal row (every marginal is kept, the joint structure is broken)."""

    def __init__(self, normals: torch.Tensor, margin: float) -> None:
        self.row_shape = normals.shape[1:]
        normals = self.normals = normals.flatten(1)
        low, high = normals.min(dim=0).values, normals.max(dim=0).values
        self.low = low - margin * (high - low)
        self.width = (1 + 2 * margin) * (high - low)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        n_features = self.normals.shape[1]
        n_uniform = n // 2
        uniform = self.low + self.width * torch.rand((n_uniform, n_features), generator=generator)
        rows = torch.randint(len(self.normals), (n - n_uniform, n_features), generator=generator)
        shuffled = self.normals[rows, torch.arange(n_features)]
        return torch.cat([uniform, shuffled]).reshape(n, *self.row_shape)


NORMAL, LABELLED, SYNTHETIC = 0, 1, 2  # the kind of a row, carried beside it in the dataset


def exposure_loss(logits: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy, class-balanced: mean softplus(f) over normal rows plus the mean,
    over the outlier kinds present, of each kind's mean softplus(-f). Labelled anomalies are
    few, so averaging per kind keeps them from being drowned by the synthetic outliers."""
    normal = kind == NORMAL
    outlier_terms = [
        F.softplus(-logits[kind == k]).mean() for k in (LABELLED, SYNTHETIC) if (kind == k).any()
    ]
    total = F.softplus(logits[normal]).mean() if normal.any() else logits.new_zeros(())
    if outlier_terms:
        total = total + torch.stack(outlier_terms).mean()
    return total


@register("outlier_exposure")
class OutlierExposure(TorchDetector):
    """Outlier Exposure (Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier
    Exposure", ICLR 2019) in one-class form: an MLP f(x) -> anomaly logit, trained with a
    (class-balanced, see `exposure_loss`) binary cross-entropy on normal rows (target 0) against
    an exposure set of outliers (target 1).

    With `train_labels` that contain anomalies (the supervised regime) those labelled rows are
    the real exposure set and are never used as normals; synthetic outliers
    (`SyntheticOutliers`, `exposure_ratio` per normal row of each batch, fresh every batch from
    `self.generator`) are always added, so the method also runs with no labels or no labelled
    anomalies. Early stopping monitors the same loss on the validation rows (normal, or as
    labelled by `val_labels`) plus a fixed synthetic set; validation never updates weights.
    Score = the logit.
    """

    name = "outlier_exposure"
    uses_labels = True
    trains_on_synthetic_anomalies = True

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        exposure_ratio: float = 1.0,
        box_margin: float = 0.25,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if not isinstance(exposure_ratio, int | float) or not exposure_ratio > 0:
            raise ValueError(f"{self.name}: exposure_ratio must be > 0, got {exposure_ratio!r}")
        if not isinstance(box_margin, int | float) or not box_margin >= 0:
            raise ValueError(f"{self.name}: box_margin must be >= 0, got {box_margin!r}")
        self.hidden_dims = list(hidden_dims)
        self.exposure_ratio = float(exposure_ratio)
        self.box_margin = float(box_margin)
        self.synthetic: SyntheticOutliers | None = None
        self.n_labelled_outliers = 0

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return mlp(math.prod(input_shape), self.hidden_dims, 1)

    def train_network(self, train: Rows, val: Rows | None) -> TrainingHistory:
        """Split normals from labelled anomalies, then the shared loop on (rows, kind) batches."""
        kind = self._kinds(self.train_labels, len(train))
        is_normal = (kind == NORMAL).numpy()
        if is_normal.sum() < 2:
            raise ValueError(
                f"{self.name}: needs at least 2 normal (label 0) training rows, got "
                f"{int(is_normal.sum())}"
            )
        normals = self.forward_data(nn.Identity(), self.rows(train.rows[is_normal]))
        self.n_labelled_outliers = int((kind == LABELLED).sum())
        self.synthetic = SyntheticOutliers(normals, self.box_margin)
        val_rows = None
        if val is not None:
            val_kind = self._kinds(self.val_labels, len(val))
            n_fixed = max(1, round(self.exposure_ratio * int((val_kind == NORMAL).sum())))
            fixed = self.synthetic(n_fixed, self.generator)
            rows = torch.cat([self.forward_data(nn.Identity(), val), fixed])
            kinds = torch.cat([val_kind, torch.full((n_fixed,), SYNTHETIC)])
            # mixed once, so that every validation batch holds every kind
            order = torch.randperm(len(rows), generator=self.generator)
            val_rows = Rows(rows[order], kinds[order])
        return super().train_network(Rows(train.rows, kind, transform=train.transform), val_rows)

    @staticmethod
    def _kinds(labels: np.ndarray | None, n_rows: int) -> torch.Tensor:
        """NORMAL for label 0 (or no labels), LABELLED for label 1."""
        if labels is None:
            return torch.full((n_rows,), NORMAL)
        return torch.where(torch.as_tensor(labels) == 1, LABELLED, NORMAL)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`exposure_loss` of a batch of (rows, kind); in training, fresh synthetic outliers
        join the batch, `exposure_ratio` per normal row."""
        rows, kind = batch
        if self.network.training:
            n_synthetic = max(1, round(self.exposure_ratio * int((kind == NORMAL).sum())))
            rows = torch.cat([rows, self.synthetic(n_synthetic, self.generator)])
            kind = torch.cat([kind, torch.full((n_synthetic,), SYNTHETIC)])
        return exposure_loss(self.network(rows)[:, 0], kind)

    def score_head(self) -> nn.Module:
        return Logit(self.network)
