"""The Detector contract: the only thing the pipeline knows about a method."""

from __future__ import annotations

import contextlib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from normalcy.artifact import names

SCORE = names.SCORE_NAME
ANOMALY_MAP = names.ANOMALY_MAP_NAME

# Output names the graph's calibration head and input own; an explanation may not take them.
RESERVED_OUTPUT_NAMES = frozenset(
    {SCORE, ANOMALY_MAP, names.DECISION_NAME, names.P_VALUE_NAME, names.INPUT_NAME}
)
_OUTPUT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class Prediction(NamedTuple):
    """What every scoring module returns, like anomalib's `InferenceBatch`.

    `score` `[N]` (higher = more anomalous); `anomaly_map` `[N, H, W]` for methods that localize;
    `explanations`: named tensors `[N, ...]` (per-feature contributions, the nearest normal
    row, ...). Export, parity, `normalcy score` and `serve` carry every field by name, so a new
    explanation needs no edit outside the detector that produces it."""

    score: torch.Tensor
    anomaly_map: torch.Tensor | None = None
    explanations: dict[str, torch.Tensor] | None = None

    def named_outputs(self) -> dict[str, torch.Tensor]:
        """Every field present, in graph output order: score, anomaly_map, then explanations
        sorted by name."""
        outputs = {SCORE: self.score}
        if self.anomaly_map is not None:
            outputs[ANOMALY_MAP] = self.anomaly_map
        for name in sorted(self.explanations or {}):
            outputs[check_output_name(name)] = self.explanations[name]
        return outputs


def check_output_name(name: str) -> str:
    """An explanation's name, if it can be a graph output that no other field uses."""
    if name in RESERVED_OUTPUT_NAMES or not _OUTPUT_NAME.match(name):
        raise ValueError(
            f"explanation name {name!r} is not allowed: expected lower_snake_case (letters, "
            f"digits, _; at most 64) and none of {sorted(RESERVED_OUTPUT_NAMES)}"
        )
    return name


def as_prediction(out: Any) -> Prediction:
    """A scoring module's output as a `Prediction` (a bare score tensor is accepted)."""
    if isinstance(out, Prediction):
        return out
    if isinstance(out, torch.Tensor):
        return Prediction(out)
    raise TypeError(
        f"a scoring module must return a Prediction or a score tensor, got {type(out).__name__}"
    )


def concatenate(parts: list[Any]) -> Any:
    """Batches of a module's output joined along rows: tensors, tuples of tensors, or a
    `Prediction` field by field (score, anomaly_map, each explanation)."""
    first = parts[0]
    if isinstance(first, tuple) and not isinstance(first, Prediction):
        return tuple(torch.cat(field) for field in zip(*parts, strict=True))
    if not isinstance(first, Prediction):
        return torch.cat(parts)
    return Prediction(
        torch.cat([part.score for part in parts]),
        None if first.anomaly_map is None else torch.cat([part.anomaly_map for part in parts]),
        None
        if first.explanations is None
        else {
            name: torch.cat([part.explanations[name] for part in parts])
            for name in first.explanations
        },
    )


@contextlib.contextmanager
def inference(function: Any) -> Iterator[None]:
    """No gradients and, for an `nn.Module`, eval mode for the duration, then each submodule's
    own train/eval flag back as it was: how every batched forward pass and export runs."""
    flags = {m: m.training for m in function.modules()} if isinstance(function, nn.Module) else {}
    for module in flags:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags.items():
            module.training = training


def forward_in_batches(module: nn.Module, data: torch.Tensor, batch_size: int = 4096) -> Any:
    """`module(data)` under `inference`, in chunks so a large input does not need one huge
    activation; a `Prediction` output is joined field by field."""
    with inference(module):
        chunks = data.split(batch_size) if len(data) else (data,)
        return concatenate([module(chunk) for chunk in chunks])


def predict_in_batches(
    module: nn.Module, x: np.ndarray, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """Every named output of a scoring module over checked rows, as numpy arrays."""
    out = as_prediction(forward_in_batches(module, torch.as_tensor(x), batch_size))
    return {name: tensor.numpy() for name, tensor in out.named_outputs().items()}


def score_in_batches(module: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """A scoring module's `score` over checked rows, in batches, as float64."""
    out = as_prediction(forward_in_batches(module, torch.as_tensor(x), batch_size))
    return out.score.double().numpy()


def check_input(
    X: np.ndarray,
    who: str,
    what: str,
    expected_shape: tuple[int, ...] | None = None,
    min_rows: int = 1,
) -> np.ndarray:
    """`X` as a float array `[N, ...]`, or a ValueError naming what is wrong and what was expected.

    Every detector goes through this in `fit` and `score`, so no method can silently train on
    NaN, score rows of the wrong width, or accept a single unbatched row."""
    X = np.asarray(X)
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise ValueError(f"{who}: {what} must be numeric, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float64 if X.dtype == np.float64 else np.float32)
    if X.ndim < 2:
        raise ValueError(
            f"{who}: {what} must be a batch [N, features] or [N, C, H, W], got shape {X.shape}"
        )
    if len(X) < min_rows:
        raise ValueError(f"{who}: need at least {min_rows} {what} rows, got {len(X)}")
    if expected_shape is not None and tuple(X.shape[1:]) != tuple(expected_shape):
        raise ValueError(
            f"{who}: {what} rows have shape {list(X.shape[1:])}, but the detector was fitted on "
            f"rows of shape {list(expected_shape)}"
        )
    finite = np.isfinite(X.reshape(len(X), int(np.prod(X.shape[1:]))))
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{who}: {what} has {len(bad_rows)} rows with NaN or inf (first rows "
            f"{bad_rows[:5].tolist()}); expected finite values"
        )
    return X


def check_labels(labels: np.ndarray | None, n_rows: int, who: str, what: str) -> np.ndarray | None:
    """0/1 labels aligned with their rows, or None."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n_rows,):
        raise ValueError(f"{who}: {what} must have shape ({n_rows},), got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{who}: {what} must be 0 (normal) or 1 (anomaly)")
    return labels.astype(np.int64)


@dataclass(frozen=True)
class FitData:
    """What `Detector.fit` hands a method's `_fit`, checked: the training rows, the validation
    rows (None when there are none) and their labels (read only by `uses_labels` methods)."""

    train: np.ndarray
    val: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    train_labels: np.ndarray | None = None


class Detector(ABC):
    """Learns normality from (mostly) normal data; higher scores mean more anomalous.

    `fit(train, val, val_labels, train_labels)`: labels reach a detector only when it declares
    `uses_labels = True`; the pipeline strips them otherwise, so labels cannot leak into training.
    `fit` and `score` check their input (numeric, finite, batched, the fitted row shape) and then
    call the method's `_fit` / `_score`, so no method can skip the checks.
    `scoring_module()` is the whole inference path, raw input in data units -> `Prediction`, as one
    `nn.Module`. It is what gets exported. A method that cannot be a graph sets
    `exportable = False`.
    """

    name: ClassVar[str] = "detector"
    exportable: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    min_train_rows: ClassVar[int] = 2
    # Trained to separate data from synthetic outliers: the label-free selection criterion
    # (synthetic anomalies too) would measure its own training task, so it cannot judge it.
    trains_on_synthetic_anomalies: ClassVar[bool] = False

    input_shape: tuple[int, ...] | None = None
    _init_args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
    # Rows per forward pass when scoring; detectors with a `batch_size` for scoring set it.
    scoring_batch_size: int = 4096

    def __new__(cls, *args: Any, **kwargs: Any) -> Detector:
        """Remember the constructor's arguments, so `constructor_params` can say how to build
        this detector again (persistence) however it was created."""
        instance = super().__new__(cls)
        instance._init_args = (args, kwargs)
        return instance

    def constructor_params(self) -> dict[str, Any]:
        """Every constructor parameter by name: those given, then the defaults of the rest
        (the most derived `__init__` that names a parameter gives its default)."""
        args, kwargs = self._init_args
        params = dict(inspect.signature(type(self).__init__).bind(self, *args, **kwargs).arguments)
        params.pop("self")
        for name, parameter in inspect.signature(type(self).__init__).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                params.update(params.pop(name, {}))
        for cls in type(self).__mro__:
            if "__init__" not in vars(cls) or cls is object:
                continue
            for name, parameter in inspect.signature(cls.__init__).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    params.setdefault(name, parameter.default)
        return params

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """Everything `fit` learned, as a flat dict of tensors (see `persistence`)."""
        raise NotImplementedError(f"{self.name}: this detector cannot be saved")

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        """Restore what `fitted_state` returned, for rows of `input_shape`, on an unfitted
        detector built with the same constructor params."""
        raise NotImplementedError(f"{self.name}: this detector cannot be loaded")

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray | None = None,
        val_labels: np.ndarray | None = None,
        train_labels: np.ndarray | None = None,
    ) -> Detector:
        """Learn from `train`; `val` (unlabelled unless `uses_labels`) is for early stopping."""
        train = check_input(train, self.name, "training", min_rows=self.min_train_rows)
        train_labels = check_labels(train_labels, len(train), self.name, "train_labels")
        if val is not None and len(val):
            val = check_input(val, self.name, "validation", expected_shape=train.shape[1:])
            val_labels = check_labels(val_labels, len(val), self.name, "val_labels")
        else:
            val, val_labels = None, None
        self._fit(FitData(train, val, val_labels, train_labels))
        self.input_shape = tuple(train.shape[1:])
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """Anomaly scores, float64 `[N]`, higher = more anomalous."""
        x = self._checked_input(x)
        if len(x) == 0:
            return np.zeros(0)
        return np.asarray(self._score(x), dtype=np.float64).reshape(-1)

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every named output of the scoring module (score, anomaly_map, explanations), as
        numpy arrays in graph output order, for callers that want maps or explanations."""
        return self._predict(self._checked_input(x))

    def _checked_input(self, x: np.ndarray) -> np.ndarray:
        if self.input_shape is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        return check_input(x, self.name, "input", expected_shape=self.input_shape, min_rows=0)

    @abstractmethod
    def _fit(self, data: FitData) -> None:
        """The method's own training, on checked input."""

    def _score(self, x: np.ndarray) -> np.ndarray:
        """Scoring of checked, non-empty input: the scoring module's score, in batches. A
        method whose scores do not come from its graph (a per-input search) overrides this."""
        return score_in_batches(self.score_only_module(), x, self.scoring_batch_size)

    def _predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Named outputs of checked input; a method without a graph has only its score."""
        if not self.exportable:
            return {SCORE: self.score(x)}
        return predict_in_batches(self.scoring_module(), x, self.scoring_batch_size)

    @abstractmethod
    def scoring_module(self) -> nn.Module:
        """Raw input `[N, ...]` (float32, data units) -> `Prediction`, ready for export."""

    def score_only_module(self) -> nn.Module:
        """The same score without explanations that cost extra passes (leave-feature-out), for
        callers that want only the score: `score`, cleaning, an ensemble's members."""
        return self.scoring_module()


def with_prefix(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every key under `prefix.` (one flat dict holds several modules' states)."""
    return {f"{prefix}.{key}": value for key, value in state.items()}


def under_prefix(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    start = f"{prefix}."
    return {key[len(start) :]: value for key, value in state.items() if key.startswith(start)}


def require_fitted(detector: str, action: str, *parts: object) -> None:
    """Refuse `action` (saving, building the scoring module) while a fitted part is missing."""
    if any(part is None for part in parts):
        raise RuntimeError(f"{detector}: call fit() before {action}")


def saved_parts(
    **parts: nn.Module | dict[str, torch.Tensor] | torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """A detector's `fitted_state` from its parts: a module's or a dict's tensors under the
    part's name, a tensor (or None) as it is."""
    state: dict[str, Any] = {}
    for name, part in parts.items():
        if isinstance(part, nn.Module):
            state.update(with_prefix(name, part.state_dict()))
        elif isinstance(part, dict):
            state.update(with_prefix(name, part))
        else:
            state[name] = part
    return state
