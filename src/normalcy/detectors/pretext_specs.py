"""Params specs of the detectors that learn a pretext task on normal rows and score how badly a
row fails it (`goad`: which transformation, `dte`: how much diffusion noise, `icl`: which
feature window goes with which complement); torch-free like `specs.py`, which imports this
module so that every spec is known wherever specs are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from annotated_types import Ge, Gt, Lt

from normalcy.detectors.specs import (
    Int,
    NonNegativeFloat,
    Number,
    ParamProblem,
    PositiveFloat,
    PositiveInt,
    TorchSpec,
    Widths,
    spec,
)


@spec("goad")
class GOADSpec(TorchSpec):
    n_transforms: Annotated[Int, Ge(2)] = 32
    transform_dim: PositiveInt = 32
    hidden_dims: Widths = [64]
    feature_dim: PositiveInt = 32
    margin: NonNegativeFloat = 1.0
    triplet_weight: NonNegativeFloat = 0.1
    eps: NonNegativeFloat = 0.0


@spec("dte")
class DTESpec(TorchSpec):
    hidden_dims: Widths = [256, 512, 256]
    n_bins: Annotated[Int, Ge(2)] = 7
    n_steps: Annotated[Int, Ge(2)] = 400
    beta_start: Annotated[Number, Gt(0), Lt(1)] = 1e-4
    beta_end: Annotated[Number, Gt(0), Lt(1)] = 0.01

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        problems = []
        if self.n_steps < self.n_bins:
            problems.append(ParamProblem("n_steps", f"must be >= n_bins={self.n_bins}"))
        if self.beta_start > self.beta_end:
            problems.append(ParamProblem("beta_end", f"must be >= beta_start={self.beta_start}"))
        return problems


@spec("icl")
class ICLSpec(TorchSpec):
    window_size: PositiveInt | None = None  # null: the paper's k from the number of features
    temperature: PositiveFloat = 0.01
    hidden_dims: Widths = [200, 400]
    window_hidden_dims: Widths = [50, 100]
    embedding_dim: PositiveInt = 200
