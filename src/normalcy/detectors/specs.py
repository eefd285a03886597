"""Every built-in detector's constructor params as a pydantic model: names, types, ranges.

These specs import no torch, so `params.yaml` (`train.detectors.NAME`, `clean.detector_params`)
is checked completely before any work starts, and `create_detector` checks through the same
spec, so the two paths accept and refuse the same things. Defaults equal the constructors'
(tests/test_detector_specs.py compares names and defaults with the registered classes), but only
the values given are passed on: a constructor's own default always applies."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Integral
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError


class ParamProblem(NamedTuple):
    """One wrong detector param: `path` inside the detector's params (`latent_dim`,
    `member_params.vae.scoring`) and what is wrong, as a phrase to follow the path."""

    path: str
    text: str
    unknown: bool = False


class Expect:
    """Annotated marker: how to say what a field expects, where the type alone says it badly."""

    def __init__(self, text: str) -> None:
        self.text = text


def _plain_int(value: object) -> object:
    """numpy integers count as integers; bools and floats do not."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _not_int(value: object) -> object:
    """A fraction is written as a float: an integer means a count, and is checked as one."""
    if isinstance(value, Integral):
        raise ValueError("an integer is not a fraction")
    return value


Int = Annotated[int, BeforeValidator(_plain_int), Strict()]
Number = Annotated[float, Strict()]  # an int is a number too; a bool or a string is not
Count = Annotated[Int, Ge(0)]
PositiveInt = Annotated[Int, Ge(1)]
PositiveFloat = Annotated[Number, Gt(0)]
NonNegativeFloat = Annotated[Number, Ge(0)]
UnitFraction = Annotated[Number, Gt(0), Le(1)]  # (0, 1]
Probability = Annotated[Number, Ge(0), Lt(1)]  # [0, 1)
Widths = list[PositiveInt]  # hidden layer sizes; empty = no hidden layer
NonEmptyWidths = Annotated[list[PositiveInt], MinLen(1)]


def _image_size_ok(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


# Each preprocessing kind (detectors/preprocessing.py builds them) and the options it accepts.
PREPROCESSING_OPTIONS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "standardize": {},
    "robust": {},
    "minmax": {},
    "none": {},
    "image": {
        "image_size": _image_size_ok,
        "normalization": lambda value: value in ("data", "imagenet"),
        "intensity": lambda value: value in ("as_is", "per_image"),
    },
}


def parse_preprocessing(value: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, options) of a `preprocessing` param: a kind's name, or a mapping with `kind` and
    that kind's options; a ValueError names what is accepted."""
    if isinstance(value, Mapping):
        options = dict(value)
        kind = options.pop("kind", None)
    else:
        kind, options = value, {}
    if kind not in PREPROCESSING_OPTIONS:
        raise ValueError(
            f"unknown preprocessing {kind!r}; expected one of {sorted(PREPROCESSING_OPTIONS)} (or "
            "a mapping with `kind` set to one of them and that kind's options)"
        )
    accepted = PREPROCESSING_OPTIONS[kind]
    for name, option in options.items():
        if name not in accepted:
            raise ValueError(
                f"preprocessing {kind!r} does not accept option {name!r}; it accepts "
                f"{sorted(accepted)}"
            )
        if not accepted[name](option):
            raise ValueError(f"preprocessing {kind!r}: invalid {name}={option!r}")
    return kind, options


def _checked_preprocessing(value: Any) -> Any:
    parse_preprocessing(value)
    return value


Preprocessing = Annotated[
    str | dict[str, Any],
    AfterValidator(_checked_preprocessing),
    Expect(
        f"one of {sorted(PREPROCESSING_OPTIONS)}, or a mapping with `kind` and that kind's "
        "options (image: image_size, normalization, intensity)"
    ),
]


class DetectorSpec(BaseModel):
    """A detector's params. Subclasses add fields; `cross_problems` checks fields together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        """Problems between fields (after each field passed); `given` is what was passed."""
        return []


class TrainingSpec(DetectorSpec):
    """The shared training settings (`train.epochs` ...) of every trained detector."""

    epochs: Count = 40
    batch_size: PositiveInt = 64
    learning_rate: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-6
    patience: PositiveInt = 8
    seed: Int = 0


class PreprocessedSpec(DetectorSpec):
    """How raw input is scaled inside the graph, before the method sees it."""

    preprocessing: Preprocessing = "standardize"


class TorchSpec(TrainingSpec, PreprocessedSpec):
    """A `TorchDetector`: network, loss, score head."""

    threads: PositiveInt | None = None  # null: normalcy.threads' rule
    leave_feature_out: bool = False  # deep_svdd/flow/dagmm: feature_contributions, d+1x the cost
    # loss truncation (autoencoder, vae, flow, deep_svdd, memae; refused by the others): after
    # `trim_after` epochs each batch's loss leaves out its `trim_fraction` worst-fitted rows
    trim_fraction: Annotated[Number, Ge(0), Lt(0.5)] = 0.0
    trim_after: Count = 5


class EncoderSpec(TorchSpec):
    """A network that encodes rows through hidden layers into a latent code."""

    hidden_dims: Widths = [64, 32]
    latent_dim: PositiveInt = 8


class AdversarialSpec(TorchSpec):
    """A generator/discriminator pair (Adam betas, no weight decay by default)."""

    betas: tuple[Probability, Probability] = (0.5, 0.999)
    weight_decay: NonNegativeFloat = 0.0


_SPECS: dict[str, type[DetectorSpec]] = {}
T = TypeVar("T")


def add_once(table: dict[str, T], name: str, duplicate: str) -> Callable[[T], T]:
    """Decorator: put the decorated object in `table` under `name`, so a name table (specs,
    detector factories) is filled where each entry is defined; a second entry under the same
    name is refused with `duplicate` (a message with `{name}`)."""

    def decorate(value: T) -> T:
        if name in table:
            raise ValueError(duplicate.format(name=repr(name)))
        table[name] = value
        return value

    return decorate


def spec(name: str) -> Callable[[type[DetectorSpec]], type[DetectorSpec]]:
    """Decorator: the params spec of detector `name` (the name it is registered under)."""
    return add_once(_SPECS, name, "detector spec {name} is defined twice")


def spec_names() -> list[str]:
    """Every detector with a spec: the built-in ones."""
    return sorted(_SPECS)


def spec_for(name: str) -> type[DetectorSpec] | None:
    """The spec of detector `name`, or None (a detector registered from outside normalcy)."""
    return _SPECS.get(name)


@spec("autoencoder")
class AutoencoderSpec(EncoderSpec):
    noise_std: NonNegativeFloat = 0.0
    sparsity_weight: NonNegativeFloat = 0.0
    contractive_weight: NonNegativeFloat = 0.0


@spec("memae")
class MemAESpec(EncoderSpec):
    memory_size: PositiveInt = 50
    shrink_threshold: Probability | None = None
    temperature: PositiveFloat = 0.1
    entropy_weight: NonNegativeFloat = 0.0002


@spec("vae")
class VAESpec(EncoderSpec):
    scoring: Literal["elbo", "likelihood_ratio"] = "elbo"
    background_perturbation: UnitFraction = 0.2


@spec("deep_svdd")
class DeepSVDDSpec(EncoderSpec):
    latent_dim: PositiveInt = 16
    objective: Literal["one-class", "soft-boundary"] = "one-class"
    nu: UnitFraction = 0.1
    warmup_epochs: Count = 10
    pretrain_epochs: Count = 0


@spec("ae_svdd")
class AESVDDSpec(EncoderSpec):
    compactness_weight: NonNegativeFloat = 1.0


@spec("dagmm")
class DAGMMSpec(EncoderSpec):
    latent_dim: PositiveInt = 2
    n_components: PositiveInt = 4
    estimation_dims: Widths = [10]
    dropout: Probability = 0.5
    lambda_energy: NonNegativeFloat = 0.1
    lambda_cov: NonNegativeFloat = 0.005
    cov_eps: PositiveFloat = 1e-6
    norm_floor: PositiveFloat = 1.0


@spec("flow")
class FlowSpec(TorchSpec):
    n_layers: PositiveInt = 6
    hidden_dims: Widths = [64, 64]
    coupling: Literal["realnvp", "maf"] = "realnvp"
    log_scale_bound: PositiveFloat = 3.0


@spec("ganomaly")
class GANomalySpec(AdversarialSpec, EncoderSpec):
    discriminator_dims: NonEmptyWidths = [64, 32]
    w_adv: NonNegativeFloat = 1.0
    w_con: NonNegativeFloat = 50.0
    w_enc: NonNegativeFloat = 1.0


@spec("anogan")
class AnoGANSpec(AdversarialSpec):
    latent_dim: PositiveInt = 8
    generator_dims: Widths = [32, 64]
    discriminator_dims: NonEmptyWidths = [64, 32]
    lam: Annotated[Number, Ge(0), Le(1)] = 0.1
    search_steps: PositiveInt = 100
    search_lr: PositiveFloat = 0.1
    encoder: Annotated[bool, Strict()] = False
    encoder_dims: Widths = [64, 32]
    kappa: NonNegativeFloat = 1.0
    encoder_learning_rate: PositiveFloat = 1e-3
    criterion_rows: PositiveInt = 512


@spec("outlier_exposure")
class OutlierExposureSpec(TorchSpec):
    hidden_dims: Widths = [64, 32]
    exposure_ratio: PositiveFloat = 1.0
    box_margin: NonNegativeFloat = 0.25


@spec("knn")
class KNNSpec(PreprocessedSpec):
    k: PositiveInt = 5
    k_fraction: UnitFraction | None = None
    coreset_fraction: UnitFraction | None = None
    coreset_size: PositiveInt | None = None
    projection_dim: PositiveInt | None = 128
    max_bank: PositiveInt = 20_000
    seed: Int = 0
    batch_size: PositiveInt = 1024

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        problems = []
        if self.coreset_fraction is not None and self.coreset_size is not None:
            problems.append(
                ParamProblem(
                    "coreset_size",
                    "must be null when coreset_fraction is set: give "
                    "coreset_fraction or coreset_size, not both",
                )
            )
        elif self.coreset_size is not None and self.coreset_size < self.k:
            problems.append(
                ParamProblem("coreset_size", f"must be >= k={self.k}, got {self.coreset_size}")
            )
        if self.max_bank < self.k:
            problems.append(ParamProblem("max_bank", f"must be >= k={self.k}, got {self.max_bank}"))
        return problems


@spec("knn_wide")
class WideKNNSpec(KNNSpec):
    k_fraction: UnitFraction | None = 0.05
    preprocessing: Preprocessing = "minmax"


@spec("iforest")
class IForestSpec(DetectorSpec):
    n_estimators: PositiveInt = 100
    max_samples: Annotated[
        Literal["auto"]
        | Annotated[Int, Ge(2)]
        | Annotated[UnitFraction, BeforeValidator(_not_int)],
        Expect("'auto' (min(256, rows)), an integer >= 2 or a fraction in (0, 1]"),
    ] = "auto"
    seed: Int = 0
    batch_size: PositiveInt = 4096


@spec("pca")
class PCASpec(PreprocessedSpec):
    explained_variance: Annotated[Number, Gt(0), Lt(1)] = 0.9


@spec("mahalanobis")
class MahalanobisSpec(PreprocessedSpec):
    covariance: Literal["mcd", "ledoit_wolf", "empirical"] = "mcd"
    support_fraction: Annotated[Number, Ge(0.5), Le(1)] | None = None
    seed: Int = 0


@spec("ensemble")
class EnsembleSpec(TrainingSpec):
    members: Annotated[
        list[Annotated[str, Strict()]], Expect("a list of at least 2 other detector names")
    ] = ["autoencoder", "deep_svdd"]
    member_params: dict[str, dict[str, Any]] | None = None
    combine: Literal["mean", "max"] = "mean"

    def cross_problems(self, given: Mapping[str, Any]) -> list[ParamProblem]:
        from normalcy.detectors.registry import known_detectors, param_problems

        known = [name for name in known_detectors() if name != "ensemble"]
        if len(self.members) < 2 or any(name not in known for name in self.members):
            return [ParamProblem("members", f"must be at least 2 of {known}, got {self.members}")]
        problems = []
        for name, params in (self.member_params or {}).items():
            if name not in self.members:
                problems.append(
                    ParamProblem(
                        f"member_params.{name}", f"is not a member; members are {self.members}"
                    )
                )
                continue
            for problem in param_problems(name, params):
                problems.append(problem._replace(path=f"member_params.{name}.{problem.path}"))
        return problems


def spec_problems(spec_class: type[DetectorSpec], params: Mapping[str, Any]) -> list[ParamProblem]:
    """Every problem of `params` against `spec_class`: unknown names, wrong types, values out
    of range (each naming what is expected and what was given), then cross-field checks."""
    fields = spec_class.model_fields
    problems = [
        ParamProblem(key, f"is not a parameter; expected one of {list(fields)}", unknown=True)
        for key in params
        if key not in fields
    ]
    known = {key: value for key, value in params.items() if key in fields}
    try:
        checked = spec_class.model_validate(known)
    except ValidationError as exc:
        wrong: dict[str, str | None] = {}
        for error in exc.errors():
            if error["loc"]:
                # A validator's own ValueError says more than the type can (preprocessing).
                reason = (
                    error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
                )
                wrong.setdefault(str(error["loc"][0]), None if reason is None else str(reason))
        for key, reason in wrong.items():
            info = fields[key]
            expected = describe(info.annotation, info.metadata)
            text = f"must be {expected}, got {known[key]!r}"
            problems.append(ParamProblem(key, text if reason is None else f"is invalid: {reason}"))
        return problems
    return problems + checked.cross_problems(known)


# -- what a field expects, in words --------------------------------------------------------------


def describe(
    annotation: Any, metadata: list[Any] | tuple[Any, ...] = (), plural: bool = False
) -> str:
    """'an integer >= 1', 'in (0, 1]', "one of ['elbo', 'likelihood_ratio']", 'a list of
    integers >= 1', ... from a field's type and its annotated constraints."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return describe(base, [*extra, *metadata], plural)
    for marker in metadata:
        if isinstance(marker, Expect):
            return marker.text
    args = get_args(annotation)
    if origin in (Union, UnionType):
        options = [describe(arg, (), plural) for arg in args if arg is not NoneType]
        text = " or ".join(options)
        return text + (" or null" if NoneType in args else "")
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is list:
        items = describe(args[0], (), plural=True)
        size = "a non-empty list" if any(isinstance(m, MinLen) for m in metadata) else "a list"
        return f"{size} of {items}"
    if origin is tuple:
        items = describe(args[0], (), plural=True)
        return f"a list of {len(args)} {items}"
    if origin is dict or annotation is dict:
        return "a mapping"
    bounds = _bounds(metadata)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return f"{'integers' if plural else 'an integer'} {bounds}".strip()
    if annotation is float:
        if bounds:
            return f"numbers {bounds}" if plural else bounds
        return "numbers" if plural else "a number"
    if annotation is str:
        return "strings" if plural else "a string"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any] | tuple[Any, ...]) -> str:
    """'>= 1', '> 0', 'in (0, 1]' from annotated_types bounds."""
    low = next((m for m in metadata if isinstance(m, Ge | Gt)), None)
    high = next((m for m in metadata if isinstance(m, Le | Lt)), None)

    def number(value: float) -> str:
        return f"{value:g}"

    if low is not None and high is not None:
        left = f"[{number(low.ge)}" if isinstance(low, Ge) else f"({number(low.gt)}"
        right = f"{number(high.le)}]" if isinstance(high, Le) else f"{number(high.lt)})"
        return f"in {left}, {right}"
    if low is not None:
        return f">= {number(low.ge)}" if isinstance(low, Ge) else f"> {number(low.gt)}"
    if high is not None:
        return f"<= {number(high.le)}" if isinstance(high, Le) else f"< {number(high.lt)}"
    return ""


# The image detectors' and the pretext-task detectors' specs register themselves here too (kept
# apart for this module's size).
from normalcy.detectors import image_specs as _image_specs  # noqa: E402, F401
from normalcy.detectors import pretext_specs as _pretext_specs  # noqa: E402, F401
