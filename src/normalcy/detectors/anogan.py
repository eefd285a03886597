"""AnoGAN (Schlegl et al., IPMI 2017) and its encoder variant f-AnoGAN (Schlegl et al., Medical
Image Analysis 2019), with MLPs for vectors and flattened images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.adversarial import (
    AdversarialDetector,
    AdversarialPair,
    Discriminator,
    discriminator_bce,
)
from normalcy.detectors.base import Prediction
from normalcy.detectors.networks import ScoringModule, mlp
from normalcy.detectors.registry import register
from normalcy.detectors.training import TrainingHistory


def anogan_distance(
    real: torch.Tensor, fake: torch.Tensor, features: nn.Module, lam: float
) -> torch.Tensor:
    """AnoGAN's loss and score per row: (1 - lam) * sum |x - G(z)| + lam * sum |f(x) - f(G(z))|."""
    residual = (real.flatten(1) - fake.flatten(1)).abs().sum(dim=1)
    discrimination = (features(real) - features(fake)).abs().sum(dim=1)
    return (1 - lam) * residual + lam * discrimination


def izi_f_distance(
    real: torch.Tensor, fake: torch.Tensor, features: nn.Module, kappa: float
) -> torch.Tensor:
    """f-AnoGAN's izi_f loss and score per row: the mean squared residual plus kappa times the
    mean squared feature residual (each normalized by its dimension, as in the paper)."""
    residual = ((real.flatten(1) - fake.flatten(1)) ** 2).mean(dim=1)
    discrimination = ((features(real) - features(fake)) ** 2).mean(dim=1)
    return residual + kappa * discrimination


def mmd(a: torch.Tensor, b: torch.Tensor, scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Squared maximum mean discrepancy (biased) between two samples, Gaussian kernels with
    bandwidths `scales` * sqrt(dim): small when generated rows look like real ones, at fine and
    coarse scales."""
    joint = torch.cat([a, b])
    squared = torch.cdist(joint, joint) ** 2
    kernel = sum(torch.exp(-squared / (2 * (s**2) * a.shape[1])) for s in scales)
    n = len(a)
    return float(kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean())


class EncodedDistance(nn.Module):
    """f-AnoGAN's scoring graph: x -> z = E(x) -> G(z), scored by `izi_f_distance`."""

    def __init__(
        self, encoder: nn.Module, generator: nn.Module, features: nn.Module, kappa: float
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.generator = generator
        self.features = features
        self.kappa = kappa

    def forward(self, x: torch.Tensor) -> Prediction:
        fake = self.generator(self.encoder(x))
        return Prediction(izi_f_distance(x, fake, self.features, self.kappa))


@register("anogan")
class AnoGAN(AdversarialDetector):
    """AnoGAN (Schlegl et al., "Unsupervised Anomaly Detection with Generative Adversarial
    Networks to Guide Marker Discovery", IPMI 2017): a GAN learns normal data; a row is scored
    by how well the generator can reproduce it.

    Default: per-row latent search, `search_steps` Adam steps (lr `search_lr`) on z from a
    seeded N(0, I) start, minimizing and scoring (1 - `lam`) * |x - G(z)|_1 + `lam` *
    |f(x) - f(G(z))|_1 with f the discriminator's feature layer (paper lam = 0.1). An
    optimization per input is no graph, so this instance has `exportable = False`.

    `encoder=True`: f-AnoGAN (Schlegl et al., Medical Image Analysis 2019), izi_f training:
    after the GAN, with G and D frozen, an encoder E: x -> z learns to minimize
    mean (x - G(E(x)))^2 + `kappa` * mean (f(x) - f(G(E(x))))^2, which is also the score. It
    exports as one graph. Both variants train the GAN with the non-saturating BCE loss of DCGAN
    (f-AnoGAN used a WGAN-GP); early stopping keeps the generator with the lowest MMD between
    validation rows and a fixed set of generated rows.
    """

    name = "anogan"

    def __init__(
        self,
        latent_dim: int = 8,
        generator_dims: Sequence[int] = (32, 64),
        discriminator_dims: Sequence[int] = (64, 32),
        lam: float = 0.1,
        search_steps: int = 100,
        search_lr: float = 0.1,
        encoder: bool = False,
        encoder_dims: Sequence[int] = (64, 32),
        kappa: float = 1.0,
        encoder_learning_rate: float = 1e-3,
        criterion_rows: int = 512,
        **training: object,
    ) -> None:
        super().__init__(**training)
        self.latent_dim = latent_dim
        self.generator_dims = list(generator_dims)
        self.discriminator_dims = list(discriminator_dims)
        self.lam = lam
        self.search_steps = search_steps
        self.search_lr = search_lr
        self.encoder = encoder
        self.encoder_dims = list(encoder_dims)
        self.kappa = kappa
        self.encoder_learning_rate = encoder_learning_rate
        self.criterion_rows = criterion_rows
        self.exportable = encoder  # the latent search is an optimization, not a graph
        self.encoder_network: nn.Module | None = None
        self.encoder_history: TrainingHistory | None = None
        self.criterion_latents: torch.Tensor | None = None

    fitted_attributes = ("encoder_network",)

    def build_network(self, input_shape: tuple[int, ...]) -> AdversarialPair:
        return AdversarialPair(
            mlp(self.latent_dim, self.generator_dims, math.prod(input_shape)),
            Discriminator(input_shape, self.discriminator_dims),
        )

    def build_fitted_module(self, name: str) -> nn.Module:
        """f-AnoGAN's encoder E: x -> z."""
        return mlp(math.prod(self.network_input_shape), self.encoder_dims, self.latent_dim)

    def before_training(self, train: Dataset) -> None:
        """Fix the latents whose samples the validation criterion compares with real rows."""
        self.criterion_latents = torch.randn(
            self.criterion_rows, self.latent_dim, generator=self.generator
        )

    def _sample(self, n: int) -> torch.Tensor:
        return self.network.generator(torch.randn(n, self.latent_dim, generator=self.generator))

    def discriminator_loss(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fake = self._sample(len(batch))
        real_logits, _ = self.network.discriminator(batch)
        fake_logits, _ = self.network.discriminator(fake)
        return discriminator_bce(real_logits, fake_logits)

    def generator_loss(self, batch: torch.Tensor) -> torch.Tensor:
        fake_logits, _ = self.network.discriminator(self._sample(len(batch)))
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))

    def validation_criterion(self, data: Dataset) -> float:
        real = data[range(min(self.criterion_rows, len(data)))].flatten(1)
        return mmd(real, self.network.generator(self.criterion_latents[: len(real)]))

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        history = super().train_network(train, val)
        if self.encoder:
            self.encoder_history = self._train_encoder(train, val)
        return history

    def _train_encoder(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        """f-AnoGAN's izi_f step: only E learns; G and f stay as the GAN left them."""
        self.network.requires_grad_(False)
        self.encoder_network = self.build_fitted_module("encoder_network")

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return self._encoded_distance()(batch).score.mean()

        return self.fit_network(
            self.encoder_network,
            loss,
            train,
            val,
            learning_rate=self.encoder_learning_rate,
            description=f"{self.name} encoder",
        )

    def _encoded_distance(self) -> EncodedDistance:
        return EncodedDistance(
            self.encoder_network,
            self.network.generator,
            self.network.discriminator.features,
            self.kappa,
        )

    def scoring_module(self) -> ScoringModule:
        if not self.encoder:  # refused before any fit check: no fitted state would change it
            raise NotImplementedError(
                f"{self.name}: the latent search per input is not exportable as a graph; "
                "use encoder=True (f-AnoGAN) for an exportable scoring module"
            )
        return super().scoring_module()

    def score_head(self) -> nn.Module:
        return self._encoded_distance()

    def latent_search(self, real: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """z* for each flat standardized row, all rows at once: the loss is a sum of per-row
        terms and Adam is elementwise, so each z follows its own row's gradient."""
        latents = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([latents], lr=self.search_lr)
        features = self.network.discriminator.features
        for _ in range(self.search_steps):
            loss = anogan_distance(real, self.network.generator(latents), features, self.lam)
            (latents.grad,) = torch.autograd.grad(loss.sum(), latents)
            optimizer.step()
        return latents.detach()

    def _score(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        if self.encoder:
            return super()._score(x)
        real = self.preprocess(torch.as_tensor(x, dtype=torch.float32)).flatten(1)
        # the same seeded start on every call, so scoring the same rows gives the same scores
        starts = torch.randn(
            len(real), self.latent_dim, generator=torch.Generator().manual_seed(self.seed)
        )
        features = self.network.discriminator.features
        parts = []
        for rows, start in zip(real.split(batch_size), starts.split(batch_size), strict=True):
            latents = self.latent_search(rows, start)
            with torch.no_grad():
                fake = self.network.generator(latents)
                parts.append(anogan_distance(rows, fake, features, self.lam))
        return torch.cat(parts).double().numpy()
