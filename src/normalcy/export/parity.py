"""Parity: torch eager vs onnxruntime on the same rows, every output, under a tolerance policy.

One comparison (`compare`) measures each output by its role: score by absolute/relative
difference and rank, is_anomaly by agreement, p_value by count mismatches that the score
difference cannot explain, every other float output (anomaly_map, explanations) by its max
absolute/relative difference, integer and bool outputs for equality. A policy then decides what
passes: `FloatTolerance` is the gate an exported graph must pass to be registered;
`Int8Tolerance` is the looser gate of its INT8 twin, on ranking, decisions and score scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from normalcy.artifact.calibration_head import calibration_array
from normalcy.artifact.names import ANOMALY_MAP_NAME, DECISION_NAME, P_VALUE_NAME, SCORE_NAME
from normalcy.export.graph import ScoringGraph, device_of, eval_mode
from normalcy.scoring import load_session

# Denominator floor of the relative difference: scores are squared distances/errors, so a score
# this small is numerically zero and only the absolute tolerance is meaningful for it.
REL_EPS = 1e-12
HEAD_ROLES = {SCORE_NAME: "score", DECISION_NAME: "decision", P_VALUE_NAME: "p_value"}


@dataclass
class OutputParity:
    """One output, torch vs the file: how many values differ beyond what the policy allows
    (`gated`: whether they fail the gate) and the largest differences."""

    name: str
    role: str  # score | decision | p_value | float | exact (integer/bool)
    n_values: int
    n_mismatches: int
    max_abs_diff: float
    max_rel_diff: float
    gated: bool


@dataclass
class ParityReport:
    """torch eager vs onnxruntime on the same rows, every output; `message()` is for people.

    The score, decision and p_value figures are the headline; `outputs` has every output's
    comparison by name. `figures` (shown when it passes) and `problems` (each a reason it
    failed) are written by the policy that judged it."""

    gate: str  # "ONNX" (the float graph) or "INT8"
    max_abs_diff: float
    max_rel_diff: float
    spearman: float
    is_anomaly_agreement: float
    n_rows: int
    passed: bool
    tolerances: dict
    n_score_mismatches: int = 0  # rows outside the policy's score tolerance
    n_decision_mismatches: int = 0  # rows whose is_anomaly differs
    worst_row: dict = field(default_factory=dict)
    n_p_value_mismatches: int = 0  # rows whose p_value differs more than their scores explain
    max_p_value_diff: float = 0.0
    outputs: dict[str, OutputParity] = field(default_factory=dict)
    outputs_compared: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)  # torch has them, the file not
    figures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        if self.passed:
            compared = ", ".join(self.outputs_compared)
            return f"{self.gate} parity passed on {self.n_rows} rows ({compared}): " + ", ".join(
                self.figures
            )
        return f"{self.gate} parity FAILED on {self.n_rows} rows: " + "; ".join(self.problems)

    def _map(self) -> OutputParity | None:
        return self.outputs.get(ANOMALY_MAP_NAME)

    @property
    def n_map_mismatches(self) -> int:
        """anomaly_map pixels outside the tolerances (0 without a map)."""
        return self._map().n_mismatches if self._map() else 0

    @property
    def max_map_abs_diff(self) -> float:
        return self._map().max_abs_diff if self._map() else 0.0

    @property
    def max_map_rel_diff(self) -> float:
        return self._map().max_rel_diff if self._map() else 0.0


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model; `.report` has the numbers."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(report.message())
        self.report = report


def require_parity(report: ParityReport) -> None:
    """Gate for the pipeline: a graph that does not match torch must not be registered."""
    if not report.passed:
        raise ParityError(report)


# --- tolerance policies ------------------------------------------------------------------------


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
        return _relative(abs_diff, torch_score, REL_EPS)

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
        return _relative(abs_diff, torch_score, floor)

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


# --- measuring ---------------------------------------------------------------------------------


def _relative(abs_diff: np.ndarray, reference: np.ndarray, floor: float) -> np.ndarray:
    """|diff| / max(|reference|, floor); a NaN reference makes an infinite relative diff."""
    scale = np.maximum(np.nan_to_num(np.abs(reference), nan=np.inf), floor)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(abs_diff / scale, nan=np.inf)


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in float64; NaN on both sides counts as equal, on one side as infinitely far."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        return np.where(both_nan, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf))


def _diffs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|a - b|, |a - b| / max(|a|, REL_EPS)), with NaN on both sides equal."""
    abs_diff = _abs_diff(a, b)
    both_nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
    return abs_diff, np.where(both_nan, 0.0, _relative(abs_diff, a, REL_EPS))


def p_value_mismatches(
    torch_score: np.ndarray,
    ort_score: np.ndarray,
    torch_p: np.ndarray,
    ort_p: np.ndarray,
    calibration_scores: np.ndarray,
) -> np.ndarray:
    """Rows whose p_values differ by more calibration scores than lie between their scores.

    A p_value is a count k = #{c >= score} in disguise, p = (1 + k) / (n + 1). Where torch and
    onnxruntime scores are bit-equal the counts must be equal. Where the scores differ (within
    the score tolerance, which is checked separately) the counts may differ by the number of
    calibration scores in [min(scores), max(scores)]: a calibration score that ties one side
    and not the other legitimately moves the count by one. The closed interval counts a tie at
    either end as in between (the exact count would be the half-open one), so a boundary tie
    never fails the gate on its own, while bit-equal scores still require equal p_values.
    """
    cal = np.sort(calibration_array(calibration_scores))
    n = len(cal)
    k_torch = np.rint(torch_p.astype(np.float64) * (n + 1)) - 1
    k_ort = np.rint(ort_p.astype(np.float64) * (n + 1)) - 1
    low = np.fmin(torch_score, ort_score).astype(np.float32)
    high = np.fmax(torch_score, ort_score).astype(np.float32)
    between = np.searchsorted(cal, high, side="right") - np.searchsorted(cal, low, side="left")
    between = np.where(low == high, 0, between)  # bit-equal scores: the counts must be equal
    with np.errstate(invalid="ignore"):
        return ~(np.abs(k_torch - k_ort) <= np.maximum(between, 0))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank agreement over rows finite in both; 1.0 when it is undefined because nothing varies."""
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    if len(a) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return 1.0
    rho = spearmanr(a, b)[0]
    return float(rho) if np.isfinite(rho) else 0.0


def _torch_outputs(graph: ScoringGraph, X: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    device = device_of(graph)
    chunks: list[dict[str, torch.Tensor]] = []
    with eval_mode(graph), torch.no_grad():
        for start in range(0, len(X), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(X[start : start + batch_size]))
            chunks.append({k: t.cpu() for k, t in graph(chunk.to(device)).items()})
    return {name: torch.cat([c[name] for c in chunks]).numpy() for name in chunks[0]}


def _ort_outputs(onnx_path: str | Path, X: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    session = load_session(onnx_path)
    input_name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(X), batch_size):
        values = session.run(names, {input_name: X[start : start + batch_size]})
        for name, value in zip(names, values, strict=True):
            chunks[name].append(np.asarray(value))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _compare_values(
    name: str, reference: np.ndarray, exported: np.ndarray, policy: TolerancePolicy
) -> OutputParity:
    """A non-head output: float values by abs/rel difference, integer and bool ones exactly."""
    role = "float" if np.issubdtype(reference.dtype, np.floating) else "exact"
    gated = policy.gates_other_outputs
    if reference.shape != exported.shape:
        return OutputParity(name, role, reference.size, reference.size, math.inf, math.inf, gated)
    abs_diff, rel_diff = _diffs(reference, exported)
    bad = abs_diff > 0 if role == "exact" else policy.value_mismatches(abs_diff, rel_diff)
    return OutputParity(
        name,
        role,
        reference.size,
        int(bad.sum()),
        float(abs_diff.max(initial=0.0)),
        float(rel_diff.max(initial=0.0)),
        gated,
    )


def _run_both(
    graph: ScoringGraph, onnx_path: str | Path, X: np.ndarray, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """torch and onnxruntime outputs of the same rows (as float32 input), by output name."""
    X = np.asarray(X, dtype=np.float32)
    if len(X) == 0:
        raise ValueError("parity needs at least one row")
    reference = _torch_outputs(graph, X, batch_size)
    exported = _ort_outputs(onnx_path, X, batch_size)
    unchecked = [name for name in exported if name not in reference]
    if unchecked:
        hint = " (pass calibration_scores to check p_value)" if P_VALUE_NAME in unchecked else ""
        raise ValueError(
            f"{onnx_path} has outputs {unchecked} that the torch reference does not produce, so "
            f"parity cannot check them{hint}"
        )
    return reference, exported


def compare(
    scoring_module: nn.Module,
    threshold: float,
    onnx_path: str | Path,
    X: np.ndarray,
    policy: TolerancePolicy,
    calibration_scores: np.ndarray | None = None,
    batch_size: int = 4096,
) -> ParityReport:
    """Run `X` through torch eager (`ScoringGraph`) and onnxruntime, compare every output by
    its role and judge the result under `policy`; never raises on a mismatch (but does on a file
    with outputs the torch reference cannot check). `passed` = no problem under the policy; an
    output the file lacks is always one."""
    graph = ScoringGraph(scoring_module, threshold, calibration_scores)
    reference, exported = _run_both(graph, onnx_path, X, batch_size)
    n_rows = len(reference[SCORE_NAME])
    a = reference[SCORE_NAME].astype(np.float64)
    b = exported.get(SCORE_NAME, np.full(n_rows, np.nan)).astype(np.float64)
    abs_diff = _abs_diff(a, b)
    rel_diff = policy.score_rel_diff(a, abs_diff)
    score_bad = policy.score_mismatches(abs_diff, rel_diff)
    torch_flag = reference[DECISION_NAME]
    decision_bad = torch_flag != exported.get(DECISION_NAME, ~torch_flag)  # missing: never agrees
    outputs = {
        SCORE_NAME: OutputParity(
            SCORE_NAME,
            "score",
            n_rows,
            int(score_bad.sum()),
            float(abs_diff.max()),
            float(rel_diff.max()),
            True,
        ),
        DECISION_NAME: OutputParity(
            DECISION_NAME,
            "decision",
            n_rows,
            int(decision_bad.sum()),
            float(decision_bad.max()),
            float(decision_bad.max()),
            True,
        ),
    }
    p_bad, p_diff = np.zeros(n_rows, dtype=bool), 0.0
    if P_VALUE_NAME in reference and P_VALUE_NAME in exported:
        torch_p, ort_p = reference[P_VALUE_NAME], exported[P_VALUE_NAME]
        p_bad = p_value_mismatches(a, b, torch_p, ort_p, calibration_scores)
        p_diff = float(_abs_diff(torch_p, ort_p).max())
        outputs[P_VALUE_NAME] = OutputParity(
            P_VALUE_NAME,
            "p_value",
            n_rows,
            int(p_bad.sum()),
            p_diff,
            float(_diffs(torch_p, ort_p)[1].max()),
            policy.gates_p_values,
        )
    for name in reference:
        if name not in HEAD_ROLES and name in exported:
            outputs[name] = _compare_values(name, reference[name], exported[name], policy)
    worst = policy.worst_row(abs_diff, rel_diff, score_bad)
    worst_row = {}
    if worst is not None:
        worst_row = {"row": worst, "torch": float(a[worst]), policy.exported_label: float(b[worst])}
    report = ParityReport(
        gate=policy.gate,
        max_abs_diff=float(abs_diff.max()),
        max_rel_diff=float(rel_diff.max()),
        spearman=_spearman(a, b),
        is_anomaly_agreement=1.0 - float(decision_bad.mean()),
        n_rows=n_rows,
        passed=False,
        tolerances=policy.tolerances(),
        n_score_mismatches=int(score_bad.sum()),
        n_decision_mismatches=int(decision_bad.sum()),
        worst_row=worst_row,
        n_p_value_mismatches=int(p_bad.sum()),
        max_p_value_diff=p_diff,
        outputs=outputs,
        outputs_compared=[name for name in reference if name in exported],
        missing_outputs=[name for name in reference if name not in exported],
    )
    report.figures, report.problems = policy.judge(report)
    report.passed = not report.problems
    return report


def parity_check(
    scoring_module: nn.Module,
    threshold: float,
    onnx_path: str | Path,
    X: np.ndarray,
    max_abs: float,
    max_rel: float,
    min_agreement: float,
    batch_size: int = 4096,
    calibration_scores: np.ndarray | None = None,
) -> ParityReport:
    """The float graph's gate: `compare` under `FloatTolerance(max_abs, max_rel, min_agreement)`."""
    policy = FloatTolerance(max_abs, max_rel, min_agreement)
    return compare(scoring_module, threshold, onnx_path, X, policy, calibration_scores, batch_size)


def quantized_parity_check(
    scoring_module: nn.Module,
    threshold: float,
    onnx_path: str | Path,
    X: np.ndarray,
    max_rel: float,
    min_spearman: float,
    min_agreement: float,
    calibration_scores: np.ndarray | None = None,
    batch_size: int = 4096,
) -> ParityReport:
    """The INT8 twin's gate: `compare` under `Int8Tolerance(max_rel, min_spearman,
    min_agreement)`."""
    policy = Int8Tolerance(max_rel, min_spearman, min_agreement)
    return compare(scoring_module, threshold, onnx_path, X, policy, calibration_scores, batch_size)
