"""MLP autoencoder scored by reconstruction error (optionally denoising: Vincent et al. 2008)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector


class ReconstructionError(nn.Module):
    """Mean squared reconstruction error per sample, in standardized units."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return ((self.autoencoder(flat) - flat) ** 2).mean(dim=1)


@register("autoencoder")
class Autoencoder(TorchDetector):
    """Encoder `hidden_dims` -> `latent_dim` -> mirrored decoder; `noise_std > 0` trains it to
    reconstruct the clean input from a Gaussian-corrupted one (a denoising autoencoder)."""

    name = "autoencoder"

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 8,
        noise_std: float = 0.0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.noise_std = noise_std

    def build_network(self, n_features: int) -> nn.Module:
        encoder = mlp(n_features, self.hidden_dims, self.latent_dim)
        decoder = mlp(self.latent_dim, self.hidden_dims[::-1], n_features)
        return nn.Sequential(encoder, decoder)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        clean = batch.flatten(1)
        noisy = clean
        if self.noise_std > 0 and self.network.training:
            noise = torch.randn(clean.shape, generator=self.generator) * self.noise_std
            noisy = clean + noise
        return ((self.network(noisy) - clean) ** 2).mean()

    def score_head(self) -> nn.Module:
        return ReconstructionError(self.network)
