"""GANomaly (Akcay, Atapour-Abarghouei, Breckon, "GANomaly: Semi-Supervised Anomaly Detection
via Adversarial Training", ACCV 2018), with MLPs for vectors and flattened images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.adversarial import (
    AdversarialDetector,
    AdversarialPair,
    Discriminator,
    discriminator_bce,
)
from normalcy.detectors.base import Prediction
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.training import mean_loss


class EncoderDecoderEncoder(nn.Module):
    """GANomaly's generator: x -> G_E -> z -> G_D -> x_hat -> E -> z_hat."""

    def __init__(self, n_features: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.encoder = mlp(n_features, hidden_dims, latent_dim)
        self.decoder = mlp(latent_dim, hidden_dims[::-1], n_features)
        self.reencoder = mlp(n_features, hidden_dims, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent = self.encoder(x)
        reconstruction = self.decoder(latent)
        return latent, reconstruction, self.reencoder(reconstruction)


class LatentConsistency(nn.Module):
    """||G_E(x) - E(G_D(G_E(x)))||^2 per sample: GANomaly's anomaly score."""

    def __init__(self, generator: EncoderDecoderEncoder) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> Prediction:
        latent, _, latent_again = self.generator(x)
        return Prediction(((latent - latent_again) ** 2).sum(dim=1))


@register("ganomaly")
class GANomaly(AdversarialDetector):
    """GANomaly (Akcay et al., ACCV 2018): an encoder-decoder-encoder generator trained against
    a discriminator; anomalies are rows whose re-encoded reconstruction drifts from their code.

    Generator loss = `w_adv` * feature matching (L2 between the discriminator's features of
    real and reconstructed rows) + `w_con` * L1 reconstruction + `w_enc` * L2 latent
    consistency; the discriminator is trained with BCE. Early stopping watches the validation
    `w_con` * L1 + `w_enc` * L2 (the adversarial term depends on the moving discriminator).
    The score is the squared latent distance as in the authors' code (the paper writes L1).
    """

    name = "ganomaly"

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 8,
        discriminator_dims: Sequence[int] = (64, 32),
        w_adv: float = 1.0,
        w_con: float = 50.0,
        w_enc: float = 1.0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.discriminator_dims = list(discriminator_dims)
        self.w_adv = w_adv
        self.w_con = w_con
        self.w_enc = w_enc

    def build_network(self, input_shape: tuple[int, ...]) -> AdversarialPair:
        return AdversarialPair(
            EncoderDecoderEncoder(math.prod(input_shape), self.hidden_dims, self.latent_dim),
            Discriminator(input_shape, self.discriminator_dims),
        )

    def discriminator_loss(self, batch: torch.Tensor) -> torch.Tensor:
        real = batch
        with torch.no_grad():
            _, fake, _ = self.network.generator(real)
        real_logits, _ = self.network.discriminator(real)
        fake_logits, _ = self.network.discriminator(fake)
        return discriminator_bce(real_logits, fake_logits)

    def _contextual_and_encoder(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted L1 reconstruction + L2 latent loss, the reconstruction) of a flat batch."""
        latent, fake, latent_again = self.network.generator(real)
        contextual = (fake - real.flatten(1)).abs().mean()
        encoder = ((latent - latent_again) ** 2).mean()
        return self.w_con * contextual + self.w_enc * encoder, fake

    def generator_loss(self, batch: torch.Tensor) -> torch.Tensor:
        real = batch
        loss, fake = self._contextual_and_encoder(real)
        _, real_features = self.network.discriminator(real)
        _, fake_features = self.network.discriminator(fake)
        adversarial = ((real_features.detach() - fake_features) ** 2).mean()
        return self.w_adv * adversarial + loss

    def validation_criterion(self, data: Dataset) -> float:
        return mean_loss(
            lambda batch: self._contextual_and_encoder(batch)[0], data, self.batch_size
        )

    def score_head(self) -> nn.Module:
        return LatentConsistency(self.network.generator)
