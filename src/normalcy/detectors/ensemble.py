"""Score-normalized ensemble of detectors (Aggarwal & Sathe, "Outlier Ensembles", 2017;
Zhao et al., "SUOD"/PyOD's score combination): the mean, or the maximum, of robustly standardized
member scores.

Detectors' raw scores live on unrelated scales (squared errors, distances, energies), so each is
mapped to `(s - median) / (1.4826 * MAD)` over held-out rows before combining. The medians and
scales are constants, so the whole ensemble is one exportable graph.

The mean lets members vote; the maximum (Aggarwal & Sathe's "maximization") flags a row that
any member finds far out, so one member that is blind to a kind of anomaly (a small-k kNN to a
cluster of them) cannot outvote the member that sees it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from normalcy.detectors.base import (
    Detector,
    FitData,
    Prediction,
    as_prediction,
    under_prefix,
    with_prefix,
)
from normalcy.detectors.registry import create_with_settings, register

ENSEMBLE = "ensemble"
MIN_SCALE = 1e-12


def robust_location_scale(scores: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD), the scale floored so a constant score cannot divide by zero."""
    median = float(np.median(scores))
    mad = 1.4826 * float(np.median(np.abs(scores - median)))
    if mad <= MIN_SCALE:  # more than half the scores tie: fall back to the standard deviation
        mad = float(np.std(scores))
    return median, max(mad, MIN_SCALE)


COMBINE_RULES = ("mean", "max")


def combine_scores(normalized: np.ndarray | torch.Tensor, combine: str) -> Any:
    """Row-wise mean or maximum over the members' axis (1), for numpy arrays and tensors."""
    if combine == "max":
        return normalized.max(axis=1) if isinstance(normalized, np.ndarray) else normalized.amax(1)
    return normalized.mean(axis=1) if isinstance(normalized, np.ndarray) else normalized.mean(1)


class CombinedNormalizedScores(nn.Module):
    """Members' scoring modules -> mean or maximum of their `(score - location) / scale` (the
    members' other outputs are not carried: the ensemble's prediction is its score)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        location: np.ndarray,
        scale: np.ndarray,
        combine: str = "mean",
    ):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.register_buffer("location", torch.as_tensor(location, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Prediction:
        scores = torch.stack(
            [as_prediction(member(x)).score.to(torch.float32) for member in self.members], dim=1
        )
        return Prediction(combine_scores((scores - self.location) / self.scale, self.combine))


@register(ENSEMBLE)
class Ensemble(Detector):
    """Fits each member on the same data, then averages their normalized scores.

    In the pipeline, `Ensemble.from_fitted` combines the best candidates already trained instead
    of training them again. Normalization statistics come from the validation rows when given
    (held-out, so memorizing methods such as kNN are not flattered), else from the training rows.
    """

    name = ENSEMBLE

    def __init__(
        self,
        members: Sequence[str] = ("autoencoder", "deep_svdd"),
        member_params: dict[str, dict[str, Any]] | None = None,
        epochs: int = 40,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-6,
        patience: int = 8,
        seed: int = 0,
        combine: str = "mean",
    ) -> None:
        """Training settings are passed to every member that accepts them; `member_params`
        (per member name) override them and set each member's architecture; `combine` is
        `mean` or `max` of the normalized member scores."""
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"ensemble: needs at least 2 members, got {members}")
        if ENSEMBLE in members:
            raise ValueError("ensemble: an ensemble cannot contain another ensemble")
        if combine not in COMBINE_RULES:
            raise ValueError(f"ensemble: combine must be one of {COMBINE_RULES}, got {combine!r}")
        self.combine = combine
        self.members = members
        self.member_params = dict(member_params or {})
        self.training = {
            "epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "weight_decay": weight_decay,
            "patience": patience,
            "seed": seed,
        }
        self.fitted: list[Detector] = []
        self.location = np.zeros(0)
        self.scale = np.ones(0)

    @property
    def exportable(self) -> bool:  # type: ignore[override]
        return all(member.exportable for member in self.fitted) if self.fitted else True

    def _member(self, name: str) -> Detector:
        return create_with_settings(name, self.member_params.get(name, {}), self.training)

    def _fit(self, data: FitData) -> None:
        self.fitted = [self._member(name).fit(data.train, data.val) for name in self.members]
        self._normalize_on(data.val if data.val is not None else data.train)

    def _normalize_on(self, X: np.ndarray) -> None:
        stats = [robust_location_scale(member.score(X)) for member in self.fitted]
        self.location = np.array([s[0] for s in stats])
        self.scale = np.array([s[1] for s in stats])

    @classmethod
    def from_fitted(
        cls, detectors: Sequence[Detector], normalization_X: np.ndarray, combine: str = "mean"
    ) -> Ensemble:
        """An ensemble of detectors that are already fitted, normalized on `normalization_X`;
        each member's constructor params are recorded, so the ensemble can be saved."""
        ensemble = cls(
            members=[d.name for d in detectors],
            member_params={d.name: d.constructor_params() for d in detectors},
            combine=combine,
        )
        ensemble.fitted = list(detectors)
        ensemble._normalize_on(np.asarray(normalization_X))
        ensemble.input_shape = detectors[0].input_shape
        return ensemble

    def _score(self, x: np.ndarray) -> np.ndarray:
        scores = np.stack([member.score(x) for member in self.fitted], axis=1)
        return combine_scores((scores - self.location) / self.scale, self.combine)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit() before saving")
        state = {
            "location": torch.as_tensor(self.location, dtype=torch.float64),
            "scale": torch.as_tensor(self.scale, dtype=torch.float64),
        }
        for i, member in enumerate(self.fitted):
            state.update(with_prefix(f"members.{i}", member.fitted_state()))
        return state

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        self.fitted = []
        for i, name in enumerate(self.members):
            member = self._member(name)
            member.load_fitted_state(under_prefix(f"members.{i}", state), input_shape)
            self.fitted.append(member)
        self.location, self.scale = state["location"].numpy(), state["scale"].numpy()
        self.input_shape = tuple(input_shape)

    def scoring_module(self) -> nn.Module:
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit() before scoring_module()")
        if not self.exportable:
            blocked = [m.name for m in self.fitted if not m.exportable]
            raise NotImplementedError(f"ensemble: members {blocked} are not exportable")
        modules = [member.score_only_module() for member in self.fitted]
        return CombinedNormalizedScores(modules, self.location, self.scale, self.combine).eval()
