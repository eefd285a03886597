"""FastFlow: a 2-d normalizing flow per backbone stage, trained on the training images' feature
maps by exact negative log-likelihood; a position's likelihood under the flow is its anomaly
map (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing
Flows", arXiv 2111.07677, 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from normalcy.detectors.base import saved_parts, under_prefix
from normalcy.detectors.flow import LOG_2PI, bounded, zero_last_layer
from normalcy.detectors.image_features import BackboneDetector, local_average
from normalcy.detectors.registry import register
from normalcy.detectors.training import TrainingHistory, train_network
from normalcy.threads import count_parameters, torch_threads, training_threads

POSITION_SCORES = ("likelihood", "nll")


class StageMaps(nn.Module):
    """The chosen stages' feature maps as they are (a tuple, one per stage), each optionally
    averaged over a `neighbourhood` window: FastFlow models every stage at its own resolution."""

    def __init__(self, neighbourhood: int) -> None:
        super().__init__()
        self.neighbourhood = int(neighbourhood)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(local_average(feature_map, self.neighbourhood) for feature_map in maps)


def subnet(in_channels: int, hidden: int, out_channels: int, kernel: int) -> nn.Sequential:
    """FastFlow's coupling subnet: conv (k x k) -> ReLU -> conv (k x k), same padding; the last
    conv starts at zero so the block starts as the identity."""
    network = nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.Conv2d(hidden, out_channels, kernel, padding=kernel // 2),
    )
    zero_last_layer(network)
    return network


class ConvAffineCoupling(nn.Module):
    """Channels permuted (a fixed seeded permutation), then the second part scaled and shifted
    by a conv subnet of the first: y2 = x2 * exp(s(x1)) + t(x1), log|det J| = sum of s over
    channels and positions (s tanh-bounded, so exp cannot overflow)."""

    def __init__(
        self, permutation: torch.Tensor, hidden: int, kernel: int, log_scale_bound: float
    ) -> None:
        super().__init__()
        channels = len(permutation)
        self.register_buffer("permutation", permutation)
        self.split = channels // 2
        self.subnet = subnet(self.split, hidden, 2 * (channels - self.split), kernel)
        self.log_scale_bound = log_scale_bound

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.index_select(1, self.permutation)
        kept, changed = x[:, : self.split], x[:, self.split :]
        log_scale, shift = self.subnet(kept).chunk(2, dim=1)
        log_scale = bounded(log_scale, self.log_scale_bound)
        changed = changed * torch.exp(log_scale) + shift
        return torch.cat([kept, changed], dim=1), log_scale.flatten(1).sum(dim=1)


class StageFlow(nn.Module):
    """One stage: features standardized per channel (training mean and std, graph constants),
    then `n_blocks` couplings whose subnets alternate 3x3 and 1x1 kernels (FastFlow)."""

    def __init__(
        self,
        channels: int,
        n_blocks: int,
        hidden_ratio: float,
        log_scale_bound: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("scale", torch.ones(1, channels, 1, 1))
        hidden = max(1, round(hidden_ratio * channels))
        self.blocks = nn.ModuleList(
            ConvAffineCoupling(
                torch.randperm(channels, generator=generator),
                hidden,
                3 if k % 2 == 0 else 1,
                log_scale_bound,
            )
            for k in range(n_blocks)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z `[N, C, h, w]`, log|det dz/dx| `[N]`) of the standardized features."""
        z = (x - self.mean) / self.scale
        log_det = torch.zeros_like(z[:, 0, 0, 0])
        for block in self.blocks:
            z, block_log_det = block(z)
            log_det = log_det + block_log_det
        return z, log_det


def standard_normal_nll(z: torch.Tensor) -> torch.Tensor:
    """-log N(z; 0, 1) elementwise."""
    return 0.5 * z**2 + 0.5 * LOG_2PI


class FeatureFlows(nn.Module):
    """One `StageFlow` per stage. `loss`: the exact NLL per dimension, summed over stages (the
    training objective); `forward`: the anomaly map at the first stage's resolution, per
    position and stage the mean over channels of -log N(z; 0, 1) (`position_score: nll`) or
    FastFlow's -exp(mean log N(z; 0, 1)) (`likelihood`), upsampled and averaged over stages.
    The -exp puts every stage in [-1, 0), so no stage swamps the others (on the pasted squares
    of tests/test_image_detectors.py the coarsest one did: pixel AUROC 0.74 against 0.93), but
    it saturates at 0 for every clearly anomalous position."""

    def __init__(self, flows: Sequence[StageFlow], position_score: str) -> None:
        super().__init__()
        self.flows = nn.ModuleList(flows)
        self.position_score = position_score

    def loss(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for flow, feature_map in zip(self.flows, maps, strict=True):
            z, log_det = flow(feature_map)
            nll = standard_normal_nll(z).flatten(1).sum(dim=1) - log_det
            total = total + (nll / z[0].numel()).mean()
        return total

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        stage_maps = []
        for flow, feature_map in zip(self.flows, maps, strict=True):
            position_nll = standard_normal_nll(flow(feature_map)[0]).mean(dim=1, keepdim=True)
            stage_map = (
                -torch.exp(-position_nll) if self.position_score == "likelihood" else position_nll
            )
            if stage_map.shape[-2:] != size:
                stage_map = F.interpolate(
                    stage_map, size=size, mode="bilinear", align_corners=False
                )
            stage_maps.append(stage_map)
        return torch.cat(stage_maps, dim=1).mean(dim=1)


def channel_statistics(feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per channel `[1, C, 1, 1]` over images and positions, in float64 (the std
    floored so a dead channel divides by something)."""
    values = feature_map.double().transpose(0, 1).flatten(1)
    mean, std = values.mean(dim=1), values.std(dim=1).clamp_min(1e-6)
    return mean.float().reshape(1, -1, 1, 1), std.float().reshape(1, -1, 1, 1)


@register("fastflow")
class FastFlow(BackboneDetector):
    """Per backbone stage, a 2-d flow of `n_blocks` affine couplings (conv subnets alternating
    3x3 and 1x1 kernels, `hidden_ratio` x the stage's channels wide) on the per-channel
    standardized feature map, trained with Adam on the training images' exact NLL and stopped
    early on the validation images' NLL (seeded; threads by `normalcy.threads`). Patch score:
    -exp(mean log-likelihood of the position's channels under the base Gaussian), or their mean
    NLL (`position_score`), averaged over stages (see `FeatureFlows`); image score and map as
    the other image detectors'."""

    name = "fastflow"
    uses_val_patches: ClassVar[bool] = True

    def __init__(
        self,
        n_blocks: int = 8,
        hidden_ratio: float = 1.0,
        log_scale_bound: float = 2.0,
        position_score: str = "likelihood",
        neighbourhood: int = 1,
        epochs: int = 40,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-5,
        patience: int = 5,
        **backbone: Any,
    ) -> None:
        super().__init__(neighbourhood=neighbourhood, **backbone)
        for name, value in (("n_blocks", n_blocks), ("patience", patience)):
            if value < 1:
                raise ValueError(f"fastflow: {name} must be >= 1, got {value!r}")
        for name, value in (
            ("hidden_ratio", hidden_ratio),
            ("log_scale_bound", log_scale_bound),
            ("learning_rate", learning_rate),
        ):
            if value <= 0:
                raise ValueError(f"fastflow: {name} must be > 0, got {value!r}")
        if position_score not in POSITION_SCORES:
            raise ValueError(
                f"fastflow: position_score must be one of {list(POSITION_SCORES)}, "
                f"got {position_score!r}"
            )
        self.n_blocks = n_blocks
        self.hidden_ratio = hidden_ratio
        self.log_scale_bound = log_scale_bound
        self.position_score = position_score
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.patience = patience
        self.flows: FeatureFlows | None = None
        self.history: TrainingHistory | None = None

    def patch_module(self) -> StageMaps:
        return StageMaps(self.neighbourhood)

    def build_flows(self) -> FeatureFlows:
        """Untrained flows for the extractor's stages; the seed fixes the permutations and the
        initial weights without touching the global RNG."""
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return FeatureFlows(
                [
                    StageFlow(
                        channels, self.n_blocks, self.hidden_ratio, self.log_scale_bound, generator
                    )
                    for channels in self.extractor.channels
                ],
                self.position_score,
            )

    def fit_patches(
        self,
        patches: tuple[torch.Tensor, ...],
        generator: torch.Generator,
        val_patches: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        flows = self.build_flows()
        for flow, feature_map in zip(flows.flows, patches, strict=True):
            flow.mean, flow.scale = channel_statistics(feature_map)
        n_threads = training_threads(count_parameters(flows), self.threads)
        with torch_threads(n_threads):
            self.history = train_network(
                flows,
                flows.loss,
                TensorDataset(*patches),  # batches are tuples of stage maps
                TensorDataset(*val_patches) if val_patches is not None else None,
                epochs=self.epochs,
                batch_size=self.batch_size,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
                patience=self.patience,
                generator=generator,
                description=self.name,
            )
        self.flows = flows.eval()

    def patch_head(self) -> nn.Module:
        return self.flows

    def method_state(self) -> dict[str, torch.Tensor]:
        return saved_parts(flows=self.flows)

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        self.flows = self.build_flows()
        self.flows.load_state_dict(under_prefix("flows", state))
        self.flows.eval()
