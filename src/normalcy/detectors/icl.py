"""ICL: anomaly scores from how badly a row's feature windows match their complements.

Shenkar and Wolf, "Anomaly Detection for Tabular Data with Internal Contrastive Learning", ICLR
2022. Every window of `k` consecutive features of a row is paired with its complement (the other
`d - k` features); one encoder maps the windows, another the complements, into a shared space on
the unit sphere. Training maximizes, by an InfoNCE loss over the row's own windows, the
similarity of each complement to its window against the row's other windows: the relation
between a part of the features and the rest is what normal rows share. A row whose complements
no longer pick out their own windows is anomalous; its anomaly score is the same loss.

The encoders follow the authors' code: a linear layer per width, then an activation (Tanh
after the complement encoder's first layer, LeakyReLU(0.2) elsewhere, the output included), and
a batch normalization per window position after each hidden layer; in eval mode it is a fixed
affine map, so a row's score never depends on the rows scored with it. Embeddings are
normalized per embedding (the paper's cosine similarity). All windows serve as negatives (the
authors subsample them only past 1000 windows, which the paper's rule for `k` never reaches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normalcy.detectors.registry import register
from normalcy.detectors.torch_detector import TorchDetector


def paper_window_size(n_features: int) -> int:
    """The paper's `k` for `d` features: 2 up to 40 features, 10 up to 160, `d - 150` beyond
    (so wide tables keep at most 151 windows); at most `d - 1`, so a complement is never empty."""
    if n_features <= 40:
        window_size = 2
    elif n_features <= 160:
        window_size = 10
    else:
        window_size = n_features - 150
    return min(window_size, n_features - 1)


def window_indices(n_features: int, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows `[m, k]`, complements `[m, d - k]`) as feature indices, one row per window
    start, `m = d - k + 1`; each complement keeps its features in their original order."""
    starts = torch.arange(n_features - window_size + 1).unsqueeze(1)
    windows = starts + torch.arange(window_size)
    inside = torch.zeros(len(windows), n_features, dtype=torch.bool)
    inside.scatter_(1, windows, True)
    complements = torch.arange(n_features).expand_as(inside)[~inside].reshape(len(windows), -1)
    return windows, complements


def part_encoder(
    in_features: int,
    hidden_dims: Sequence[int],
    out_features: int,
    n_windows: int,
    first_activation: nn.Module,
) -> nn.Sequential:
    """The authors' encoder on `[N, m, in_features]` parts: Linear + activation per layer,
    `first_activation` after the first, LeakyReLU(0.2) after the others (the output too), and a
    BatchNorm over the `m` window positions after each hidden layer."""
    dims = [in_features, *hidden_dims, out_features]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers += [nn.Linear(d_in, d_out), first_activation if i == 0 else nn.LeakyReLU(0.2)]
        if i < len(dims) - 2:
            layers.append(nn.BatchNorm1d(n_windows))
    return nn.Sequential(*layers)


class InternalContrastiveLoss(nn.Module):
    """Preprocessed rows `[N, d]` -> the mean InfoNCE loss over each row's windows `[N]`.

    For window j, the logits are the cosine similarities of complement j's embedding to every
    window's embedding of the same row, over `temperature`; the target is window j. The
    loss is the training objective (its batch mean) and the anomaly score."""

    def __init__(
        self,
        window_encoder: nn.Module,
        complement_encoder: nn.Module,
        windows: torch.Tensor,
        complements: torch.Tensor,
        temperature: float,
    ) -> None:
        super().__init__()
        self.window_encoder = window_encoder
        self.complement_encoder = complement_encoder
        # Flat feature indices: one index_select per row gathers every window (or complement).
        self.register_buffer("window_features", windows.flatten())
        self.register_buffer("complement_features", complements.flatten())
        self.n_windows, self.window_size = windows.shape
        self.complement_size = complements.shape[1]
        self.temperature = temperature

    def embed(
        self, rows: torch.Tensor, features: torch.Tensor, size: int, encoder: nn.Module
    ) -> torch.Tensor:
        """`[N, m, u]` unit embeddings of each row's `m` parts of `size` features."""
        parts = rows.index_select(1, features).reshape(-1, self.n_windows, size)
        return F.normalize(encoder(parts), dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(1)
        windows = self.embed(rows, self.window_features, self.window_size, self.window_encoder)
        complements = self.embed(
            rows, self.complement_features, self.complement_size, self.complement_encoder
        )
        logits = torch.bmm(complements, windows.transpose(1, 2)) / self.temperature
        matched = (complements * windows).sum(dim=2) / self.temperature
        return (torch.logsumexp(logits, dim=2) - matched).mean(dim=1)


@register("icl")
class ICL(TorchDetector):
    """Internal contrastive learning (Shenkar & Wolf, ICLR 2022).

    `window_size` is the paper's `k` (null: 2 up to 40 features, 10 up to 160, `d - 150`
    beyond); it must leave at least one feature in the complement. The complement encoder has
    `hidden_dims` (the paper's h, 2h with h = 200), the window encoder `window_hidden_dims` (h/4,
    h/2), both end in `embedding_dim` (h); `temperature` is the paper's tau = 0.01. Score: the
    mean InfoNCE loss over the row's windows. The loss has no randomness, so validation loss
    (early stopping) compares like with like."""

    name = "icl"

    def __init__(
        self,
        window_size: int | None = None,
        temperature: float = 0.01,
        hidden_dims: Sequence[int] = (200, 400),
        window_hidden_dims: Sequence[int] = (50, 100),
        embedding_dim: int = 200,
        **training: object,
    ) -> None:
        super().__init__(**training)
        if window_size is not None and window_size < 1:
            raise ValueError(f"icl: window_size must be >= 1 or null, got {window_size}")
        if temperature <= 0:
            raise ValueError(f"icl: temperature must be > 0, got {temperature}")
        self.window_size = window_size
        self.temperature = temperature
        self.hidden_dims = list(hidden_dims)
        self.window_hidden_dims = list(window_hidden_dims)
        self.embedding_dim = embedding_dim

    def window_size_for(self, n_features: int) -> int:
        """`window_size`, or the paper's rule; a ValueError when `d` features cannot be split
        into a window and a non-empty complement."""
        if n_features < 2:
            raise ValueError(
                f"icl: needs rows of at least 2 features (a window and its complement), got "
                f"{n_features}"
            )
        window_size = self.window_size or paper_window_size(n_features)
        if window_size >= n_features:
            raise ValueError(
                f"icl: window_size must be in [1, {n_features - 1}] for rows of {n_features} "
                f"features (the complement must keep a feature), got {window_size}"
            )
        return window_size

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        n_features = math.prod(input_shape)
        window_size = self.window_size_for(n_features)
        windows, complements = window_indices(n_features, window_size)
        n_windows, complement_size = len(windows), n_features - window_size
        width = self.embedding_dim
        return InternalContrastiveLoss(
            part_encoder(window_size, self.window_hidden_dims, width, n_windows, nn.LeakyReLU(0.2)),
            part_encoder(complement_size, self.hidden_dims, width, n_windows, nn.Tanh()),
            windows,
            complements,
            self.temperature,
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch).mean()

    def score_head(self) -> nn.Module:
        return self.network
