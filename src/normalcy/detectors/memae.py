"""MemAE (Gong et al., "Memorizing Normality to Detect Anomaly: Memory-augmented Deep
Autoencoder for Unsupervised Anomaly Detection", ICCV 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from normalcy.detectors.autoencoder import ReconstructionError, mirrored_mlps, squared_error
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector

EPS = 1e-12


def hard_shrink(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep addressing weights above `threshold`, zero the rest (the paper's Eq. 7 in its
    continuous ReLU form, so it trains and exports), then renormalize each row to sum to 1."""
    shrunk = F.relu(weights - threshold) * weights / ((weights - threshold).abs() + EPS)
    return shrunk / shrunk.sum(dim=1, keepdim=True).clamp_min(EPS)


def addressing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of addressing weights `[N]`; low = few memory items used."""
    return -(weights * torch.log(weights + EPS)).sum(dim=1)


class Memory(nn.Module):
    """`memory_size` learned prototypes of the normal latent codes. A code is replaced by a convex
    combination of prototypes (weights = softmax of cosine similarity / temperature, hard-shrunk),
    so even an anomaly's code is rebuilt from normal prototypes and reconstructs poorly."""

    def __init__(
        self, memory_size: int, latent_dim: int, shrink_threshold: float, temperature: float
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(latent_dim)
        self.items = nn.Parameter(torch.empty(memory_size, latent_dim).uniform_(-bound, bound))
        self.shrink_threshold = shrink_threshold
        self.temperature = temperature

    def address(self, code: torch.Tensor) -> torch.Tensor:
        """Addressing weights `[N, memory_size]`: non-negative, sparse, rows summing to 1."""
        similarity = F.normalize(code, dim=1) @ F.normalize(self.items, dim=1).T
        weights = torch.softmax(similarity / self.temperature, dim=1)
        if self.shrink_threshold > 0:
            weights = hard_shrink(weights, self.shrink_threshold)
        return weights

    def forward(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.address(code)
        return weights @ self.items, weights


class MemoryAutoencoder(nn.Module):
    """encoder -> memory read -> decoder; `forward` gives the reconstruction (what is scored)."""

    def __init__(self, encoder: nn.Module, memory: Memory, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.memory = memory
        self.decoder = decoder

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, addressing weights)."""
        retrieved, weights = self.memory(self.encoder(x))
        return self.decoder(retrieved), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[0]


@register("memae")
class MemAE(TorchDetector):
    """MLP encoder -> memory of normal prototypes -> decoder; score = reconstruction error of the
    memory-read reconstruction. Plain autoencoders generalize well enough to reconstruct
    anomalies too; reading the code back from a memory of normal patterns prevents that.

    Loss = reconstruction MSE + `entropy_weight` x mean entropy of the addressing weights (the
    paper's 0.0002). `shrink_threshold` is the paper's lambda, set in [1/N, 3/N] for N memory
    items; `None` takes 1/N. `temperature` divides the cosine similarity before the softmax: the
    paper's Eq. 4 has none, but cosine lies in [-1, 1], so unscaled the weights stay within a
    factor e^2 of uniform and any lambda above ~2/N zeroes whole rows (the authors' code escapes
    this by using an unbounded dot product). 0.1 makes the addressing genuinely sparse.

    Outputs: `score` and `feature_contributions` `[N, d]`, each feature's squared reconstruction
    error (preprocessed units, input-feature order), as for the autoencoder.
    """

    name = "memae"
    loss_per_row = True

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 8,
        memory_size: int = 50,
        shrink_threshold: float | None = None,
        temperature: float = 0.1,
        entropy_weight: float = 0.0002,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if memory_size < 1:
            raise ValueError(f"{self.name}: memory_size must be >= 1, got {memory_size}")
        if shrink_threshold is not None and not 0 <= shrink_threshold < 1:
            raise ValueError(
                f"{self.name}: shrink_threshold must be in [0, 1) or None, got {shrink_threshold}"
            )
        if temperature <= 0:
            raise ValueError(f"{self.name}: temperature must be > 0, got {temperature}")
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.memory_size = memory_size
        self.shrink_threshold = shrink_threshold
        self.temperature = temperature
        self.entropy_weight = entropy_weight

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        encoder, decoder = mirrored_mlps(math.prod(input_shape), self.hidden_dims, self.latent_dim)
        threshold = (
            1.0 / self.memory_size if self.shrink_threshold is None else self.shrink_threshold
        )
        memory = Memory(self.memory_size, self.latent_dim, threshold, self.temperature)
        return MemoryAutoencoder(encoder, memory, decoder)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        reconstruction, weights = self.network.reconstruct(batch)
        entropy = addressing_entropy(weights)
        return squared_error(reconstruction, batch) + self.entropy_weight * entropy

    def score_head(self) -> nn.Module:
        return ReconstructionError(self.network)
