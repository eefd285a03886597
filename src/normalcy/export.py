"""ONNX export of the scoring path, torch/onnxruntime parity gate, and torch-free recalibration.

The exported graph is `ScoringGraph`: raw input -> (score, is_anomaly). The threshold lives in the
graph as a float32 initializer so that serving needs nothing but the file, and recalibration
(`set_threshold`) only swaps that one constant, with no torch and no re-export.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from scipy.stats import spearmanr
from torch import nn

from normalcy.scoring import DECISION_NAME, METADATA_KEY, SCORE_NAME, score_onnx

INPUT_NAME = "input"

# Denominator floor of the relative difference: scores are squared distances/errors, so a score
# this small is numerically zero and only the absolute tolerance is meaningful for it.
REL_EPS = 1e-12


class ScoringGraph(nn.Module):
    """`scoring_module` + threshold -> (score float32 `[N]`, is_anomaly bool `[N]`).

    `is_anomaly = score > threshold`, compared in float32 (the threshold is stored as float32), so
    the decision is the same in torch and in the exported graph.
    """

    def __init__(self, scoring_module: nn.Module, threshold: float) -> None:
        super().__init__()
        self.scoring_module = scoring_module
        self.register_buffer(
            "threshold",
            torch.tensor(float(threshold), dtype=torch.float32, device=_device_of(scoring_module)),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.scoring_module(x).to(torch.float32)
        return score, score > self.threshold


def _device_of(module: nn.Module) -> torch.device:
    """Where the module's weights live; CPU for a weightless module."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own train/eval flag back as it was."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags.items():
            m.training = training


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path`, on failure it is removed.

    Same directory so `os.replace` is an atomic rename (never a cross-device copy). The temp file
    is created with the process umask, unlike `mkstemp`'s 0600, so the result is readable as usual.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb"):
            pass
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Store `metadata` as one JSON string under the 'normalcy' key, replacing any previous one."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))


def _get_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Check, then write as one self-contained file, atomically."""
    onnx.checker.check_model(model)
    with _atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return path


def export_onnx(
    scoring_module: nn.Module,
    threshold: float,
    example: np.ndarray,
    path: str | Path,
    opset: int = 18,
    metadata: dict | None = None,
) -> Path:
    """Export `ScoringGraph(scoring_module, threshold)` to one ONNX file at `path`.

    Input 'input' (dynamic batch, other dims fixed by `example`), outputs 'score' and
    'is_anomaly'. A 1-row example is duplicated: torch.export specializes a dimension traced at
    size 1 to a constant, which would freeze the batch size. `metadata` goes under the
    'normalcy' metadata key as JSON. The module's train/eval flags are left as they were.
    """
    path = Path(path)
    example = np.asarray(example, dtype=np.float32)
    if example.ndim < 2 or len(example) == 0:
        raise ValueError(f"example must be a non-empty batch [N, ...], got shape {example.shape}")
    if len(example) == 1:
        example = np.concatenate([example, example])
    graph = ScoringGraph(scoring_module, threshold)
    sample = torch.from_numpy(np.ascontiguousarray(example)).to(_device_of(scoring_module))
    batch = torch.export.Dim("batch", min=1)
    with _eval_mode(graph), torch.no_grad():
        program = torch.onnx.export(
            graph,
            (sample,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[SCORE_NAME, DECISION_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    _set_metadata(model, dict(metadata or {}))
    return _save(model, path)


@dataclass
class ParityReport:
    """torch eager vs onnxruntime on the same rows; `message()` is what a human reads."""

    max_abs_diff: float
    max_rel_diff: float
    spearman: float
    is_anomaly_agreement: float
    n_rows: int
    passed: bool
    tolerances: dict
    n_score_mismatches: int = 0  # rows outside both the absolute and the relative tolerance
    n_decision_mismatches: int = 0  # rows whose is_anomaly differs
    worst_row: dict = field(default_factory=dict)  # the mismatching row with the largest abs diff

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        tol = self.tolerances
        max_abs, max_rel = tol["parity_max_abs"], tol["parity_max_rel"]
        min_agreement = tol["parity_min_agreement"]
        if self.passed:
            return (
                f"ONNX parity passed on {self.n_rows} rows: max |torch - onnxruntime| = "
                f"{self.max_abs_diff:.1e} (parity_max_abs {max_abs:.1e}), max relative diff = "
                f"{self.max_rel_diff:.1e} (parity_max_rel {max_rel:.1e}), is_anomaly agreement "
                f"{self.is_anomaly_agreement:.4f} (parity_min_agreement {min_agreement}), "
                f"spearman {self.spearman:.4f}"
            )
        problems = []
        if self.n_score_mismatches:
            problems.append(
                f"{self.n_score_mismatches} of {self.n_rows} scores are outside both tolerances: "
                f"max |torch - onnxruntime| = {self.max_abs_diff:.1e} exceeds parity_max_abs "
                f"{max_abs:.1e} by {_ratio(self.max_abs_diff, max_abs)}, and max relative diff = "
                f"{self.max_rel_diff:.1e} exceeds parity_max_rel {max_rel:.1e} by "
                f"{_ratio(self.max_rel_diff, max_rel)}"
                + (f" (worst row {self.worst_row})" if self.worst_row else "")
            )
        if self.is_anomaly_agreement < min_agreement:
            problems.append(
                f"is_anomaly agreement {self.is_anomaly_agreement:.4f} is below "
                f"parity_min_agreement {min_agreement} ({self.n_decision_mismatches} of "
                f"{self.n_rows} decisions differ)"
            )
        return f"ONNX parity FAILED on {self.n_rows} rows: " + "; ".join(problems)


def _ratio(value: float, limit: float) -> str:
    return f"{value / limit:.3g}x" if math.isfinite(value) else "an infinite factor (NaN/inf)"


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model; `.report` has the numbers."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(report.message())
        self.report = report


def _torch_outputs(
    graph: ScoringGraph, X: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    device = _device_of(graph)
    scores, flags = [], []
    with _eval_mode(graph), torch.no_grad():
        for start in range(0, len(X), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(X[start : start + batch_size]))
            score, flag = graph(chunk.to(device))
            scores.append(score.cpu().numpy())
            flags.append(flag.cpu().numpy())
    return np.concatenate(scores), np.concatenate(flags)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank agreement over rows finite in both; 1.0 when it is undefined because nothing varies."""
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    if len(a) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return 1.0
    rho = spearmanr(a, b)[0]
    return float(rho) if np.isfinite(rho) else 0.0


def parity_check(
    scoring_module: nn.Module,
    threshold: float,
    onnx_path: str | Path,
    X: np.ndarray,
    max_abs: float,
    max_rel: float,
    min_agreement: float,
    batch_size: int = 4096,
) -> ParityReport:
    """Score `X` with torch eager and with onnxruntime and compare; never raises on a mismatch.

    A row's score passes when `|torch - ort| <= max_abs` OR `|torch - ort| / max(|torch|, 1e-12)
    <= max_rel`: the absolute tolerance covers scores near zero (where relative error explodes),
    the relative one covers large scores (where float32 rounding alone exceeds a fixed abs
    tolerance). `passed` = every row passes and the is_anomaly agreement >= `min_agreement`.
    A NaN on both sides counts as equal, on one side as an infinite difference.
    """
    X = np.asarray(X, dtype=np.float32)
    if len(X) == 0:
        raise ValueError("parity_check needs at least one row")
    torch_score, torch_flag = _torch_outputs(ScoringGraph(scoring_module, threshold), X, batch_size)
    ort_score, ort_flag = score_onnx(onnx_path, X, batch_size=batch_size)

    a, b = torch_score.astype(np.float64), ort_score.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        abs_diff = np.where(both_nan, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf))
        rel_diff = abs_diff / np.maximum(np.nan_to_num(np.abs(a), nan=np.inf), REL_EPS)
    rel_diff = np.where(both_nan, 0.0, np.nan_to_num(rel_diff, nan=np.inf))
    row_bad = (abs_diff > max_abs) & (rel_diff > max_rel)
    decision_bad = torch_flag != ort_flag
    agreement = 1.0 - float(decision_bad.mean())

    worst_row: dict = {}
    if row_bad.any():
        i = int(np.flatnonzero(row_bad)[np.argmax(abs_diff[row_bad])])
        worst_row = {"row": i, "torch": float(a[i]), "onnxruntime": float(b[i])}
    return ParityReport(
        max_abs_diff=float(abs_diff.max()),
        max_rel_diff=float(rel_diff.max()),
        spearman=_spearman(a, b),
        is_anomaly_agreement=agreement,
        n_rows=len(X),
        passed=bool(not row_bad.any() and agreement >= min_agreement),
        tolerances={
            "parity_max_abs": max_abs,
            "parity_max_rel": max_rel,
            "parity_min_agreement": min_agreement,
        },
        n_score_mismatches=int(row_bad.sum()),
        n_decision_mismatches=int(decision_bad.sum()),
        worst_row=worst_row,
    )


def require_parity(report: ParityReport) -> None:
    """Gate for the pipeline: a graph that does not match torch must not be registered."""
    if not report.passed:
        raise ParityError(report)


def _unique_name(model: onnx.ModelProto, base: str) -> str:
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def set_threshold(
    onnx_path: str | Path,
    threshold: float,
    out_path: str | Path,
    metadata_updates: dict | None = None,
) -> Path:
    """Write a copy of the model whose 'is_anomaly' compares against `threshold` instead.

    Recalibration without torch and without re-export: only the Greater node's threshold operand
    changes (to a float32 scalar initializer), so the scores are bit-identical to the original.
    `metadata_updates` are merged into the 'normalcy' metadata. `out_path` may equal `onnx_path`.
    """
    model = onnx.load_model(str(onnx_path), load_external_data=False)
    graph = model.graph
    producer = next((n for n in graph.node if DECISION_NAME in n.output), None)
    if producer is None or producer.op_type != "Greater":
        found = "nothing" if producer is None else f"a {producer.op_type} node"
        raise ValueError(
            f"{onnx_path}: expected a Greater node producing '{DECISION_NAME}', found {found}"
        )
    old = producer.input[1]
    users = sum(list(n.input).count(old) for n in graph.node)
    value = numpy_helper.from_array(np.asarray(threshold, dtype=np.float32))
    initializer = next((t for t in graph.initializer if t.name == old), None)
    if initializer is not None and users == 1 and old not in {v.name for v in graph.input}:
        value.name = old  # sole user: overwrite in place, names stay stable across recalibrations
        initializer.CopyFrom(value)
    else:
        value.name = _unique_name(model, "threshold")
        graph.initializer.append(value)
        producer.input[1] = value.name
        if users == 1:  # the old constant is now dead; drop it so the graph stays clean
            if initializer is not None:
                graph.initializer.remove(initializer)
            dead = [n for n in graph.node if n.op_type == "Constant" and old in n.output]
            for node in dead:
                graph.node.remove(node)
    _set_metadata(model, {**_get_metadata(model), **(metadata_updates or {})})
    return _save(model, Path(out_path))
