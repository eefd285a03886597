"""GOAD: classify which random affine transform was applied (Bergman & Hoshen, ICLR 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import Dataset

from normalcy.artifact.names import TRANSFORMATION_LOG_PROBS_NAME
from normalcy.detectors.base import Prediction
from normalcy.detectors.knn import bank_constants, squared_distances, squared_distances_to
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector
from normalcy.detectors.training import TrainingHistory


class TransformedFeatures(nn.Module):
    """Standardized rows `[N, d]` -> features `[N, M, F]` = f(W_m x) for every transform m.

    The M random matrices are one constant `[d, M * transform_dim]` buffer, so all transforms are
    a single matmul; the shared extractor f then runs on the `[N * M, transform_dim]` stack."""

    def __init__(self, transforms: torch.Tensor, extractor: nn.Module) -> None:
        super().__init__()
        self.n_transforms, _, self.transform_dim = transforms.shape
        self.register_buffer("transforms", transforms.permute(1, 0, 2).flatten(1).contiguous())
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transformed = torch.matmul(x.flatten(1), self.transforms)
        features = self.extractor(transformed.reshape(-1, self.transform_dim))
        return features.reshape(-1, self.n_transforms, features.shape[-1])


def transform_log_probs(distances: torch.Tensor, eps: float) -> torch.Tensor:
    """log p(m' | T_m x) `[N, M, M']` from the squared distances ||f(T_m x) - c_m'||^2.

    p(m' | T_m x) = softmax_m'(-max(||f(T_m x) - c_m'||^2, eps)): the paper's eq. 3 with the
    official code's distance floor `eps` (it stops a perfect match from dominating the score)."""
    return functional.log_softmax(-distances.clamp_min(eps), dim=-1)


class GoadScore(nn.Module):
    """Standardized rows -> -sum_m log p(m | T_m x), with each log p(m | T_m x) as
    `transformation_log_probs` `[N, M]` (the transformations the row fails to be recognized
    under); the transforms (inside `network`) and the centers (as -2 c^T and ||c||^2, the
    operands of the distance matmul) are constants."""

    def __init__(self, network: TransformedFeatures, centers: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.network = network
        minus_two_centers_t, centers_sq = bank_constants(centers)
        self.register_buffer("minus_two_centers_t", minus_two_centers_t)
        self.register_buffer("centers_sq", centers_sq)
        self.register_buffer("diagonal", torch.eye(len(centers)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> Prediction:
        features = self.network(x)
        distances = squared_distances_to(features, self.minus_two_centers_t, self.centers_sq)
        log_probs = (transform_log_probs(distances, self.eps) * self.diagonal).sum(dim=2)
        return Prediction(
            -log_probs.sum(dim=1), explanations={TRANSFORMATION_LOG_PROBS_NAME: log_probs}
        )


@register("goad")
class GOAD(TorchDetector):
    """GOAD, Bergman & Hoshen, "Classification-Based Anomaly Detection for General Data",
    ICLR 2020, in its tabular form.

    `n_transforms` random Gaussian maps W_m (d -> `transform_dim`, fixed by `seed`, scaled by
    1/sqrt(d) so transformed values stay O(1); no bias b_m, as in the official tabular code) are
    applied to the standardized row; a shared MLP f
    is trained so that f(W_m x) lies nearest to its own transform's center c_m: cross-entropy of
    p(m | T_m x) = softmax_m'(-||f(T_m x) - c_m'||^2) with the batch's centers, plus
    `triplet_weight` x the triplet-center margin loss max(0, ||f - c_m||^2 + `margin` -
    min_{m' != m} ||f - c_m'||^2) the paper uses for tabular data (0 turns it off). After
    training, c_m = mean f(T_m x) over all training rows; score = -sum_m log p(m | T_m x).

    Differences from the official code: its extra linear classification head is replaced by the
    distance-based softmax of the paper's eq. 3 (the score never used that head), and the final
    centers are one exact pass over the training rows in eval mode rather than the running mean of
    the last epoch's batches.

    Outputs: `score` and `transformation_log_probs` `[N, M]`, log p(m | T_m x) per
    transformation (the score is minus their sum).
    """

    name = "goad"

    def __init__(
        self,
        n_transforms: int = 32,
        transform_dim: int = 32,
        hidden_dims: Sequence[int] = (64,),
        feature_dim: int = 32,
        margin: float = 1.0,
        triplet_weight: float = 0.1,
        eps: float = 0.0,
        **training: object,
    ) -> None:
        if n_transforms < 2:
            raise ValueError(
                f"goad: n_transforms must be >= 2 (the classifier tells transforms apart), "
                f"got {n_transforms}"
            )
        if transform_dim < 1 or feature_dim < 1:
            raise ValueError(
                f"goad: transform_dim and feature_dim must be >= 1, got {transform_dim} and "
                f"{feature_dim}"
            )
        if margin < 0 or triplet_weight < 0 or eps < 0:
            raise ValueError(
                f"goad: margin, triplet_weight and eps must be >= 0, got {margin}, "
                f"{triplet_weight} and {eps}"
            )
        super().__init__(**training)
        self.n_transforms = n_transforms
        self.transform_dim = transform_dim
        self.hidden_dims = list(hidden_dims)
        self.feature_dim = feature_dim
        self.margin = margin
        self.triplet_weight = triplet_weight
        self.eps = eps
        self.centers: torch.Tensor | None = None

    def random_transforms(self, n_features: int) -> torch.Tensor:
        """`[M, d, transform_dim]` Gaussian matrices, a function of `seed` alone."""
        rng = np.random.default_rng(self.seed)
        shape = (self.n_transforms, n_features, self.transform_dim)
        return torch.as_tensor(rng.standard_normal(shape) / math.sqrt(n_features)).float()

    fitted_attributes = ("centers",)

    def build_network(self, input_shape: tuple[int, ...]) -> TransformedFeatures:
        extractor = mlp(self.transform_dim, self.hidden_dims, self.feature_dim)
        return TransformedFeatures(self.random_transforms(math.prod(input_shape)), extractor)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        features = self.network(batch)
        distances = squared_distances(features, features.mean(dim=0))
        log_probs = transform_log_probs(distances, self.eps)
        eye = torch.eye(self.n_transforms, dtype=torch.bool)
        loss = -log_probs[:, eye].mean()
        if self.triplet_weight > 0:
            positive = distances[:, eye]
            negative = distances.masked_fill(eye, float("inf")).amin(dim=-1)
            triplet = (positive + self.margin - negative).clamp_min(0.0).mean()
            loss = loss + self.triplet_weight * triplet
        return loss

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        history = super().train_network(train, val)
        self.centers = self.forward_data(self.network, train).mean(dim=0)
        return history

    def score_head(self) -> nn.Module:
        return GoadScore(self.network, self.centers, self.eps)
