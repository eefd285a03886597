"""Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018): the one-class and
soft-boundary objectives, autoencoder pretraining, and the guards against hypersphere collapse.

The distance-to-center pieces here (`squared_distance`, `DistanceToCenter`, `initial_center`)
are shared with the other hypersphere methods, which import them."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from normalcy.detectors.autoencoder import ReconstructionError
from normalcy.detectors.base import Prediction
from normalcy.detectors.networks import mlp
from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector
from normalcy.detectors.training import TrainingHistory

log = logging.getLogger(__name__)

OBJECTIVES = ("one-class", "soft-boundary")

# Normalization layers whose trainable affine shift acts like a bias (BatchNorm's beta etc.).
_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def squared_distance(embedding: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """||embedding - c||^2 per row `[N]`."""
    return ((embedding - center) ** 2).sum(dim=1)


class DistanceToCenter(nn.Module):
    """Squared distance of the embedding to the fixed center c, minus R^2 (0 unless the
    soft-boundary objective learned a radius), so the score is positive outside the sphere."""

    def __init__(self, network: nn.Module, center: torch.Tensor, radius_sq: float = 0.0) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("center", center)
        self.register_buffer("radius_sq", torch.tensor(float(radius_sq), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Prediction:
        return Prediction(squared_distance(self.network(x), self.center) - self.radius_sq)


def initial_center(embeddings: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Mean of the untrained network's outputs, each coordinate pushed at least `eps` from zero:
    a coordinate of c near zero is reachable by the trivial all-zero-weights solution."""
    center = embeddings.mean(dim=0)
    center[(center.abs() < eps) & (center < 0)] = -eps
    center[(center.abs() < eps) & (center >= 0)] = eps
    return center


def require_bias_free(network: nn.Module, who: str = "deep_svdd") -> None:
    """Refuse a network with trainable bias or affine (normalization) parameters.

    With a bias, all-zero weights plus a last-layer bias equal to c map every input onto c: the
    objective reaches its minimum 0 and the score is constant (hypersphere collapse, Ruff et al.
    2018, Prop. 2). Checked once, before training, for every hypersphere method that needs it."""
    offenders = [
        f"{module_name}.{param_name}".lstrip(".")
        for module_name, module in network.named_modules()
        for param_name, param in module.named_parameters(recurse=False)
        if param.requires_grad and ("bias" in param_name or isinstance(module, _NORM_LAYERS))
    ]
    if offenders:
        raise ValueError(
            f"{who}: the network has trainable bias/affine parameters {offenders[:5]}"
            f"{' ...' if len(offenders) > 5 else ''}; with them Deep SVDD can map every input "
            "onto the center c (hypersphere collapse: zero weights plus a bias equal to c give "
            "zero loss and a constant score). Build it bias-free: nn.Linear(..., bias=False), "
            "normalization layers with affine=False / elementwise_affine=False."
        )


def warn_if_collapsed(embeddings: torch.Tensor, who: str, rel_tol: float = 1e-6) -> float:
    """Log a warning when the embeddings of the training data (nearly) do not vary, i.e. the
    network has collapsed onto one point and its scores carry no information. Returns the
    total variance. The tolerance is relative to ||mean||^2 (at least 1), so it is unit-free."""
    variance = float(embeddings.var(dim=0).sum()) if len(embeddings) > 1 else 0.0
    scale = max(1.0, float((embeddings.mean(dim=0) ** 2).sum()))
    if variance <= rel_tol * scale:
        log.warning(
            "%s: the embedding of the training data has collapsed (total variance %.3g): the "
            "network maps (almost) every input to the same point, so its scores are not "
            "informative; use fewer epochs, more weight decay, or pretraining",
            who,
            variance,
        )
    return variance


def radius_sq_for(distances_sq: torch.Tensor, nu: float) -> float:
    """R^2 with R the (1 - nu) quantile of the distances ||phi(x) - c||: a fraction of about nu
    of the points lies outside the sphere (the paper's choice of R for fixed weights)."""
    return float(torch.quantile(distances_sq.clamp_min(0).sqrt().double(), 1.0 - nu) ** 2)


@register("deep_svdd")
class DeepSVDD(TorchDetector):
    """Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018).

    A bias-free MLP maps the data into a hypersphere around a fixed center c.
    `objective="one-class"` minimizes the mean of ||phi(x) - c||^2; score = that distance.
    `objective="soft-boundary"` minimizes R^2 + 1/nu * mean(max(0, ||phi(x) - c||^2 - R^2));
    R is set after each epoch past `warmup_epochs` (and once more after training) to the
    (1 - nu) quantile of the training distances, so about a fraction nu of the training data
    lies outside; score = ||phi(x) - c||^2 - R^2.
    `pretrain_epochs > 0` first trains a bias-free autoencoder whose encoder is this network
    and sets c from the pretrained outputs (the paper's initialization).

    Bias terms would let the network collapse every input onto c, so a network with any is
    refused, and c is fixed from the initial forward pass, never learned.
    """

    name = "deep_svdd"
    loss_per_row = True
    explains_by_leaving_features_out = True  # the score does not split over features

    def __init__(
        self,
        hidden_dims: Sequence[int] = (64, 32),
        latent_dim: int = 16,
        objective: str = "one-class",
        nu: float = 0.1,
        warmup_epochs: int = 10,
        pretrain_epochs: int = 0,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if objective not in OBJECTIVES:
            raise ValueError(
                f"{self.name}: objective must be one of {OBJECTIVES}, got {objective!r}"
            )
        if isinstance(nu, bool) or not isinstance(nu, int | float) or not 0 < nu <= 1:
            raise ValueError(
                f"{self.name}: nu must be in (0, 1] (the fraction of training data allowed "
                f"outside the sphere), got {nu!r}"
            )
        for what, value in (("warmup_epochs", warmup_epochs), ("pretrain_epochs", pretrain_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.name}: {what} must be an integer >= 0, got {value!r}")
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.objective = objective
        self.nu = float(nu)
        self.warmup_epochs = warmup_epochs
        self.pretrain_epochs = pretrain_epochs
        self.center: torch.Tensor | None = None
        self.radius_sq = 0.0
        self.radius_sq_history: list[float] = []  # R^2 after each epoch-end update
        self.pretrain_history: TrainingHistory | None = None
        self._train: torch.Tensor | None = None

    fitted_attributes = ("center", "radius_sq")

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return mlp(math.prod(input_shape), self.hidden_dims, self.latent_dim, bias=False)

    def before_training(self, train: Dataset) -> None:
        require_bias_free(self.network, self.name)

    def pretrain(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        """Train `self.network` as the encoder of a bias-free autoencoder (mirrored decoder)."""
        n_features = math.prod(self.network_input_shape)
        decoder = mlp(self.latent_dim, self.hidden_dims[::-1], n_features, bias=False)
        reconstruction = ReconstructionError(nn.Sequential(self.network, decoder))
        return self.fit_network(
            reconstruction,
            lambda batch: reconstruction(batch).score.mean(),
            train,
            val,
            epochs=self.pretrain_epochs,
            description=f"{self.name} pretrain",
        )

    def train_network(self, train: Dataset, val: Dataset | None) -> TrainingHistory:
        """Optional pretraining, c from the (pre)trained network, then the shared loop; the
        soft-boundary radius is refitted after each epoch and for the final weights."""
        if self.pretrain_epochs > 0:
            self.pretrain_history = self.pretrain(train, val)
        self.center = initial_center(self.forward_data(self.network, train))
        self.radius_sq, self.radius_sq_history = 0.0, []
        self._train = train
        try:
            history = super().train_network(train, val)
        finally:
            self._train = None
        embeddings = self.forward_data(self.network, train)
        if self.objective == "soft-boundary":
            self.radius_sq = radius_sq_for(squared_distance(embeddings, self.center), self.nu)
        warn_if_collapsed(embeddings, self.name)
        return history

    def on_epoch_end(self, epoch: int) -> None:
        """Soft boundary: after the warm-up, refit R to the (1 - nu) quantile of the training
        distances (the exact minimizer of the objective for the current weights)."""
        if self.objective != "soft-boundary" or self._train is None:
            return
        if epoch + 1 >= max(self.warmup_epochs, 1):
            distances = squared_distance(self.forward_data(self.network, self._train), self.center)
            self.radius_sq = radius_sq_for(distances, self.nu)
            self.radius_sq_history.append(self.radius_sq)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        distances = squared_distance(self.network(batch), self.center)
        if self.objective == "one-class":
            return distances
        return self.radius_sq + torch.relu(distances - self.radius_sq) / self.nu

    def score_head(self) -> nn.Module:
        return DistanceToCenter(self.network, self.center, self.radius_sq)
