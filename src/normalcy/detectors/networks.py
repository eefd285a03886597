"""Shared network pieces: standardization as a graph layer, and MLP stacks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std with the training statistics frozen in, so export needs no pre-step."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.mean) / self.std


def fit_standardize(train: np.ndarray, min_std: float = 1e-6) -> Standardize:
    """Per-feature (per-pixel for images) statistics; constant features get std 1, not 0."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < min_std, 1.0, std)
    return Standardize(mean, std)


def mlp(
    in_features: int,
    hidden_dims: Sequence[int],
    out_features: int,
    bias: bool = True,
    final_activation: bool = False,
) -> nn.Sequential:
    """Linear + LeakyReLU stack. `bias=False` gives Deep SVDD's bias-free network."""
    dims = [in_features, *hidden_dims, out_features]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(dims) - 2 or final_activation:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(nn.Flatten(), *layers)


class ScoringModule(nn.Module):
    """Raw input -> standardize -> method head -> score `[N]`: the exported inference path."""

    def __init__(self, standardize: Standardize, head: nn.Module) -> None:
        super().__init__()
        self.standardize = standardize
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardize(x))


def forward_in_batches(
    module: nn.Module, data: torch.Tensor, batch_size: int = 4096
) -> torch.Tensor:
    """`module(data)` without gradients and in eval mode (its train/eval flag restored after),
    in chunks so a large training set does not need one huge activation."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return torch.cat([module(chunk) for chunk in data.split(batch_size)])
    finally:
        module.train(was_training)


def score_in_batches(module: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """A detector's `_score`: its scoring module over checked rows, in batches, as float64."""
    rows = torch.as_tensor(x, dtype=torch.float32)
    return forward_in_batches(module, rows, batch_size).double().numpy()
