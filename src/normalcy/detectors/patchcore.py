"""PatchCore: nearest-neighbour distance of each image patch to a coreset memory bank of normal
patch features (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from normalcy.detectors.coreset import greedy_coreset
from normalcy.detectors.image_features import BackboneDetector
from normalcy.detectors.knn import bank_constants, partial_squared_distances
from normalcy.detectors.registry import register

IMAGE_SCORES = ("max", "reweighted")


def patch_rows(patches: torch.Tensor) -> torch.Tensor:
    """`[N, D, h, w]` -> `[N, h*w, D]`: one row per patch."""
    return patches.flatten(2).transpose(1, 2)


class NearestPatchDistance(nn.Module):
    """Patch features `[N, D, h, w]` -> Euclidean distance of each patch to its nearest bank
    member `[N, h, w]`, in matmul form (||B||^2 - 2 x.B^T, min, + ||x||^2, sqrt): the bank is a
    graph constant and no `[N, P, M, D]` difference tensor is built.

    With `neighbours` (each bank member's nearest bank members `[M, b]`, itself first) the image
    score is the paper's reweighting (eq. 7, as anomalib computes it): the largest patch
    distance times 1 - softmax(distances of that patch to its nearest member's neighbourhood)[0],
    so a patch far from a dense region of the bank counts more than one near a sparse one."""

    def __init__(self, bank: torch.Tensor, neighbours: torch.Tensor | None = None) -> None:
        super().__init__()
        minus_two_bank_t, bank_sq = bank_constants(bank)
        self.register_buffer("minus_two_bank_t", minus_two_bank_t)
        self.register_buffer("bank_sq", bank_sq)
        self.register_buffer("bank", bank if neighbours is not None else None)
        self.register_buffer("neighbours", neighbours)

    def forward(self, patches: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = patches.shape
        rows = patch_rows(patches)
        partial = partial_squared_distances(rows, self.minus_two_bank_t, self.bank_sq)
        nearest_partial, nearest = partial.min(dim=2)
        distance = torch.sqrt((nearest_partial + (rows * rows).sum(dim=2)).clamp_min(0.0))
        scores = distance.reshape(n, h, w)
        if self.neighbours is None:
            return scores
        worst_score, worst = distance.max(dim=1)
        index = worst.reshape(n, 1, 1).expand(n, 1, rows.shape[2])
        worst_row = torch.gather(rows, 1, index)  # [N, 1, D]
        member = torch.gather(nearest, 1, worst.reshape(n, 1)).squeeze(1)
        support = self.bank[self.neighbours[member]]  # [N, b, D]
        support_distance = torch.sqrt(((support - worst_row) ** 2).sum(dim=2))
        weight = 1.0 - torch.softmax(support_distance, dim=1)[:, 0]
        return scores, weight * worst_score


def bank_neighbours(bank: torch.Tensor, count: int, chunk_rows: int = 1024) -> torch.Tensor:
    """Each bank member's `count` nearest members `[M, count]`, itself first (for reweighting)."""
    minus_two_bank_t, bank_sq = bank_constants(bank)
    count = min(count, len(bank))
    return torch.cat(
        [
            torch.topk(
                partial_squared_distances(chunk, minus_two_bank_t, bank_sq),
                count,
                dim=1,
                largest=False,
            ).indices
            for chunk in bank.split(chunk_rows)
        ]
    )


@register("patchcore")
class PatchCore(BackboneDetector):
    """Locally aware patch features of two backbone stages, a greedy k-center coreset of the
    training patches as the memory bank, nearest-neighbour patch distance as the anomaly map.

    The bank holds `coreset_fraction` of all training patches (at least one), chosen on a
    `projection_dim` random projection (see `coreset.greedy_coreset`); it is a buffer of the
    exported graph, so the file grows with it. `image_score`: `max` (largest patch distance) or
    `reweighted` (the paper's eq. 7 over `reweight_neighbours` bank neighbours)."""

    name = "patchcore"

    def __init__(
        self,
        coreset_fraction: float = 0.01,
        projection_dim: int | None = 128,
        image_score: str = "max",
        reweight_neighbours: int = 9,
        **backbone: Any,
    ) -> None:
        super().__init__(**backbone)
        if not 0.0 < coreset_fraction <= 1.0:
            raise ValueError(
                f"patchcore: coreset_fraction must be in (0, 1], got {coreset_fraction!r}"
            )
        if image_score not in IMAGE_SCORES:
            raise ValueError(
                f"patchcore: image_score must be one of {list(IMAGE_SCORES)}, got {image_score!r}"
            )
        if image_score == "reweighted" and self.image_score_from == "map":
            raise ValueError(
                "patchcore: image_score 'reweighted' scores the worst patch itself; it needs "
                "image_score_from 'patches', got 'map'"
            )
        self.coreset_fraction = coreset_fraction
        self.projection_dim = projection_dim
        self.image_score = image_score
        self.reweight_neighbours = reweight_neighbours
        self.bank: torch.Tensor | None = None
        self.neighbours: torch.Tensor | None = None

    def fit_patches(
        self, patches: torch.Tensor, generator: torch.Generator, val_patches: None = None
    ) -> None:
        rows = patch_rows(patches).reshape(-1, patches.shape[1])
        size = max(1, math.ceil(self.coreset_fraction * len(rows)))
        chosen = greedy_coreset(rows, size, generator, self.projection_dim)
        self.bank = rows[chosen].contiguous()
        self.neighbours = (
            bank_neighbours(self.bank, self.reweight_neighbours)
            if self.image_score == "reweighted"
            else None
        )

    def patch_head(self) -> nn.Module:
        return NearestPatchDistance(self.bank, self.neighbours)

    def method_state(self) -> dict[str, torch.Tensor]:
        state = {"bank": self.bank}
        if self.neighbours is not None:
            state["neighbours"] = self.neighbours
        return state

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        self.bank = state["bank"]
        self.neighbours = state.get("neighbours")
