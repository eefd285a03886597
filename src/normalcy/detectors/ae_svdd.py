"""AE-SVDD: an autoencoder trained with a Deep SVDD compactness term on its latent code."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.autoencoder import ReconstructionError
from normalcy.detectors.base import Prediction
from normalcy.detectors.deep_svdd import DistanceToCenter, initial_center, squared_distance
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector


class ReconstructionPlusCompactness(nn.Module):
    """Per-row reconstruction error + `weight` * squared latent distance to c.

    The same quantity is the training objective (its batch mean) and the anomaly score, so the
    score is exactly what training made small on normal data."""

    def __init__(self, autoencoder: nn.Sequential, center: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.reconstruction = ReconstructionError(autoencoder)
        self.compactness = DistanceToCenter(autoencoder[0], center)
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> Prediction:
        return Prediction(self.reconstruction(x).score + self.weight * self.compactness(x).score)


@register("ae_svdd")
class AESVDD(TorchDetector):
    """Autoencoder + Deep SVDD hybrid: Deep SVDD's hypersphere (Ruff et al., "Deep One-Class
    Classification", ICML 2018) on an autoencoder's latent code, trained jointly with the
    reconstruction loss as in DASVDD (Hojjati & Armanfard, "DASVDD: Deep Autoencoding Support
    Vector Data Descriptor for Anomaly Detection", arXiv:2106.05410, 2021; IEEE TKDE 2023).

    Loss and score = reconstruction error + compactness_weight * gamma * ||z - c||^2, where c is
    fixed from the initial latent codes (as in Deep SVDD) and gamma = initial mean
    reconstruction error / initial mean squared distance puts both terms on the same scale at
    the start (DASVDD's gamma heuristic balances them likewise), so `compactness_weight` is
    unit-free: 1 weighs them equally. The reconstruction term keeps the code informative, so
    the network may keep its biases: mapping everything onto c would not reconstruct.
    """

    name = "ae_svdd"

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 8,
        compactness_weight: float = 1.0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if not isinstance(compactness_weight, int | float) or not compactness_weight >= 0:
            raise ValueError(
                f"{self.name}: compactness_weight must be >= 0, got {compactness_weight!r}"
            )
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.compactness_weight = float(compactness_weight)
        self.center: torch.Tensor | None = None
        self.gamma = 1.0

    fitted_attributes = ("center", "gamma")

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        n_features = math.prod(input_shape)
        encoder = mlp(n_features, self.hidden_dims, self.latent_dim)
        decoder = mlp(self.latent_dim, self.hidden_dims[::-1], n_features)
        return nn.Sequential(encoder, decoder)

    def before_training(self, train: Dataset) -> None:
        """Fix c from the untrained encoder, and gamma from the two untrained terms."""
        latent = self.forward_data(self.network[0], train)
        self.center = initial_center(latent)
        reconstruction = self.forward_data(ReconstructionError(self.network), train).score.mean()
        distance = squared_distance(latent, self.center).mean()
        self.gamma = float(reconstruction / distance.clamp_min(1e-12))

    @property
    def objective(self) -> ReconstructionPlusCompactness:
        """The per-row loss, which is also the score (over the current weights)."""
        return ReconstructionPlusCompactness(
            self.network, self.center, self.compactness_weight * self.gamma
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.objective(batch).score.mean()

    def score_head(self) -> nn.Module:
        return self.objective
