"""Params specs of the detectors on backbone features (`patchcore`, `padim`, `fastflow`,
`embedded`), torch-free like `specs.py`, which imports this module so that every spec is known
wherever specs are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le, MinLen

from normalcy.detectors.specs import (
    DetectorSpec,
    Expect,
    Int,
    NonNegativeFloat,
    ParamProblem,
    PositiveFloat,
    PositiveInt,
    TrainingSpec,
    UnitFraction,
    spec,
)

Stage = Annotated[Int, Ge(0), Le(4)]
# Detectors that read images themselves: not members of `embedded`.
IMAGE_DETECTORS = frozenset({"patchcore", "padim", "fastflow", "embedded"})


class PretrainedSpec(DetectorSpec):
    """A frozen timm backbone: its stages, its weight source, the input size."""

    backbone: str = "efficientnet_lite0"
    stages: Annotated[
        list[Stage],
        MinLen(1),
        Expect("a non-empty increasing list of backbone stages, each in [0, 4]"),
    ] = [2, 3]
    weights: Literal["pretrained", "random"] = "pretrained"
    weights_path: str | None = None
    image_size: Annotated[Int, Ge(16)] = 256
    batch_size: PositiveInt = 8
    seed: Int = 0
    threads: PositiveInt | None = None  # null: normalcy.threads' rule (every CPU: a backbone)

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        if list(self.stages) != sorted(set(self.stages)):
            return [
                ParamProblem("stages", f"must be increasing without repeats, got {self.stages}")
            ]
        return []


class BackboneSpec(PretrainedSpec):
    """A detector on patch features: the local neighbourhood, the channels, the map's blur."""

    neighbourhood: PositiveInt = 3
    feature_dim: PositiveInt | None = None
    blur_sigma: NonNegativeFloat = 4.0
    image_score_from: Literal["patches", "map"] = "patches"
    intensity: Literal["as_is", "per_image"] = "as_is"
    map_centering: Literal["none", "median", "lower_decile"] = "none"

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        problems = super().cross_problems(given)
        if self.neighbourhood % 2 == 0:
            problems.append(
                ParamProblem(
                    "neighbourhood",
                    f"must be odd (a window centred on its patch), got {self.neighbourhood}",
                )
            )
        return problems


@spec("patchcore")
class PatchCoreSpec(BackboneSpec):
    coreset_fraction: UnitFraction = 0.01
    projection_dim: PositiveInt | None = 128
    image_score: Literal["max", "reweighted"] = "max"
    reweight_neighbours: Annotated[Int, Ge(2)] = 9

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        problems = super().cross_problems(given)
        if self.image_score == "reweighted" and self.image_score_from == "map":
            problems.append(
                ParamProblem(
                    "image_score_from",
                    "must be 'patches' with image_score 'reweighted' (it scores the worst patch)",
                )
            )
        return problems


@spec("padim")
class PaDiMSpec(BackboneSpec):
    random_channels: PositiveInt = 100
    covariance_eps: PositiveFloat = 0.01
    neighbourhood: PositiveInt = 1


@spec("fastflow")
class FastFlowSpec(BackboneSpec, TrainingSpec):
    """Flows per stage on the backbone's maps; `batch_size` (the backbone's) also batches the
    flows' training."""

    n_blocks: PositiveInt = 8
    hidden_ratio: PositiveFloat = 1.0
    log_scale_bound: PositiveFloat = 2.0
    position_score: Literal["likelihood", "nll"] = "likelihood"
    neighbourhood: PositiveInt = 1
    weight_decay: NonNegativeFloat = 1e-5
    patience: PositiveInt = 5


@spec("embedded")
class EmbeddedSpec(PretrainedSpec):
    member: str = "knn"
    member_params: dict[str, Any] | None = None
    stages: Annotated[
        list[Stage],
        MinLen(1),
        Expect("a non-empty increasing list of backbone stages, each in [0, 4]"),
    ] = [3, 4]
    image_size: Annotated[Int, Ge(16)] = 224
    batch_size: PositiveInt = 16

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        from normalcy.detectors.registry import known_detectors, param_problems

        problems = super().cross_problems(given)
        vectors = [name for name in known_detectors() if name not in IMAGE_DETECTORS]
        if self.member not in vectors:
            return [
                *problems,
                ParamProblem("member", f"must be one of {vectors}, got {self.member!r}"),
            ]
        for problem in param_problems(self.member, self.member_params or {}):
            problems.append(problem._replace(path=f"member_params.{problem.path}", unknown=False))
        return problems
