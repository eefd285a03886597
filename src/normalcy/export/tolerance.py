"""Tolerance policies: what a parity gate allows, and the verdict it writes into the report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from normalcy.artifact.names import ANOMALY_MAP_NAME, P_VALUE_NAME
from normalcy.export.report import HEAD_ROLES, ParityReport

# Denominator floor of the relative difference: scores are squared distances/errors, so a score
# this small is numerically zero and only the absolute tolerance is meaningful for it.
REL_EPS = 1e-12


def relative_diff(abs_diff: np.ndarray, reference: np.ndarray, floor: float) -> np.ndarray:
    """|diff| / max(|reference|, floor); a NaN reference makes an infinite relative diff."""
    scale = np.maximum(np.nan_to_num(np.abs(reference), nan=np.inf), floor)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(abs_diff / scale, nan=np.inf)


class TolerancePolicy(Protocol):
    """What a gate allows: how score rows and other values count as mismatches, and the verdict."""

    gate: ClassVar[str]
    exported_label: ClassVar[str]  # what the worst row calls the file's value
    gates_p_values: ClassVar[bool]
    gates_other_outputs: ClassVar[bool]  # anomaly_map, explanations

    def tolerances(self) -> dict[str, float]: ...

    def score_rel_diff(self, torch_score: np.ndarray, abs_diff: np.ndarray) -> np.ndarray: ...

    def score_mismatches(self, abs_diff: np.ndarray, rel_diff: np.ndarray) -> np.ndarray: ...

    def worst_row(
        self, abs_diff: np.ndarray, rel_diff: np.ndarray, bad: np.ndarray
    ) -> int | None: ...

    def value_mismatches(self, abs_diff: np.ndarray, rel_diff: np.ndarray) -> np.ndarray:
        """Float values of other outputs (maps, explanations) outside the tolerances."""
        ...

    def judge(self, report: ParityReport) -> tuple[list[str], list[str]]:
        """(figures shown when it passes, problems that fail it)."""
        ...


def _ratio(value: float, limit: float) -> str:
    return f"{value / limit:.3g}x" if math.isfinite(value) else "an infinite factor (NaN/inf)"


def _lacks(report: ParityReport) -> list[str]:
    missing = report.missing_outputs
    return [f"the file lacks the outputs {missing}"] if missing else []


@dataclass(frozen=True)
class FloatTolerance:
    """The float graph's gate. A score row passes when `|torch - ort| <= max_abs` OR
    `|torch - ort| / max(|torch|, 1e-12) <= max_rel`: the absolute tolerance covers scores near
    zero (where relative error explodes), the relative one large scores (where float32 rounding
    alone exceeds a fixed abs tolerance). Float outputs use the same rule per value, integer and
    bool outputs must be equal, p_values equal except as far as the score difference explains,
    and the is_anomaly agreement must reach `min_agreement`."""

    max_abs: float
    max_rel: float
    min_agreement: float
    gate: ClassVar[str] = "ONNX"
    exported_label: ClassVar[str] = "onnxruntime"
    gates_p_values: ClassVar[bool] = True
    gates_other_outputs: ClassVar[bool] = True

    def tolerances(self) -> dict[str, float]:
        return {
            "parity_max_abs": self.max_abs,
            "parity_max_rel": self.max_rel,
            "parity_min_agreement": self.min_agreement,
        }

    def score_rel_diff(self, torch_score: np.ndarray, abs_diff: np.ndarray) -> np.ndarray:
        return relative_diff(abs_diff, torch_score, REL_EPS)

    def score_mismatches(self, abs_diff: np.ndarray, rel_diff: np.ndarray) -> np.ndarray:
        return (abs_diff > self.max_abs) & (rel_diff > self.max_rel)

    def value_mismatches(self, abs_diff: np.ndarray, rel_diff: np.ndarray) -> np.ndarray:
        return self.score_mismatches(abs_diff, rel_diff)

    def worst_row(self, abs_diff: np.ndarray, rel_diff: np.ndarray, bad: np.ndarray) -> int | None:
        """The mismatching row with the largest absolute difference."""
        return int(np.flatnonzero(bad)[np.argmax(abs_diff[bad])]) if bad.any() else None

    def judge(self, report: ParityReport) -> tuple[list[str], list[str]]:
        r, max_abs, max_rel = report, self.max_abs, self.max_rel
        figures = [
            f"max |torch - onnxruntime| = {r.max_abs_diff:.1e} (parity_max_abs {max_abs:.1e})",
            f"max relative diff = {r.max_rel_diff:.1e} (parity_max_rel {max_rel:.1e})",
            f"is_anomaly agreement {r.is_anomaly_agreement:.4f} (parity_min_agreement "
            f"{self.min_agreement})",
            f"spearman {r.spearman:.4f}",
        ]
        if P_VALUE_NAME in r.outputs:
            figures.append(f"max p_value diff {r.max_p_value_diff:.1e}")
        problems = _lacks(r)
        if r.n_score_mismatches:
            problems.append(
                f"{r.n_score_mismatches} of {r.n_rows} scores are outside both tolerances: "
                f"max |torch - onnxruntime| = {r.max_abs_diff:.1e} exceeds parity_max_abs "
                f"{max_abs:.1e} by {_ratio(r.max_abs_diff, max_abs)}, and max relative diff = "
                f"{r.max_rel_diff:.1e} exceeds parity_max_rel {max_rel:.1e} by "
                f"{_ratio(r.max_rel_diff, max_rel)}"
                + (f" (worst row {r.worst_row})" if r.worst_row else "")
            )
        if r.is_anomaly_agreement < self.min_agreement:
            problems.append(
                f"is_anomaly agreement {r.is_anomaly_agreement:.4f} is below "
                f"parity_min_agreement {self.min_agreement} ({r.n_decision_mismatches} of "
                f"{r.n_rows} decisions differ)"
            )
        if r.n_p_value_mismatches and self.gates_p_values:
            problems.append(
                f"{r.n_p_value_mismatches} of {r.n_rows} p_values differ by more than "
                f"their scores explain (max |diff| = {r.max_p_value_diff:.1e})"
            )
        for out in r.outputs.values():
            if out.role in HEAD_ROLES.values():
                continue
            figures.append(f"max {out.name} diff {out.max_abs_diff:.1e}")
            if not (out.gated and out.n_mismatches):
                continue
            if out.role == "exact":
                problems.append(
                    f"{out.n_mismatches} of {out.n_values} {out.name} values differ (an integer "
                    f"or bool output must be equal; max |diff| = {out.max_abs_diff:.3g})"
                )
                continue
            unit = "pixels" if out.name == ANOMALY_MAP_NAME else "values"
            problems.append(
                f"{out.n_mismatches} {out.name} {unit} are outside both tolerances: max "
                f"|diff| = {out.max_abs_diff:.1e} exceeds parity_max_abs {max_abs:.1e} by "
                f"{_ratio(out.max_abs_diff, max_abs)}, max relative diff = "
                f"{out.max_rel_diff:.1e} exceeds parity_max_rel {max_rel:.1e} by "
                f"{_ratio(out.max_rel_diff, max_rel)}"
            )
        return figures, problems


@dataclass(frozen=True)
class Int8Tolerance:
    """The INT8 twin's gate. INT8 cannot meet the float tolerances, so it gates what matters for
    anomaly detection: the ranking (spearman >= `min_spearman`), the decisions (is_anomaly
    agreement >= `min_agreement`) and a cap on the score error relative to the score's own scale,
    |torch - int8| / max(|torch|, median |torch|) <= `max_rel`: a score near zero is 'small'
    whatever INT8 makes of it, and a per-row relative error there says nothing. Other outputs
    and p_values are reported, not gated."""

    max_rel: float
    min_spearman: float
    min_agreement: float
    gate: ClassVar[str] = "INT8"
    exported_label: ClassVar[str] = "int8"
    gates_p_values: ClassVar[bool] = False
    gates_other_outputs: ClassVar[bool] = False

    def tolerances(self) -> dict[str, float]:
        return {
            "quantized_max_rel": self.max_rel,
            "quantized_min_spearman": self.min_spearman,
            "quantized_min_agreement": self.min_agreement,
        }

    def score_rel_diff(self, torch_score: np.ndarray, abs_diff: np.ndarray) -> np.ndarray:
        floor = max(float(np.nanmedian(np.abs(torch_score))), REL_EPS)
        return relative_diff(abs_diff, torch_score, floor)

    def score_mismatches(self, abs_diff: np.ndarray, rel_diff: np.ndarray) -> np.ndarray:
        return rel_diff > self.max_rel

    def value_mismatches(self, abs_diff: np.ndarray, rel_diff: np.ndarray) -> np.ndarray:
        return rel_diff > self.max_rel

    def worst_row(self, abs_diff: np.ndarray, rel_diff: np.ndarray, bad: np.ndarray) -> int:
        """The row with the largest relative difference, whether or not it fails."""
        return int(np.argmax(rel_diff))

    def judge(self, report: ParityReport) -> tuple[list[str], list[str]]:
        r = report
        checks = [
            (
                f"spearman {r.spearman:.4f}",
                f"quantized_min_spearman {self.min_spearman}",
                r.spearman >= self.min_spearman,
            ),
            (
                f"is_anomaly agreement {r.is_anomaly_agreement:.4f} "
                f"({r.n_decision_mismatches} of {r.n_rows} differ)",
                f"quantized_min_agreement {self.min_agreement}",
                r.is_anomaly_agreement >= self.min_agreement,
            ),
            (
                f"max relative score diff {r.max_rel_diff:.2e}",
                f"quantized_max_rel {self.max_rel:.2e}",
                r.max_rel_diff <= self.max_rel,
            ),
        ]
        figures = [f"{value} ({limit})" for value, limit, _ in checks]
        figures.append(f"max p_value diff {r.max_p_value_diff:.2e}")
        figures += [
            f"max {o.name} diff {o.max_abs_diff:.1e}"
            for o in r.outputs.values()
            if o.role not in HEAD_ROLES.values()
        ]
        problems = _lacks(r) + [f"{value} misses {limit}" for value, limit, ok in checks if not ok]
        if not checks[-1][2]:
            problems[-1] += f" by {_ratio(r.max_rel_diff, self.max_rel)} (worst row {r.worst_row})"
        return figures, problems
