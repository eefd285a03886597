"""DAGMM (Zong et al., "Deep Autoencoding Gaussian Mixture Model for Unsupervised Anomaly
Detection", ICLR 2018): an autoencoder's latent code plus its reconstruction features, scored by
the energy (negative log-likelihood) of a Gaussian mixture fitted jointly on them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.base import Prediction, check_input
from normalcy.detectors.networks import LOG_2PI, mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector
from normalcy.detectors.training import TrainingHistory

MIN_WEIGHT = 1e-12  # floor of a component's total membership / mixture weight: no 0/0, no log 0


def reconstruction_features(x: torch.Tensor, x_hat: torch.Tensor, floor: float) -> torch.Tensor:
    """[relative Euclidean distance, cosine similarity] of x and its reconstruction, `[N, 2]`.

    Inputs are standardized, so the data mean sits at the origin and `||x||` can be ~0; the norms
    in both denominators are floored (smoothly, `sqrt(||.||^2 + floor^2)`) so rows near the mean do
    not get an arbitrarily large relative error."""
    x_norm = torch.sqrt((x**2).sum(dim=1) + floor**2)
    x_hat_norm = torch.sqrt((x_hat**2).sum(dim=1) + floor**2)
    euclid = torch.sqrt(((x - x_hat) ** 2).sum(dim=1) + 1e-12) / x_norm
    cosine = (x * x_hat).sum(dim=1) / (x_norm * x_hat_norm)
    return torch.stack([euclid, cosine], dim=1)


class DAGMMNetwork(nn.Module):
    """Compression network (autoencoder) and estimation network (MLP -> softmax memberships)."""

    def __init__(
        self,
        n_features: int,
        hidden_dims: Sequence[int],
        latent_dim: int,
        estimation_dims: Sequence[int],
        n_components: int,
        dropout: float,
        norm_floor: float,
    ) -> None:
        super().__init__()
        self.encoder = mlp(n_features, hidden_dims, latent_dim)
        self.decoder = mlp(latent_dim, list(hidden_dims)[::-1], n_features)
        layers: list[nn.Module] = []
        for layer in mlp(latent_dim + 2, estimation_dims, n_components):
            layers.append(layer)
            if isinstance(layer, nn.LeakyReLU):  # dropout after each hidden layer, as in the paper
                layers.append(nn.Dropout(dropout))
        self.estimation = nn.Sequential(*layers, nn.Softmax(dim=1))
        self.norm_floor = norm_floor

    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z = [z_c, rec_euclid, rec_cosine] `[N, latent_dim + 2]`, reconstruction `[N, d]`)."""
        code = self.encoder(x)
        x_hat = self.decoder(code)
        features = reconstruction_features(x.flatten(1), x_hat.flatten(1), self.norm_floor)
        return torch.cat([code, features], 1), x_hat

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, reconstruction, memberships gamma `[N, n_components]`, rows summing to 1)."""
        z, x_hat = self.compress(x)
        return z, x_hat, self.estimation(z)


def mixture_parameters(
    z: torch.Tensor, gamma: torch.Tensor, cov_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's (phi `[K]`, mu `[K, D]`, Sigma `[K, D, D]`) from soft memberships: the M-step
    of EM, differentiable, with `cov_eps * I` added so every Sigma_k is positive definite."""
    weight = gamma.sum(dim=0).clamp_min(MIN_WEIGHT)
    phi = weight / len(z)
    mu = gamma.T @ z / weight[:, None]
    diff = z[:, None, :] - mu[None]
    sigma = torch.einsum("nk,nkd,nke->kde", gamma, diff, diff) / weight[:, None, None]
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return phi, mu, sigma + cov_eps * eye


def mixture_energy(
    z: torch.Tensor, phi: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """E(z) = -log sum_k phi_k N(z | mu_k, Sigma_k) per row, via Cholesky factors (for training;
    `MixtureEnergy` is the frozen, exportable form)."""
    chol = torch.linalg.cholesky(sigma)
    diff = (z[:, None, :] - mu[None]).permute(1, 2, 0)  # [K, D, N]
    whitened = torch.linalg.solve_triangular(chol, diff, upper=False)
    mahalanobis = (whitened**2).sum(dim=1).T  # [N, K]
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(dim=1)
    log_terms = torch.log(phi.clamp_min(MIN_WEIGHT)) - 0.5 * (
        mahalanobis + log_det + z.shape[1] * LOG_2PI
    )
    return -torch.logsumexp(log_terms, dim=1)


class MixtureEnergy(nn.Module):
    """E(z) of a fixed mixture as a plain graph: matmuls and a max-shifted log-sum-exp.

    The constants come from float64: `whiten_k = L_k^-1` (Sigma_k = L_k L_k^T), so the
    Mahalanobis distance is `||whiten_k (z - mu_k)||^2` without forming Sigma_k^-1 (no
    cancellation), and `log_norm_k = log phi_k - log det(2 pi Sigma_k) / 2`."""

    def __init__(self, phi: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        phi, mu, sigma = phi.double(), mu.double(), sigma.double()
        chol = torch.linalg.cholesky(sigma)
        eye = torch.eye(sigma.shape[1], dtype=torch.float64).expand_as(sigma)
        whiten = torch.linalg.solve_triangular(chol, eye, upper=False)
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(dim=1)
        log_norm = torch.log(phi.clamp_min(MIN_WEIGHT)) - 0.5 * (log_det + mu.shape[1] * LOG_2PI)
        self.register_buffer("mu", mu.float())
        self.register_buffer("whiten_t", whiten.transpose(1, 2).contiguous().float())
        self.register_buffer("log_norm", log_norm.float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        diff = z[None, :, :] - self.mu[:, None, :]  # [K, N, D]
        mahalanobis = (torch.matmul(diff, self.whiten_t) ** 2).sum(dim=2).T  # [N, K]
        log_terms = self.log_norm - 0.5 * mahalanobis
        top = log_terms.max(dim=1, keepdim=True).values
        return -(top[:, 0] + torch.log(torch.exp(log_terms - top).sum(dim=1)))


class DAGMMEnergy(nn.Module):
    """Preprocessed input -> z -> energy under the fixed mixture."""

    def __init__(self, network: DAGMMNetwork, energy: MixtureEnergy) -> None:
        super().__init__()
        self.network = network
        self.energy = energy

    def forward(self, x: torch.Tensor) -> Prediction:
        return Prediction(self.energy(self.network.compress(x)[0]))


@register("dagmm")
class DAGMM(TorchDetector):
    """DAGMM (Zong et al., ICLR 2018): autoencoder + GMM estimation network, trained end to end.

    Loss = mean squared reconstruction error + `lambda_energy` * mean sample energy
    + `lambda_cov` * sum_k sum_j 1 / Sigma_k[j, j], where (phi, mu, Sigma) are computed from the
    batch's memberships (so the mixture is fitted without EM). After training, the mixture is fixed
    from the whole training set in one pass, and the score is the energy of z under it; the
    estimation network is not part of scoring.

    Deviations: LeakyReLU instead of tanh (the shared `mlp`); reconstruction features use
    standardized inputs with norms floored at `norm_floor`; the batch mixture and its energy are
    computed in float64 during training for stability.
    """

    name = "dagmm"
    explains_by_leaving_features_out = True  # the score does not split over features

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 2,
        n_components: int = 4,
        estimation_dims: Sequence[int] = (10,),
        dropout: float = 0.5,
        lambda_energy: float = 0.1,
        lambda_cov: float = 0.005,
        cov_eps: float = 1e-6,
        norm_floor: float = 1.0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if n_components < 1:
            raise ValueError(f"dagmm: n_components must be >= 1, got {n_components}")
        if latent_dim < 1:
            raise ValueError(f"dagmm: latent_dim must be >= 1, got {latent_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dagmm: dropout must be in [0, 1), got {dropout}")
        if cov_eps <= 0 or norm_floor <= 0:
            raise ValueError(
                f"dagmm: cov_eps and norm_floor must be > 0, got {cov_eps} and {norm_floor}"
            )
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.n_components = n_components
        self.estimation_dims = list(estimation_dims)
        self.dropout = dropout
        self.lambda_energy = lambda_energy
        self.lambda_cov = lambda_cov
        self.cov_eps = cov_eps
        self.norm_floor = norm_floor
        self.gmm_phi: torch.Tensor | None = None  # the fixed mixture (float64)
        self.gmm_mu: torch.Tensor | None = None
        self.gmm_sigma: torch.Tensor | None = None

    fitted_attributes = ("gmm_phi", "gmm_mu", "gmm_sigma")

    @property
    def gmm(self) -> dict[str, np.ndarray] | None:
        """The fixed mixture's phi, mu, Sigma (float64), to inspect."""
        if self.gmm_phi is None:
            return None
        return {
            "phi": self.gmm_phi.numpy(),
            "mu": self.gmm_mu.numpy(),
            "sigma": self.gmm_sigma.numpy(),
        }

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return DAGMMNetwork(
            math.prod(input_shape),
            self.hidden_dims,
            self.latent_dim,
            self.estimation_dims,
            self.n_components,
            self.dropout,
            self.norm_floor,
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        z, x_hat, gamma = self.network(batch)
        reconstruction = ((x_hat.flatten(1) - batch.flatten(1)) ** 2).sum(dim=1).mean()
        z, gamma = z.double(), gamma.double()
        phi, mu, sigma = mixture_parameters(z, gamma, self.cov_eps)
        energy = mixture_energy(z, phi, mu, sigma).mean()
        penalty = (1.0 / torch.diagonal(sigma, dim1=1, dim2=2)).sum()
        total = reconstruction + self.lambda_energy * energy + self.lambda_cov * penalty
        return total.float()

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        """The shared loop, then the mixture fixed from every training row (one pass)."""
        history = super().train_network(train, val)
        z, _, gamma = self.forward_data(self.network, train)
        self.gmm_phi, self.gmm_mu, self.gmm_sigma = mixture_parameters(
            z.double(), gamma.double(), self.cov_eps
        )
        return history

    def score_head(self) -> nn.Module:
        return DAGMMEnergy(self.network, MixtureEnergy(self.gmm_phi, self.gmm_mu, self.gmm_sigma))

    def memberships(self, x: np.ndarray) -> np.ndarray:
        """The estimation network's soft memberships gamma `[N, n_components]` for raw rows."""
        module = self.scoring_module()  # also checks that the detector is fitted
        x = check_input(x, self.name, "input", expected_shape=self.input_shape)
        with torch.no_grad():
            z = self.network.compress(module.preprocess(torch.as_tensor(x)))[0]
            return self.network.estimation(z).double().numpy()
