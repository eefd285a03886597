"""Shared network pieces: MLP stacks, and the scoring graph that composes preprocessing with a
method's head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from normalcy.detectors.base import Prediction, as_prediction

LOG_2PI = math.log(2.0 * math.pi)  # the Gaussian log-density's constant, shared by the likelihoods


def mlp(
    in_features: int,
    hidden_dims: Sequence[int],
    out_features: int,
    bias: bool = True,
    final_activation: bool = False,
) -> nn.Sequential:
    """Flatten + Linear + LeakyReLU stack. `bias=False` gives Deep SVDD's bias-free network."""
    dims = [in_features, *hidden_dims, out_features]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(dims) - 2 or final_activation:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(nn.Flatten(), *layers)


class ScoringModule(nn.Module):
    """Raw input -> preprocessing -> method head -> `Prediction`: the exported inference path."""

    def __init__(self, preprocess: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.head = head

    def forward(self, x: torch.Tensor) -> Prediction:
        return as_prediction(self.head(self.preprocess(x)))
