"""Normalizing flow scored by exact negative log-likelihood: RealNVP affine couplings (Dinh et
al., "Density estimation using Real NVP", ICLR 2017) or MAF autoregressive layers (Papamakarios
et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from normalcy.detectors.networks import LOG_2PI, mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector

COUPLINGS = ("realnvp", "maf")


def bounded(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """`bound * tanh(raw / bound)`: ~identity near 0, never beyond +-bound, so exp() of a
    log-scale cannot overflow and one layer cannot blow up the density."""
    return bound * torch.tanh(raw / bound)


def zero_last_layer(network: nn.Sequential) -> None:
    """Start each layer as the identity map (log-scale 0, shift 0): stable early training."""
    last = network[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class AffineCoupling(nn.Module):
    """RealNVP: y = b*x + (1-b)*(x*exp(s(b*x)) + t(b*x)), log|det J| = sum (1-b)*s."""

    def __init__(self, mask: torch.Tensor, hidden_dims: Sequence[int], bound: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.conditioner = mlp(len(mask), hidden_dims, 2 * len(mask))
        zero_last_layer(self.conditioner)
        self.bound = bound

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.conditioner(x * self.mask).chunk(2, dim=1)
        free = 1.0 - self.mask
        s = bounded(s, self.bound) * free
        return x * torch.exp(s) + t * free, s.sum(dim=1)


class _Mask(nn.Module):
    """Weight parametrization `weight * mask`: turns a shared `mlp` Linear into a MADE layer."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class AutoregressiveAffine(nn.Module):
    """MAF layer: u_i = (x_i - m_i(x_<i)) * exp(-a_i(x_<i)), log|det J| = -sum a_i, with
    (m, a) from one MADE pass (Germain et al. 2015), so the density costs one forward pass.

    `order` is the position of each input in the autoregressive order; layers alternate it."""

    def __init__(self, order: torch.Tensor, hidden_dims: Sequence[int], bound: float) -> None:
        super().__init__()
        d = len(order)
        self.made = mlp(d, hidden_dims, 2 * d)
        zero_last_layer(self.made)
        degrees = [order + 1]  # input i may influence outputs of degree > order[i] + 1
        for width in hidden_dims:
            degrees.append(torch.arange(width) % max(d - 1, 1) + 1)
        degrees.append((order + 1).repeat(2))  # outputs (m_i, a_i) of input i
        linears = [layer for layer in self.made if isinstance(layer, nn.Linear)]
        for k, linear in enumerate(linears):
            d_in, d_out = degrees[k], degrees[k + 1]
            last = k == len(linears) - 1
            mask = d_out[:, None] > d_in[None, :] if last else d_out[:, None] >= d_in[None, :]
            parametrize.register_parametrization(linear, "weight", _Mask(mask.float()))
        self.bound = bound

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self.made(x).chunk(2, dim=1)
        log_scale = bounded(log_scale, self.bound)
        return (x - shift) * torch.exp(-log_scale), -log_scale.sum(dim=1)


class FlowNLL(nn.Module):
    """Layers x -> u, then -log p(x) = ||u||^2 / 2 + d/2 log(2 pi) - sum of log|det J|."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u = f(x) `[N, d]`, log|det df/dx| `[N]`)."""
        u = x.flatten(1)
        log_det = torch.zeros_like(u[:, 0])
        for layer in self.layers:
            u, layer_log_det = layer(u)
            log_det = log_det + layer_log_det
        return u, log_det

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, log_det = self.transform(x)
        return 0.5 * (u**2).sum(dim=1) + 0.5 * u.shape[1] * LOG_2PI - log_det


def flow_layers(
    n_features: int, n_layers: int, hidden_dims: Sequence[int], coupling: str, bound: float
) -> list[nn.Module]:
    """RealNVP: alternating even/odd masks (d = 1: the one feature is transformed every layer,
    conditioned on nothing, i.e. a learned affine map). MAF: alternating natural/reversed order."""
    index = torch.arange(n_features)
    layers: list[nn.Module] = []
    for k in range(n_layers):
        if coupling == "realnvp":
            mask = ((index + k) % 2).float() if n_features > 1 else torch.zeros(1)
            layers.append(AffineCoupling(mask, hidden_dims, bound))
        else:
            order = index if k % 2 == 0 else index.flip(0)
            layers.append(AutoregressiveAffine(order, hidden_dims, bound))
    return layers


@register("flow")
class Flow(TorchDetector):
    """Normalizing flow with a standard normal base, trained on mean NLL; score = -log p(x).

    `coupling="realnvp"` (Dinh et al., ICLR 2017): `n_layers` affine couplings with alternating
    even/odd feature masks. `coupling="maf"` (Papamakarios et al., NeurIPS 2017): `n_layers` MADE
    affine autoregressive layers with alternating order. Log-scales are tanh-bounded to
    +-`log_scale_bound`; every layer starts as the identity. No batch-norm or ActNorm (inputs are
    standardized already), so the graph is the same in training and export.

    The density is of the standardized input: -log p_raw(x) = score + sum(log std), a constant
    shift that leaves the ranking (and any threshold on it) unchanged.
    """

    name = "flow"
    loss_per_row = True
    explains_by_leaving_features_out = True  # the score does not split over features

    def __init__(
        self,
        n_layers: int = 6,
        hidden_dims: Sequence[int] = (64, 64),
        coupling: str = "realnvp",
        log_scale_bound: float = 3.0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if n_layers < 1:
            raise ValueError(f"flow: n_layers must be >= 1, got {n_layers}")
        if coupling not in COUPLINGS:
            raise ValueError(f"flow: coupling must be one of {list(COUPLINGS)}, got {coupling!r}")
        if log_scale_bound <= 0:
            raise ValueError(f"flow: log_scale_bound must be > 0, got {log_scale_bound}")
        self.n_layers = n_layers
        self.hidden_dims = list(hidden_dims)
        self.coupling = coupling
        self.log_scale_bound = log_scale_bound

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return FlowNLL(
            flow_layers(
                math.prod(input_shape),
                self.n_layers,
                self.hidden_dims,
                self.coupling,
                self.log_scale_bound,
            )
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch)

    def score_head(self) -> nn.Module:
        return self.network
