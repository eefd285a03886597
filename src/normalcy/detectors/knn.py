"""k-nearest-neighbour distance to a memory bank of normal rows, with PatchCore's greedy coreset."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
from torch import nn

from normalcy.detectors.base import (
    Detector,
    FitData,
    Prediction,
    require_fitted,
    saved_parts,
)
from normalcy.detectors.coreset import greedy_coreset
from normalcy.detectors.networks import ScoringModule
from normalcy.detectors.preprocessing import fit_preprocessing, load_preprocessing
from normalcy.detectors.registry import register
from normalcy.detectors.specs import parse_preprocessing


def bank_constants(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-2 B^T `[F, M]`, ||B||^2 `[M]`): the bank's part of the distance, computed once."""
    return (-2.0 * bank.transpose(0, 1)).contiguous(), (bank * bank).sum(dim=-1)


def partial_squared_distances(
    x: torch.Tensor, minus_two_bank_t: torch.Tensor, bank_sq: torch.Tensor
) -> torch.Tensor:
    """||B||^2 - 2 x.B^T `[..., M]`: the squared distance less ||x||^2, which is constant along
    a row, so it can be added after a per-row top-k instead of to the whole `[N, M]` matrix.
    One fused matmul + bias (Gemm) for 2-d `x`; no `[..., M, F]` difference tensor."""
    if x.dim() == 2:
        return torch.addmm(bank_sq, x, minus_two_bank_t)
    return torch.matmul(x, minus_two_bank_t) + bank_sq


def squared_distances_to(
    x: torch.Tensor, minus_two_bank_t: torch.Tensor, bank_sq: torch.Tensor
) -> torch.Tensor:
    """`[..., F]` -> `[..., M]` squared Euclidean distances ||x||^2 - 2 x.B^T + ||B||^2 to a bank
    given by `bank_constants`, clamped at 0 (float32 cancellation can dip below it)."""
    partial = partial_squared_distances(x, minus_two_bank_t, bank_sq)
    return (partial + (x * x).sum(dim=-1, keepdim=True)).clamp_min(0.0)


def squared_distances(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """`[..., F]` x `[M, F]` -> `[..., M]` squared Euclidean distances (`squared_distances_to`)."""
    return squared_distances_to(x, *bank_constants(bank))


# Bank rows whose partial squared distances differ by less than this share of the row's
# distance scale count as equally near: far above float32 rounding (~1e-7), far below any real
# difference between neighbours.
TIE_TOLERANCE = 1e-5


def lowest_index_among_nearest(
    smallest: torch.Tensor, index: torch.Tensor, x_sq: torch.Tensor
) -> torch.Tensor:
    """`[N]` the lowest bank index among the k nearest whose partial distance is within
    `TIE_TOLERANCE` of the smallest. A plain `index[:, 0]` is whichever of two equally near rows
    (duplicate rows, integer-valued data) the runtime's top-k happened to put first, so torch and
    onnxruntime could name different rows for the same distance."""
    nearest = smallest.amin(dim=1, keepdim=True)
    near = smallest <= nearest + TIE_TOLERANCE * (x_sq + nearest.abs() + TIE_TOLERANCE)
    outside = torch.full_like(index, torch.iinfo(torch.int64).max)
    return torch.where(near, index, outside).amin(dim=1)


class KthNeighbourDistance(nn.Module):
    """Preprocessed rows -> Euclidean distance to the `k`-th nearest row of the constant bank:
    the k smallest of ||B||^2 - 2 x.B^T, unsorted (the k-th is their largest; sorting them cost
    onnxruntime a fifth of its throughput at k = 83), then + ||x||^2, clamp at 0 and sqrt.
    The explanation `nearest_row` is the bank index of the nearest row, from the same k
    (`lowest_index_among_nearest`)."""

    def __init__(self, bank: torch.Tensor, k: int) -> None:
        super().__init__()
        minus_two_bank_t, bank_sq = bank_constants(bank)
        self.register_buffer("minus_two_bank_t", minus_two_bank_t)
        self.register_buffer("bank_sq", bank_sq)
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> Prediction:
        x = x.flatten(1)
        partial = partial_squared_distances(x, self.minus_two_bank_t, self.bank_sq)
        smallest, index = torch.topk(partial, self.k, dim=1, largest=False, sorted=False)
        x_sq = (x * x).sum(dim=1, keepdim=True)
        kth = smallest.amax(dim=1) + x_sq[:, 0]
        nearest = lowest_index_among_nearest(smallest, index.to(torch.int64), x_sq)
        return Prediction(torch.sqrt(kth.clamp_min(0.0)), explanations={"nearest_row": nearest})


@register("knn")
class KNN(Detector):
    """Distance to the `k`-th nearest normal training row, in standardized units.

    The k-th nearest-neighbour distance outlier score of Ramaswamy, Rastogi & Shim (SIGMOD 2000;
    Angiulli & Pizzuti, PKDD 2002, sum the k distances instead), in the memory-bank form of
    PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)
    applied to feature vectors: `k=1` is PatchCore's nearest-neighbour score.

    The bank is every standardized training row, or, with `coreset_fraction` (share of the
    training rows) or `coreset_size` (a row count), a greedy k-center coreset of them (see
    `greedy_coreset`). A bank above `max_bank` rows is refused at fit, never silently subsampled:
    exact kNN stays exact, and the caller chooses the approximation (a coreset) or a larger
    `max_bank` (scoring cost and the exported file grow linearly with the bank).

    Scoring a training row itself finds that row in the bank at distance 0, so training scores
    are biased low (with `k=1` they are 0 up to float32 rounding); score held-out rows, as the
    pipeline does.

    Outputs: `score` and the explanation `nearest_row` (int64 `[N]`): the index in the bank of
    the nearest stored normal row (`coreset_indices[nearest_row]` is its training row index).
    `preprocessing` (default `standardize`) is the distance's space.

    `k_fraction` raises k to that share of the bank's rows (never below `k`). A cluster of m
    contaminating rows masks itself from every k < m (each finds its k neighbours among the
    others: the masking effect, Rousseeuw & van Zomeren 1990), so a kNN that must find the
    contamination of its own training rows, as in cleaning, needs k above the largest such
    cluster, which can only be bounded as a share of the rows.
    """

    name = "knn"

    def __init__(
        self,
        k: int = 5,
        k_fraction: float | None = None,
        coreset_fraction: float | None = None,
        coreset_size: int | None = None,
        projection_dim: int | None = 128,
        max_bank: int = 20_000,
        seed: int = 0,
        batch_size: int = 1024,
        preprocessing: str | Mapping[str, Any] = "standardize",
    ) -> None:
        parse_preprocessing(preprocessing)
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"knn: k must be an integer >= 1, got {k!r}")
        if k_fraction is not None and not 0.0 < k_fraction <= 1.0:
            raise ValueError(
                f"knn: k_fraction must be in (0, 1] (a share of the bank's rows), got "
                f"{k_fraction!r}"
            )
        if coreset_fraction is not None and coreset_size is not None:
            raise ValueError("knn: give coreset_fraction or coreset_size, not both")
        if coreset_fraction is not None and not 0.0 < coreset_fraction <= 1.0:
            raise ValueError(
                f"knn: coreset_fraction must be in (0, 1] (a share of the training rows), "
                f"got {coreset_fraction!r}"
            )
        if coreset_size is not None and coreset_size < k:
            raise ValueError(f"knn: coreset_size must be >= k={k}, got {coreset_size!r}")
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"knn: projection_dim must be >= 1 or None, got {projection_dim!r}")
        if max_bank < k:
            raise ValueError(f"knn: max_bank must be >= k={k}, got {max_bank!r}")
        if batch_size < 1:
            raise ValueError(f"knn: batch_size must be >= 1, got {batch_size!r}")
        self.k = int(k)
        self.k_fraction = k_fraction
        self.coreset_fraction = coreset_fraction
        self.coreset_size = coreset_size
        self.projection_dim = projection_dim
        self.max_bank = max_bank
        self.seed = seed
        self.batch_size = batch_size
        self.scoring_batch_size = batch_size
        self.preprocessing = preprocessing
        self.preprocess: nn.Module | None = None
        self.bank: torch.Tensor | None = None
        self.coreset_indices: torch.Tensor | None = None  # training rows kept in the bank

    def bank_size(self, n_rows: int) -> int:
        """Rows the bank will hold for `n_rows` training rows."""
        if self.coreset_size is not None:
            return min(self.coreset_size, n_rows)
        if self.coreset_fraction is not None:
            return max(1, math.ceil(self.coreset_fraction * n_rows))
        return n_rows

    def neighbours(self, bank_rows: int) -> int:
        """The k used with a bank of `bank_rows` rows: `k`, or `k_fraction` of the rows when
        that is larger (at most every row)."""
        if self.k_fraction is None:
            return self.k
        return min(max(self.k, math.ceil(self.k_fraction * bank_rows)), bank_rows)

    def _fit(self, data: FitData) -> None:
        train = data.train
        size = self.bank_size(len(train))
        if size > self.max_bank:
            raise ValueError(
                f"knn: the memory bank would hold {size} rows, above max_bank={self.max_bank}; "
                "set coreset_fraction or coreset_size to keep a greedy coreset of the training "
                "rows, or raise max_bank (scoring time and the exported model grow with it)"
            )
        if size < self.k:
            raise ValueError(
                f"knn: k={self.k} needs at least {self.k} rows in the memory bank, got {size} "
                f"(from {len(train)} training rows)"
            )
        self.preprocess = fit_preprocessing(self.preprocessing, train)
        with torch.no_grad():
            rows = self.preprocess(torch.as_tensor(train, dtype=torch.float32)).flatten(1)
        generator = torch.Generator().manual_seed(self.seed)
        self.coreset_indices = greedy_coreset(rows, size, generator, self.projection_dim)
        self.bank = rows[self.coreset_indices].contiguous()

    def scoring_module(self) -> ScoringModule:
        require_fitted(self.name, "scoring_module()", self.preprocess, self.bank)
        distance = KthNeighbourDistance(self.bank, self.neighbours(len(self.bank)))
        return ScoringModule(self.preprocess, distance).eval()

    def fitted_state(self) -> dict[str, torch.Tensor]:
        require_fitted(self.name, "saving", self.preprocess, self.bank)
        return saved_parts(
            preprocess=self.preprocess, bank=self.bank, coreset_indices=self.coreset_indices
        )

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        self.preprocess = load_preprocessing(self.preprocessing, input_shape, state)
        self.bank, self.coreset_indices = state["bank"], state["coreset_indices"]
        self.input_shape = tuple(input_shape)


@register("knn_wide")
class WideKNN(KNN):
    """kNN whose neighbourhood is wider than a contaminating cluster: k is `k_fraction` (5%)
    of the bank's rows, distances in min-max units.

    A training set that still holds a cluster of anomalies (cleaning misses clustered ones:
    each finds its neighbours among the others) teaches a k=5 kNN that the cluster is normal:
    on ADBench's optdigits, 5-NN ranks test anomalies below normal rows (AUROC 0.42), while the
    distance to the neighbour at 5% of the rows reaches past the cluster (0.84). A small k
    sees local anomalies that a wide one smooths over (letter: 0.84 against 0.75), so the two
    are separate candidates and consensus members. The 5% and min-max scaling are the settings
    chosen for cleaning (benchmarks/README.md, "Cleaning with a wide-k kNN")."""

    name = "knn_wide"

    def __init__(
        self,
        k_fraction: float | None = 0.05,
        preprocessing: str | Mapping[str, Any] = "minmax",
        **knn_params: Any,
    ) -> None:
        super().__init__(k_fraction=k_fraction, preprocessing=preprocessing, **knn_params)
