"""Deep SVDD, one-class objective (Ruff et al., "Deep One-Class Classification", ICML 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector


class DistanceToCenter(nn.Module):
    """Squared distance of the embedding to the fixed center c."""

    def __init__(self, network: nn.Module, center: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("center", center)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.network(x) - self.center) ** 2).sum(dim=1)


def initial_center(embeddings: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Mean of the untrained network's outputs, each coordinate pushed at least `eps` from zero:
    a coordinate of c near zero is reachable by the trivial all-zero-weights solution."""
    center = embeddings.mean(dim=0)
    center[(center.abs() < eps) & (center < 0)] = -eps
    center[(center.abs() < eps) & (center >= 0)] = eps
    return center


@register("deep_svdd")
class DeepSVDD(TorchDetector):
    """Bias-free MLP mapped into a hypersphere around c; score = squared distance to c.

    Bias terms (and bounded activations) would let the network collapse every input onto c, so
    every layer is bias-free, and c is fixed from the initial forward pass, never learned.
    """

    name = "deep_svdd"

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 16,
        **training: object,
    ) -> None:
        super().__init__(**training)
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.center: torch.Tensor | None = None

    def build_network(self, n_features: int) -> nn.Module:
        return mlp(n_features, self.hidden_dims, self.latent_dim, bias=False)

    def before_training(self, train: torch.Tensor) -> None:
        with torch.no_grad():
            self.center = initial_center(self.network(train))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return ((self.network(batch) - self.center) ** 2).sum(dim=1).mean()

    def score_head(self) -> nn.Module:
        return DistanceToCenter(self.network, self.center)
