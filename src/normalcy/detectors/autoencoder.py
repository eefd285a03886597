"""MLP autoencoders scored by reconstruction error: plain, denoising (Vincent et al. 2008),
sparse (L1 on the code) and contractive (Rifai et al. 2011). The pieces other reconstruction
methods reuse (mirrored encoder/decoder, per-sample error) live here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from normalcy.artifact.names import FEATURE_CONTRIBUTIONS_NAME
from normalcy.detectors.base import Prediction, check_input
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector


def squared_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample `[N]` between flattened batches."""
    return ((reconstruction.flatten(1) - target.flatten(1)) ** 2).mean(dim=1)


class ReconstructionError(nn.Module):
    """Mean squared reconstruction error per sample (in preprocessed units) as the score, with
    each feature's squared error as `feature_contributions` `[N, d]` (flattened input order)
    beside it: the score is their mean, so the largest is the worst-reconstructed feature."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor) -> Prediction:
        feature_errors = (self.autoencoder(x).flatten(1) - x.flatten(1)) ** 2
        return Prediction(
            feature_errors.mean(dim=1),
            explanations={FEATURE_CONTRIBUTIONS_NAME: feature_errors},
        )


def mirrored_mlps(
    n_features: int, hidden_dims: Sequence[int], latent_dim: int, code_dim: int | None = None
) -> tuple[nn.Sequential, nn.Sequential]:
    """Encoder `n_features -> hidden_dims -> code_dim` (default `latent_dim`) and the mirrored
    decoder `latent_dim -> reversed hidden_dims -> n_features`. `code_dim` differs from
    `latent_dim` when the encoder emits more than the code (a VAE's mean and log-variance)."""
    encoder = mlp(n_features, hidden_dims, latent_dim if code_dim is None else code_dim)
    decoder = mlp(latent_dim, list(hidden_dims)[::-1], n_features)
    return encoder, decoder


class EncoderDecoder(nn.Module):
    """`decoder(encoder(x))` with both halves reachable: the penalties act on the encoder."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def encoder_jacobian_norm(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of d encoder(x_i) / d x_i per sample `[N]`, exact (per-sample
    Jacobians by reverse-mode autograd) and differentiable w.r.t. the encoder's weights."""

    def encode_one(row: torch.Tensor) -> torch.Tensor:
        return encoder(row.unsqueeze(0)).squeeze(0)

    jacobians = torch.func.vmap(torch.func.jacrev(encode_one))(x)
    return (jacobians**2).flatten(1).sum(dim=1)


@register("autoencoder")
class Autoencoder(TorchDetector):
    """Encoder `hidden_dims` -> `latent_dim` -> mirrored decoder, score = reconstruction error.

    Training-only options, each off at 0 (the scoring graph is always the reconstruction error):
    `noise_std > 0` reconstructs the clean input from a Gaussian-corrupted one (denoising, so it
    cannot learn the identity); `sparsity_weight` adds an L1 penalty on the code (sparse AE, few
    active units per input); `contractive_weight` adds ||d code / d input||_F^2 (Rifai et al.
    2011, "Contractive Auto-Encoders", ICML), making the code locally insensitive to directions off
    the training manifold. Unlike Rifai et al. the weights are untied and the code is linear, so
    only `weight_decay` stops the encoder trading code scale against the decoder.

    Outputs: `score` and the explanation `feature_contributions` `[N, d]`, each input feature's
    squared reconstruction error in preprocessed units (input-feature order; `score` is their
    mean).
    """

    name = "autoencoder"
    loss_per_row = True

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 8,
        noise_std: float = 0.0,
        sparsity_weight: float = 0.0,
        contractive_weight: float = 0.0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        for label, value in (
            ("noise_std", noise_std),
            ("sparsity_weight", sparsity_weight),
            ("contractive_weight", contractive_weight),
        ):
            if value < 0:
                raise ValueError(f"{self.name}: {label} must be >= 0, got {value}")
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.noise_std = noise_std
        self.sparsity_weight = sparsity_weight
        self.contractive_weight = contractive_weight

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return EncoderDecoder(
            *mirrored_mlps(math.prod(input_shape), self.hidden_dims, self.latent_dim)
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        clean = batch
        noisy = clean
        if self.noise_std > 0 and self.network.training:
            noise = torch.randn(clean.shape, generator=self.generator) * self.noise_std
            noisy = clean + noise
        code = self.network.encoder(noisy)
        loss = squared_error(self.network.decoder(code), clean)
        if self.sparsity_weight > 0:
            loss = loss + self.sparsity_weight * code.abs().sum(dim=1)
        if self.contractive_weight > 0:
            jacobian = encoder_jacobian_norm(self.network.encoder, noisy)
            loss = loss + self.contractive_weight * jacobian
        return loss

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes `[N, latent_dim]` of raw input (data units), for inspecting the latent space."""
        if self.preprocess is None or self.network is None:
            raise RuntimeError(f"{self.name}: call fit() before encode()")
        x = check_input(x, self.name, "input", expected_shape=self.input_shape, min_rows=0)
        with torch.no_grad():
            tensor = self.preprocess(torch.as_tensor(x, dtype=torch.float32))
            return self.network.encoder(tensor).numpy()

    def score_head(self) -> nn.Module:
        return ReconstructionError(self.network)
