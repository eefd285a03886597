"""PaDiM: a Gaussian per patch position over backbone features, Mahalanobis distance as the
anomaly map (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization", ICPR 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normalcy.detectors.image_features import BackboneDetector
from normalcy.detectors.registry import register


class PositionMahalanobis(nn.Module):
    """Patch features `[N, D, h, w]` -> Mahalanobis distance of each position's chosen channels
    to that position's Gaussian `[N, h, w]`: one batched matmul over positions, the means and
    inverse covariances graph constants."""

    def __init__(self, channels: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        self.register_buffer("channels", channels)  # [d] indices into the D patch channels
        self.register_buffer("mean", mean)  # [P, d]
        self.register_buffer("precision", precision)  # [P, d, d] inverse covariances

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, _, h, w = patches.shape
        rows = patches.index_select(1, self.channels).flatten(2).permute(2, 0, 1)  # [P, N, d]
        delta = rows - self.mean.unsqueeze(1)
        squared = (torch.bmm(delta, self.precision) * delta).sum(dim=2)  # [P, N]
        return torch.sqrt(squared.clamp_min(0.0)).transpose(0, 1).reshape(n, h, w)


def position_gaussians(rows: torch.Tensor, covariance_eps: float) -> tuple[torch.Tensor, ...]:
    """(mean `[P, d]`, inverse of covariance + eps I `[P, d, d]`) of `rows` `[P, N, d]`, in
    float64 (the regularizer keeps each covariance invertible with fewer images than channels)."""
    rows = rows.double()
    mean = rows.mean(dim=1)
    centred = rows - mean.unsqueeze(1)
    covariance = centred.transpose(1, 2) @ centred / max(rows.shape[1] - 1, 1)
    covariance += covariance_eps * torch.eye(rows.shape[2], dtype=torch.float64)
    # By Cholesky (the regularized covariance is positive definite): torch's batched LU inverse
    # fails on this machine's MKL with 2 threads from about 150 channels up, even for identity
    # matrices ("Pivots given to lu_solve must all be greater or equal to 1"). Contiguous: bmm
    # would otherwise sum in another order than for the same matrix loaded from a saved detector
    # (scores off in the 7th digit).
    precision = torch.cholesky_inverse(torch.linalg.cholesky(covariance))
    return mean.float(), precision.float().contiguous()


@register("padim")
class PaDiM(BackboneDetector):
    """A multivariate Gaussian per patch position of the training images' patch features
    (`random_channels` of them chosen at random, seeded, as in the paper; all when fewer), and the
    Mahalanobis distance to it as each patch's score. The exported graph holds a `d x d` inverse
    covariance per position: `h * w * d^2` floats (41 MB for 32 x 32 positions and d = 100)."""

    name = "padim"

    def __init__(
        self,
        random_channels: int = 100,
        covariance_eps: float = 0.01,
        neighbourhood: int = 1,
        **backbone: Any,
    ) -> None:
        super().__init__(neighbourhood=neighbourhood, **backbone)
        if random_channels < 1:
            raise ValueError(f"padim: random_channels must be >= 1, got {random_channels!r}")
        if covariance_eps <= 0:
            raise ValueError(f"padim: covariance_eps must be > 0, got {covariance_eps!r}")
        self.random_channels = random_channels
        self.covariance_eps = covariance_eps
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    def fit_patches(
        self, patches: torch.Tensor, generator: torch.Generator, val_patches: None = None
    ) -> None:
        n_channels = patches.shape[1]
        order = torch.randperm(n_channels, generator=generator)
        self.channels = order[: min(self.random_channels, n_channels)].sort().values
        rows = patches.index_select(1, self.channels).flatten(2).permute(2, 0, 1)
        self.mean, self.precision = position_gaussians(rows, self.covariance_eps)

    def patch_head(self) -> nn.Module:
        return PositionMahalanobis(self.channels, self.mean, self.precision)

    def method_state(self) -> dict[str, torch.Tensor]:
        return {"channels": self.channels, "mean": self.mean, "precision": self.precision}

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        self.channels, self.mean, self.precision = (
            state["channels"],
            state["mean"],
            state["precision"],
        )
