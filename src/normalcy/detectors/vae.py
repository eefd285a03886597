"""Variational autoencoder scored by negative ELBO (Kingma & Welling, "Auto-Encoding Variational
Bayes", ICLR 2014), optionally as a likelihood ratio against a background model (Ren et al.,
"Likelihood Ratios for Out-of-Distribution Detection", NeurIPS 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from normalcy.artifact.names import FEATURE_CONTRIBUTIONS_NAME
from normalcy.detectors.autoencoder import mirrored_mlps
from normalcy.detectors.base import Prediction
from normalcy.detectors.networks import LOG_2PI
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector
from normalcy.detectors.training import Rows, TrainingHistory

SCORINGS = ("elbo", "likelihood_ratio")
MIN_VARIANCE = 1e-6  # standardized units
# The code's log-variance is kept in [-LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND]: a row far outside
# the training data can drive the encoder's output past 88, where exp() overflows float32 and
# the KL term, hence the score, becomes inf (seen on ADBench's shuttle). Variances of e^-30 to
# e^30 in standardized code units leave training untouched.
LOG_VARIANCE_BOUND = 30.0


class GaussianVAE(nn.Module):
    """Gaussian encoder q(z|x) = N(mu, diag exp(logvar)), prior N(0, I), Gaussian decoder
    p(x|z) = N(decoder(z), exp(log_variance) I) with one global variance.

    The global variance is learned in closed form, as its maximum-likelihood value (the mean
    squared residual; the "optimal sigma" of Rybkin et al., ICML 2021): per batch while training,
    and once on the training set at z = mu (`fit_variance`) for scoring. Gradient steps on a
    variance parameter converge far too slowly in a short training run, and a wrong fixed
    variance (e.g. 1 in standardized units) weighs the KL term arbitrarily against the data.

    `forward` is the deterministic negative-ELBO estimate used for scoring (z = mu)."""

    def __init__(self, n_features: int, hidden_dims: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.encoder, self.decoder = mirrored_mlps(
            n_features, hidden_dims, latent_dim, code_dim=2 * latent_dim
        )
        self.register_buffer("log_variance", torch.zeros(()))

    def negative_elbo(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, batch_variance: bool = False
    ) -> torch.Tensor:
        """-ELBO per sample `[N]`: Gaussian NLL of x given z plus KL(q(z|x) || p(z)) in closed
        form. `noise` ~ N(0, I) `[N, latent]` draws z = mu + sigma * noise (reparameterization,
        training); without it z = mu, a deterministic estimate (scoring, export).
        `batch_variance` uses the batch's maximum-likelihood variance instead of the fitted one."""
        return self.scored_terms(x, noise, batch_variance)[0]

    def scored_terms(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, batch_variance: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(-ELBO `[N]`, each feature's residual term `[N, d]`): the part of the Gaussian NLL
        that depends on the feature's reconstruction, `residual^2 / (2 variance)`. The rest of
        the -ELBO is a constant per feature plus the KL of the code, which no feature owns."""
        flat = x.flatten(1)
        mu, logvar = self.encoder(flat).chunk(2, dim=1)
        logvar = logvar.clamp(-LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND)
        z = mu if noise is None else mu + torch.exp(0.5 * logvar) * noise
        residual = (flat - self.decoder(z)) ** 2
        log_variance = self._ml_log_variance(residual) if batch_variance else self.log_variance
        residual_terms = 0.5 * residual * torch.exp(-log_variance)
        nll = residual_terms + 0.5 * (log_variance + LOG_2PI)
        kl = 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar)
        return nll.sum(dim=1) + kl.sum(dim=1), residual_terms

    @staticmethod
    def _ml_log_variance(residual: torch.Tensor) -> torch.Tensor:
        """log of the mean squared residual, floored (a perfect fit would send it to -inf)."""
        return residual.mean().detach().clamp_min(MIN_VARIANCE).log()

    def mean_squared_residual(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared residual per row `[N]` at z = mu."""
        flat = x.flatten(1)
        mu = self.encoder(flat).chunk(2, dim=1)[0]
        return ((flat - self.decoder(mu)) ** 2).mean(dim=1)

    def set_variance(self, mean_squared_residual: torch.Tensor) -> None:
        """Set the scoring variance to its maximum-likelihood value, the mean squared residual
        over every row and feature (`mean_squared_residual` of each row, averaged)."""
        with torch.no_grad():
            self.log_variance.copy_(self._ml_log_variance(mean_squared_residual))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.negative_elbo(x)


class NegativeELBO(nn.Module):
    """The VAE's -ELBO at z = mu as the score, each feature's residual term as its
    `feature_contributions` `[N, d]` (`GaussianVAE.scored_terms`)."""

    def __init__(self, model: GaussianVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Prediction:
        score, contributions = self.model.scored_terms(x)
        return Prediction(score, explanations={FEATURE_CONTRIBUTIONS_NAME: contributions})


class LikelihoodRatio(nn.Module):
    """-(log p_theta(x) - log p_background(x)), each log-likelihood estimated by its -ELBO;
    a feature's contribution is its residual term under the model minus under the background."""

    def __init__(self, model: GaussianVAE, background: GaussianVAE) -> None:
        super().__init__()
        self.model = model
        self.background = background

    def forward(self, x: torch.Tensor) -> Prediction:
        score, contributions = self.model.scored_terms(x)
        background_score, background_contributions = self.background.scored_terms(x)
        return Prediction(
            score - background_score,
            explanations={FEATURE_CONTRIBUTIONS_NAME: contributions - background_contributions},
        )


@register("vae")
class VAE(TorchDetector):
    """VAE trained on the ELBO with the reparameterization trick (noise from the detector's seeded
    generator); scored by the negative ELBO at z = mu plus the closed-form KL, so scores and the
    exported graph are deterministic (the training estimate is the sampled one).

    `scoring="likelihood_ratio"` (Ren et al. 2019): likelihoods of deep generative models are
    dominated by population-level statistics (Nalisnick et al. 2019, "Do Deep Generative Models
    Know What They Don't Know?"), so a second, background VAE is trained on inputs with a random
    `background_perturbation` fraction of (standardized) features replaced by N(0, 1) noise, and
    the score is -ELBO(model) - (-ELBO(background)); both VAEs are in the one scoring graph.
    The parameter is `scoring`, not `score`, because `score` is the Detector's scoring method.

    Outputs: `score` and `feature_contributions` `[N, d]`, each feature's reconstruction term
    of the -ELBO, squared residual / (2 variance) (for the likelihood ratio: the model's term
    minus the background's).
    """

    name = "vae"
    loss_per_row = True

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 8,
        scoring: str = "elbo",
        background_perturbation: float = 0.2,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if scoring not in SCORINGS:
            raise ValueError(
                f"{self.name}: unknown scoring {scoring!r}; expected one of {list(SCORINGS)}"
            )
        if not 0 < background_perturbation <= 1:
            raise ValueError(
                f"{self.name}: background_perturbation must be in (0, 1], "
                f"got {background_perturbation}"
            )
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.scoring = scoring
        self.background_perturbation = background_perturbation
        self.background: GaussianVAE | None = None
        self.background_history: TrainingHistory | None = None

    fitted_attributes = ("background",)

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return GaussianVAE(math.prod(input_shape), self.hidden_dims, self.latent_dim)

    def build_fitted_module(self, name: str) -> nn.Module:
        return self.build_network(self.network_input_shape)

    def _elbo_loss(self, vae: GaussianVAE, batch: torch.Tensor) -> torch.Tensor:
        """-ELBO per row: reparameterized sample while training, z = mu otherwise (validation)."""
        noise = None
        if vae.training:
            noise = torch.randn((len(batch), self.latent_dim), generator=self.generator)
        return vae.negative_elbo(batch, noise, batch_variance=True)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self._elbo_loss(self.network, batch)

    def perturb(self, batch: torch.Tensor) -> torch.Tensor:
        """Each feature replaced by N(0, 1) noise with probability `background_perturbation`."""
        flat = batch.flatten(1)
        mask = torch.rand(flat.shape, generator=self.generator) < self.background_perturbation
        return torch.where(mask, torch.randn(flat.shape, generator=self.generator), flat)

    def _background_loss(self, batch: torch.Tensor) -> torch.Tensor:
        # Fresh perturbations every training batch; validation batches come pre-perturbed.
        if self.background.training:
            batch = self.perturb(batch)
        return self._elbo_loss(self.background, batch)

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        history = super().train_network(train, val)
        self.network.set_variance(self.forward_data(self.network.mean_squared_residual, train))
        if self.scoring == "likelihood_ratio":
            self.background = self.build_network(self.network_input_shape)
            # validation rows are perturbed once, so every epoch is judged on the same rows
            fixed_val = None if val is None else Rows(self.forward_data(self.perturb, val))
            self.background_history = self.fit_network(
                self.background,
                self._background_loss,
                train,
                fixed_val,
                description=f"{self.name} background",
            )
            self.background.eval()
            perturbed = self.forward_data(self.perturb, train)
            residual = self.forward_data(self.background.mean_squared_residual, Rows(perturbed))
            self.background.set_variance(residual)
        return history

    def score_head(self) -> nn.Module:
        if self.scoring == "likelihood_ratio":
            return LikelihoodRatio(self.network, self.background)
        return NegativeELBO(self.network)
