"""Parity: torch eager vs onnxruntime on the same rows, every output, under a tolerance policy.

One comparison (`compare`) measures each output by its role: score by absolute/relative
difference and rank, is_anomaly by agreement, p_value by count mismatches that the score
difference cannot explain, every other float output (anomaly_map, explanations) by its max
absolute/relative difference (per-feature contributions relative to their row's largest one),
integer and bool outputs for equality. A policy then decides what
passes: `FloatTolerance` is the gate an exported graph must pass to be registered;
`Int8Tolerance` is the looser gate of its INT8 twin, on ranking, decisions and score scale.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from normalcy.artifact.calibration_head import calibration_array
from normalcy.artifact.names import (
    ANOMALY_MAP_NAME,
    CONTRIBUTIONS_NAMES,
    DECISION_NAME,
    P_VALUE_NAME,
    SCORE_NAME,
)
from normalcy.detectors.base import inference
from normalcy.export.graph import ScoringGraph, device_of
from normalcy.export.report import HEAD_ROLES, OutputParity, ParityReport
from normalcy.export.tolerance import (
    REL_EPS,
    FloatTolerance,
    Int8Tolerance,
    TolerancePolicy,
    relative_diff,
)
from normalcy.scoring import load_session


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
    return abs_diff, np.where(both_nan, 0.0, relative_diff(abs_diff, a, REL_EPS))


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
    with inference(graph):
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


def _row_scale(values: np.ndarray) -> np.ndarray:
    """Each row's largest finite |value|, at least REL_EPS, shaped to broadcast over the row."""
    finite = np.where(np.isfinite(values), np.abs(values.astype(np.float64)), 0.0)
    scale = np.maximum(finite.reshape(len(values), -1).max(axis=1, initial=0.0), REL_EPS)
    return scale.reshape(len(values), *([1] * (values.ndim - 1)))


def _compare_values(
    name: str, reference: np.ndarray, exported: np.ndarray, policy: TolerancePolicy
) -> OutputParity:
    """A non-head output: float values by abs/rel difference, integer and bool ones exactly.

    Per-feature contributions are relative to their row's largest contribution: a leave-feature-
    out contribution is a difference of two scores, exact only to the scores' own rounding, so
    a small contribution beside a large one cannot meet a tolerance relative to itself. Anomaly
    map pixels likewise, relative to their map's largest |value|: a map centred on its own median
    is a difference of patch scores, so its pixels near zero carry the scores' rounding."""
    role = "float" if np.issubdtype(reference.dtype, np.floating) else "exact"
    gated = policy.gates_other_outputs
    if reference.shape != exported.shape:
        return OutputParity(name, role, reference.size, reference.size, math.inf, math.inf, gated)
    abs_diff, rel_diff = _diffs(reference, exported)
    per_row = (name in CONTRIBUTIONS_NAMES and reference.ndim == 2) or (
        name == ANOMALY_MAP_NAME and reference.ndim == 3
    )
    if per_row and role == "float":
        rel_diff = relative_diff(abs_diff, reference, _row_scale(reference))
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
