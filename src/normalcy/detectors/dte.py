"""DTE: anomaly scores from how much diffusion a row seems to have gone through.

Livernoche, Jain, Hezaveh and Ravanbakhsh, "On Diffusion Modeling for Anomaly Detection", ICLR
2024. Normal rows are noised by a DDPM forward process, `x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e`,
and a network learns to tell the diffusion time `t` from `x_t` alone. A clean normal row looks
like `t = 0`; a row off the normal data looks as if it had been noised for a long time, so the
estimated time is the anomaly score. This is the paper's parametric categorical variant (DTE-C):
`t` is cut into `n_bins` equal bins, the network classifies the bin by cross-entropy, and the
score is the expected bin under the predicted distribution (the non-parametric DTE-NP ranks like
kNN, which normalcy already has as `knn`). The paper reports DTE-C among the best methods on
ADBench's clean-training setting; with contaminated training data it loses ground like every
method, which is what cleaning is for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normalcy.detectors.base import Prediction
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector


def cumulative_alphas(n_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """`a_t = prod_{s <= t} (1 - beta_s)` of DDPM's linear beta schedule (Ho et al. 2020)."""
    betas = torch.linspace(beta_start, beta_end, n_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class ExpectedDiffusionBin(nn.Module):
    """Preprocessed rows -> the expected diffusion-time bin under the network's softmax."""

    def __init__(self, network: nn.Module, n_bins: int) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("bins", torch.arange(n_bins, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Prediction:
        probabilities = torch.softmax(self.network(x), dim=1)
        return Prediction(probabilities @ self.bins)


@register("dte")
class DTE(TorchDetector):
    """Diffusion time estimation, categorical (DTE-C; Livernoche et al., ICLR 2024).

    An MLP (`hidden_dims`) classifies which of `n_bins` equal bins of the `n_steps` DDPM steps
    (linear betas from `beta_start` to `beta_end`, the paper's defaults) a noised training row
    was drawn at; the score of a row is the expected bin it is given (0 .. n_bins - 1). The
    validation loss uses the same noise draws every epoch, so early stopping compares like with
    like.
    """

    name = "dte"

    def __init__(
        self,
        hidden_dims: Sequence[int] = (256, 512, 256),
        n_bins: int = 7,
        n_steps: int = 400,
        beta_start: float = 1e-4,
        beta_end: float = 0.01,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if n_bins < 2:
            raise ValueError(f"dte: n_bins must be >= 2, got {n_bins}")
        if n_steps < n_bins:
            raise ValueError(f"dte: n_steps must be >= n_bins={n_bins}, got {n_steps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                "dte: expected 0 < beta_start <= beta_end < 1 (the DDPM noise schedule), got "
                f"beta_start={beta_start}, beta_end={beta_end}"
            )
        self.hidden_dims = list(hidden_dims)
        self.n_bins = n_bins
        self.n_steps = n_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.alphas = cumulative_alphas(n_steps, beta_start, beta_end)

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return mlp(math.prod(input_shape), self.hidden_dims, self.n_bins)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        # Training draws from the detector's generator; validation from a fixed seed per batch.
        generator = self.generator if self.network.training else torch.Generator()
        if not self.network.training:
            generator.manual_seed(self.seed)
        rows = batch.flatten(1)
        steps = torch.randint(self.n_steps, (len(rows),), generator=generator)
        noise = torch.randn(rows.shape, generator=generator)
        alpha = self.alphas[steps].unsqueeze(1)
        noised = alpha.sqrt() * rows + (1.0 - alpha).sqrt() * noise
        bins = steps * self.n_bins // self.n_steps
        return F.cross_entropy(self.network(noised), bins)

    def score_head(self) -> nn.Module:
        return ExpectedDiffusionBin(self.network, self.n_bins)
