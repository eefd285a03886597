"""ONNX export of the scoring path, torch/onnxruntime parity gates, torch-free recalibration and
optional INT8 quantization.

The exported file has one input and up to four outputs (names from `normalcy.scoring`):

    input        float32 [N, d] or [N, C, H, W]   raw rows in the training data's units
    score        float32 [N]        higher is more anomalous
    is_anomaly   bool    [N]        score > threshold
    p_value      float32 [N]        (1 + #{calibration scores >= score}) / (n + 1)
    anomaly_map  float32 [N, H, W]  only when the scoring module returns (score, map)

The detector's scoring module is exported with torch's dynamo exporter. The calibration head
(is_anomaly and p_value) is then written as plain ONNX nodes on its score, reading two named
float32 initializers, the threshold and the calibration scores. Recalibration
(`recalibrate_graph`) removes that head and writes it again with new values: no torch, no
re-export, and the score subgraph is untouched, so the scores stay bit-identical.
`ScoringGraph` is the same computation in torch, the reference that parity compares against.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import spearmanr
from torch import nn

from normalcy.atomic import atomic_path
from normalcy.jsonio import json_default
from normalcy.scoring import (
    ANOMALY_MAP_NAME,
    DECISION_NAME,
    METADATA_KEY,
    P_VALUE_NAME,
    SCORE_NAME,
    load_session,
)

log = logging.getLogger(__name__)

INPUT_NAME = "input"
THRESHOLD_NAME = "threshold"
CALIBRATION_NAME = "calibration_scores"
HEAD_PREFIX = "normalcy_head/"  # names of the calibration head's nodes and constants
HEAD_OUTPUTS = (DECISION_NAME, P_VALUE_NAME)

# Denominator floor of the relative difference: scores are squared distances/errors, so a score
# this small is numerically zero and only the absolute tolerance is meaningful for it.
REL_EPS = 1e-12

_ONNX_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.BOOL: "bool", TensorProto.INT64: "int64"}


# --- the scoring computation, in torch ---------------------------------------------------------


def _split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A scoring module returns `score` or `(score, anomaly_map)`."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(
                "scoring_module must return score [N] or (score [N], anomaly_map [N, H, W]), "
                f"got a {type(out).__name__} of {len(out)} values"
            )
        return out[0], out[1]
    return out, None


def calibration_array(calibration_scores: np.ndarray) -> np.ndarray:
    """The calibration scores as the float32 vector the graph stores; empty or non-finite input
    is an error (a NaN would silently never count as >= any score)."""
    arr = np.asarray(calibration_scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"calibration_scores must be a non-empty 1-D array of scores, got shape {arr.shape}"
        )
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"calibration_scores has {n_bad} non-finite value(s) of {arr.size}")
    return arr.astype(np.float32)


def _check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return value


def conformal_p_values(scores: np.ndarray, calibration_scores: np.ndarray) -> np.ndarray:
    """`(1 + #{c >= s}) / (n + 1)` per score, compared in float32 as the graph does (float64
    result). A score tied with calibration scores counts them as at least as extreme, so ties
    make the p-value larger (conservative), never smaller."""
    cal = calibration_array(calibration_scores)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    counts = (cal[None, :] >= s[:, None]).sum(axis=1)
    return (1.0 + counts) / (len(cal) + 1.0)


def subsample_calibration(
    calibration_scores: np.ndarray, max_scores: int, seed: int = 0
) -> np.ndarray:
    """At most `max_scores` of the calibration scores, drawn at random without replacement.

    The graph compares each score with every stored calibration score ([N, n] in memory per
    batch), so a recalibration on a large batch must not store all of it. A random subsample of
    exchangeable scores still gives valid conformal p-values; only their resolution, 1/(n + 1),
    gets coarser. Seeded, and in the original order, so the result is reproducible."""
    arr = np.asarray(calibration_scores).reshape(-1)
    if max_scores < 1:
        raise ValueError(f"max_scores must be >= 1, got {max_scores}")
    if len(arr) <= max_scores:
        return arr
    rows = np.random.default_rng(seed).choice(len(arr), max_scores, replace=False)
    return arr[np.sort(rows)]


class ScorePath(nn.Module):
    """The part that is exported through torch: `scoring_module` with float32 outputs."""

    def __init__(self, scoring_module: nn.Module) -> None:
        super().__init__()
        self.scoring_module = scoring_module

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        score, anomaly_map = _split_output(self.scoring_module(x))
        if anomaly_map is None:
            return score.to(torch.float32)
        return score.to(torch.float32), anomaly_map.to(torch.float32)


class ScoringGraph(nn.Module):
    """The whole exported computation in torch: `(score, is_anomaly[, p_value][, anomaly_map])`.

    `is_anomaly = score > threshold` and `p_value = (1 + #{c >= score}) / (n + 1)` over the
    calibration scores `c`, both in float32 as the ONNX head computes them, so the decisions and
    p-values are the same in torch and in the file. Without calibration scores there is no
    p_value (an export for a quick check; the pipeline always passes them).
    """

    def __init__(
        self,
        scoring_module: nn.Module,
        threshold: float,
        calibration_scores: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.scoring_module = scoring_module
        device = _device_of(scoring_module)
        self.register_buffer(
            "threshold",
            torch.tensor(_check_threshold(threshold), dtype=torch.float32, device=device),
        )
        calibration = None
        if calibration_scores is not None:
            calibration = torch.from_numpy(calibration_array(calibration_scores)).to(device)
        self.register_buffer("calibration_scores", calibration)

    def output_names(self, has_map: bool) -> list[str]:
        names = [SCORE_NAME, DECISION_NAME]
        if self.calibration_scores is not None:
            names.append(P_VALUE_NAME)
        return names + ([ANOMALY_MAP_NAME] if has_map else [])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score, anomaly_map = _split_output(self.scoring_module(x))
        score = score.to(torch.float32)
        outputs = [score, score > self.threshold]
        if self.calibration_scores is not None:
            at_or_above = self.calibration_scores.unsqueeze(0) >= score.unsqueeze(1)
            count = at_or_above.to(torch.float32).sum(dim=1)
            outputs.append((count + 1.0) / (self.calibration_scores.numel() + 1.0))
        if anomaly_map is not None:
            outputs.append(anomaly_map.to(torch.float32))
        return tuple(outputs)


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


def _set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Store `metadata` as one JSON string under the 'normalcy' key, replacing any previous one."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, default=json_default))


def _get_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The 'normalcy' metadata of a loaded proto; {} when there is none."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Check, then write as one self-contained file, atomically."""
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return path


def _load(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """The model proto, or an error that names the file instead of protobuf's wire format."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file; expected an .onnx file")
    try:
        return onnx.load_model(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from None


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The 'normalcy' metadata of an ONNX file, read with onnx (no session); {} when none."""
    return _get_metadata(_load(path, load_external_data=False))


def update_metadata(path: str | Path, updates: dict[str, Any], out_path: str | Path) -> Path:
    """Write a copy of the model at `out_path` with `updates` merged into its 'normalcy'
    metadata; the graph is untouched. `out_path` may equal `path` (replaced atomically)."""
    model = _load(path)
    _set_metadata(model, {**_get_metadata(model), **updates})
    return _save(model, Path(out_path))


# --- the calibration head, as plain ONNX -------------------------------------------------------


def _names_in_use(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


def _unique(taken: set[str], base: str) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Every value a node reads, including outer-scope values read inside If/Loop bodies."""
    yield from node.input
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield from _subgraph_inputs(inner)


def _strip_head(model: onnx.ModelProto, source: str) -> None:
    """Remove is_anomaly and p_value and every node and constant only they needed.

    Dead-code elimination from the remaining outputs (score, anomaly_map) rather than a lookup
    by name, so it also strips an older file's head (a bare Greater against a threshold) and a
    head that a graph optimizer has rewritten. The score subgraph is kept node for node.
    """
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if SCORE_NAME not in outputs:
        raise ValueError(f"{source}: no '{SCORE_NAME}' output (outputs: {outputs})")
    kept_outputs = [o for o in graph.output if o.name not in HEAD_OUTPUTS]
    needed = {o.name for o in kept_outputs}
    kept_nodes = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept_nodes.append(node)
            needed.update(name for name in _subgraph_inputs(node) if name)
    kept_nodes.reverse()
    produced = {name for node in kept_nodes for name in node.output}
    kept_initializers = [t for t in graph.initializer if t.name in needed]
    kept_info = [v for v in graph.value_info if v.name in produced]
    for container, kept in (
        (graph.node, kept_nodes),
        (graph.output, kept_outputs),
        (graph.initializer, kept_initializers),
        (graph.value_info, kept_info),
    ):
        kept = list(kept)
        del container[:]
        container.extend(kept)


def _batch_dim(graph: onnx.GraphProto) -> str | int:
    """The score output's first dimension: its symbolic name, or a fixed size."""
    score = next(o for o in graph.output if o.name == SCORE_NAME)
    dims = score.type.tensor_type.shape.dim
    if not dims:
        return "N"
    dim = dims[0]
    return dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else "N")


def _attach_head(model: onnx.ModelProto, threshold: float, calibration: np.ndarray | None) -> None:
    """Append is_anomaly (and p_value when there are calibration scores) to a graph with a score
    output. Outputs end up ordered score, is_anomaly, p_value, anomaly_map."""
    graph = model.graph
    taken = _names_in_use(graph)
    batch = _batch_dim(graph)

    def constant(base: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value)
        tensor.name = _unique(taken, base)
        graph.initializer.append(tensor)
        return tensor.name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        name = _unique(taken, HEAD_PREFIX + op.lower())
        graph.node.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def value(base: str) -> str:
        return _unique(taken, HEAD_PREFIX + base)

    threshold_name = constant(THRESHOLD_NAME, np.asarray(_check_threshold(threshold), np.float32))
    node("Greater", [SCORE_NAME, threshold_name], DECISION_NAME)
    head = [helper.make_tensor_value_info(DECISION_NAME, TensorProto.BOOL, [batch])]
    if calibration is not None:
        scores = constant(CALIBRATION_NAME, calibration_array(calibration))
        axis = constant(HEAD_PREFIX + "axis_1", np.asarray([1], dtype=np.int64))
        one = constant(HEAD_PREFIX + "one", np.asarray(1.0, dtype=np.float32))
        column = node("Unsqueeze", [SCORE_NAME, axis], value("score_column"))  # [N, 1]
        at_or_above = node("GreaterOrEqual", [scores, column], value("at_or_above"))  # [N, n]
        as_float = node("Cast", [at_or_above], value("at_or_above_float"), to=TensorProto.FLOAT)
        count = node("ReduceSum", [as_float, axis], value("count"), keepdims=0)  # [N]
        numerator = node("Add", [count, one], value("numerator"))
        n = node("Shape", [scores], value("n"))  # read from the initializer: swappable
        n_float = node("Cast", [n], value("n_float"), to=TensorProto.FLOAT)
        denominator = node("Add", [n_float, one], value("denominator"))
        node("Div", [numerator, denominator], P_VALUE_NAME)
        head.append(helper.make_tensor_value_info(P_VALUE_NAME, TensorProto.FLOAT, [batch]))
    score = [o for o in graph.output if o.name == SCORE_NAME]
    rest = [o for o in graph.output if o.name != SCORE_NAME]
    del graph.output[:]
    graph.output.extend([*score, *head, *rest])


def output_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Name, dtype and shape of each graph output, for the metadata ('N' = the batch)."""
    specs = []
    for output in model.graph.output:
        tensor = output.type.tensor_type
        shape: list[str | int] = []
        for i, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            else:
                shape.append("N" if i == 0 else dim.dim_param or "?")
        dtype = _ONNX_DTYPES.get(tensor.elem_type, TensorProto.DataType.Name(tensor.elem_type))
        specs.append({"name": output.name, "dtype": dtype, "shape": shape})
    return specs


def _head_metadata(
    model: onnx.ModelProto, threshold: float, calibration: np.ndarray | None
) -> dict[str, Any]:
    """What the head writes into the metadata, always from the graph itself."""
    meta: dict[str, Any] = {"outputs": output_specs(model), "threshold": float(threshold)}
    if calibration is not None:
        meta["n_p_value_scores"] = len(calibration)
    return meta


# --- export and recalibration ------------------------------------------------------------------


def export_onnx(
    scoring_module: nn.Module,
    threshold: float,
    example: np.ndarray,
    path: str | Path,
    opset: int = 18,
    metadata: dict | None = None,
    calibration_scores: np.ndarray | None = None,
) -> Path:
    """Export `ScoringGraph(scoring_module, threshold, calibration_scores)` to one ONNX file.

    Input 'input' (dynamic batch, other dims fixed by `example`); outputs score, is_anomaly,
    p_value (with `calibration_scores`) and anomaly_map (when the module returns a map). A 1-row
    example is duplicated: torch.export specializes a dimension traced at size 1 to a constant,
    which would freeze the batch size. `metadata` goes under the 'normalcy' metadata key as JSON,
    with `outputs`, `threshold` and `n_p_value_scores` taken from the graph. The module's
    train/eval flags are left as they were; a failure leaves no file.
    """
    path = Path(path)
    example = np.asarray(example, dtype=np.float32)
    if example.ndim < 2 or len(example) == 0:
        raise ValueError(f"example must be a non-empty batch [N, ...], got shape {example.shape}")
    if len(example) == 1:
        example = np.concatenate([example, example])
    threshold = _check_threshold(threshold)
    calibration = None if calibration_scores is None else calibration_array(calibration_scores)
    module = ScorePath(scoring_module)
    sample = torch.from_numpy(np.ascontiguousarray(example)).to(_device_of(scoring_module))
    batch = torch.export.Dim("batch", min=1)
    with _eval_mode(module), torch.no_grad():
        has_map = _check_outputs(module(sample), len(sample))
        program = torch.onnx.export(
            module,
            (sample,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[SCORE_NAME, ANOMALY_MAP_NAME] if has_map else [SCORE_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    _attach_head(model, threshold, calibration)
    _set_metadata(model, {**(metadata or {}), **_head_metadata(model, threshold, calibration)})
    return _save(model, path)


def _check_outputs(out: Any, n_rows: int) -> bool:
    """Score must be [N], a map [N, H, W]; True when there is a map."""
    score, anomaly_map = (out, None) if isinstance(out, torch.Tensor) else out
    if tuple(score.shape) != (n_rows,):
        raise ValueError(
            f"scoring_module returned a score of shape {list(score.shape)} for {n_rows} rows; "
            f"expected [{n_rows}]"
        )
    if anomaly_map is not None and (anomaly_map.ndim != 3 or anomaly_map.shape[0] != n_rows):
        raise ValueError(
            f"scoring_module returned an anomaly map of shape {list(anomaly_map.shape)} for "
            f"{n_rows} rows; expected [{n_rows}, H, W]"
        )
    return anomaly_map is not None


def recalibrate_graph(
    onnx_path: str | Path,
    threshold: float,
    calibration_scores: np.ndarray,
    out_path: str | Path,
    metadata_updates: dict | None = None,
) -> Path:
    """Write a copy of the model whose is_anomaly and p_value use a new threshold and new
    calibration scores; no torch, no re-export.

    The calibration head is removed and written again from the new values, so the score subgraph
    is unchanged and the scores bit-identical. It also upgrades a file from before p_value
    existed. `metadata_updates` are merged into the 'normalcy' metadata; `threshold`, `outputs`
    and `n_p_value_scores` come from the new head. `out_path` may equal `onnx_path`.
    """
    threshold = _check_threshold(threshold)
    calibration = calibration_array(calibration_scores)
    model = _load(onnx_path)
    _strip_head(model, str(onnx_path))
    _attach_head(model, threshold, calibration)
    _set_metadata(
        model,
        {
            **_get_metadata(model),
            **(metadata_updates or {}),
            **_head_metadata(model, threshold, calibration),
        },
    )
    return _save(model, Path(out_path))


def graph_calibration(onnx_path: str | Path) -> tuple[float, np.ndarray | None]:
    """(threshold, calibration scores) stored in a file's calibration head."""
    model = _load(onnx_path)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    decision = next((n for n in graph.node if DECISION_NAME in n.output), None)
    if decision is None or decision.input[1] not in initializers:
        raise ValueError(f"{onnx_path}: no '{DECISION_NAME}' head with a threshold initializer")
    threshold = float(numpy_helper.to_array(initializers[decision.input[1]]))
    compare = next(
        (n for n in graph.node if n.op_type == "GreaterOrEqual" and n.name.startswith(HEAD_PREFIX)),
        None,
    )
    calibration = None
    if compare is not None and compare.input[0] in initializers:
        calibration = numpy_helper.to_array(initializers[compare.input[0]])
    return threshold, calibration


# --- parity: torch eager vs onnxruntime --------------------------------------------------------


@dataclass
class ParityReport:
    """torch eager vs onnxruntime on the same rows, every output; `message()` is for people."""

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
    n_p_value_mismatches: int = 0  # rows whose p_value differs more than their scores explain
    max_p_value_diff: float = 0.0
    n_map_mismatches: int = 0  # anomaly-map pixels outside both tolerances
    max_map_abs_diff: float = 0.0
    max_map_rel_diff: float = 0.0
    outputs_compared: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)  # torch has them, the file not

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        tol = self.tolerances
        max_abs, max_rel = tol["parity_max_abs"], tol["parity_max_rel"]
        min_agreement = tol["parity_min_agreement"]
        compared = ", ".join(self.outputs_compared)
        if self.passed:
            text = (
                f"ONNX parity passed on {self.n_rows} rows ({compared}): max |torch - "
                f"onnxruntime| = {self.max_abs_diff:.1e} (parity_max_abs {max_abs:.1e}), max "
                f"relative diff = {self.max_rel_diff:.1e} (parity_max_rel {max_rel:.1e}), "
                f"is_anomaly agreement {self.is_anomaly_agreement:.4f} (parity_min_agreement "
                f"{min_agreement}), spearman {self.spearman:.4f}"
            )
            if P_VALUE_NAME in self.outputs_compared:
                text += f", max p_value diff {self.max_p_value_diff:.1e}"
            if ANOMALY_MAP_NAME in self.outputs_compared:
                text += f", max anomaly_map diff {self.max_map_abs_diff:.1e}"
            return text
        problems = []
        if self.missing_outputs:
            problems.append(f"the file lacks the outputs {self.missing_outputs}")
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
        if self.n_p_value_mismatches:
            problems.append(
                f"{self.n_p_value_mismatches} of {self.n_rows} p_values differ by more than "
                f"their scores explain (max |diff| = {self.max_p_value_diff:.1e})"
            )
        if self.n_map_mismatches:
            problems.append(
                f"{self.n_map_mismatches} anomaly_map pixels are outside both tolerances: max "
                f"|diff| = {self.max_map_abs_diff:.1e} exceeds parity_max_abs {max_abs:.1e} by "
                f"{_ratio(self.max_map_abs_diff, max_abs)}, max relative diff = "
                f"{self.max_map_rel_diff:.1e} exceeds parity_max_rel {max_rel:.1e} by "
                f"{_ratio(self.max_map_rel_diff, max_rel)}"
            )
        return f"ONNX parity FAILED on {self.n_rows} rows: " + "; ".join(problems)


def _ratio(value: float, limit: float) -> str:
    return f"{value / limit:.3g}x" if math.isfinite(value) else "an infinite factor (NaN/inf)"


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model; `.report` has the numbers."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(report.message())
        self.report = report


def _torch_outputs(graph: ScoringGraph, X: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    device = _device_of(graph)
    chunks: list[tuple[torch.Tensor, ...]] = []
    with _eval_mode(graph), torch.no_grad():
        for start in range(0, len(X), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(X[start : start + batch_size]))
            chunks.append(tuple(t.cpu() for t in graph(chunk.to(device))))
    names = graph.output_names(has_map=len(chunks[0]) > len(graph.output_names(has_map=False)))
    return {name: torch.cat([c[i] for c in chunks]).numpy() for i, name in enumerate(names)}


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


@dataclass
class _Paired:
    """torch and onnxruntime outputs for the same rows, by name, plus what every gate reads.

    A missing output never agrees: its score is NaN and its decisions are the opposite."""

    reference: dict[str, np.ndarray]
    exported: dict[str, np.ndarray]

    @property
    def n_rows(self) -> int:
        return len(self.reference[SCORE_NAME])

    @property
    def missing(self) -> list[str]:
        return [name for name in self.reference if name not in self.exported]

    @property
    def compared(self) -> list[str]:
        return [name for name in self.reference if name in self.exported]

    @property
    def torch_score(self) -> np.ndarray:
        return self.reference[SCORE_NAME].astype(np.float64)

    @property
    def ort_score(self) -> np.ndarray:
        return self.exported.get(SCORE_NAME, np.full(self.n_rows, np.nan)).astype(np.float64)

    @property
    def decision_bad(self) -> np.ndarray:
        torch_flag = self.reference[DECISION_NAME]
        return torch_flag != self.exported.get(DECISION_NAME, ~torch_flag)

    def max_p_value_diff(self) -> float:
        if P_VALUE_NAME not in self.reference or P_VALUE_NAME not in self.exported:
            return 0.0
        return float(np.max(_diffs(self.reference[P_VALUE_NAME], self.exported[P_VALUE_NAME])[0]))


def _run_both(
    scoring_module: nn.Module,
    threshold: float,
    calibration_scores: np.ndarray | None,
    onnx_path: str | Path,
    X: np.ndarray,
    batch_size: int,
) -> _Paired:
    """torch and onnxruntime outputs of the same rows (as float32), by output name."""
    X = np.asarray(X, dtype=np.float32)
    if len(X) == 0:
        raise ValueError("parity needs at least one row")
    graph = ScoringGraph(scoring_module, threshold, calibration_scores)
    reference = _torch_outputs(graph, X, batch_size)
    exported = _ort_outputs(onnx_path, X, batch_size)
    unchecked = [name for name in exported if name not in reference]
    if unchecked:
        hint = " (pass calibration_scores to check p_value)" if P_VALUE_NAME in unchecked else ""
        raise ValueError(
            f"{onnx_path} has outputs {unchecked} that the torch reference does not produce, so "
            f"parity cannot check them{hint}"
        )
    return _Paired(reference, exported)


def _diffs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|a - b|, |a - b| / max(|a|, REL_EPS)) in float64; NaN on both sides counts as equal, on
    one side as an infinite difference."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        abs_diff = np.where(both_nan, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf))
        rel_diff = abs_diff / np.maximum(np.nan_to_num(np.abs(a), nan=np.inf), REL_EPS)
    return abs_diff, np.where(both_nan, 0.0, np.nan_to_num(rel_diff, nan=np.inf))


def _p_value_mismatches(
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
    """Run `X` through torch eager and onnxruntime and compare every output; never raises on a
    mismatch (but does on a file with outputs the torch reference cannot check).

    A row's score passes when `|torch - ort| <= max_abs` OR `|torch - ort| / max(|torch|, 1e-12)
    <= max_rel`: the absolute tolerance covers scores near zero (where relative error explodes),
    the relative one covers large scores (where float32 rounding alone exceeds a fixed abs
    tolerance). anomaly_map pixels use the same rule. p_values must be equal except as far as the
    score difference explains (`_p_value_mismatches`). `passed` = the file has every output, every
    row and pixel passes, and the is_anomaly agreement >= `min_agreement`.
    """
    paired = _run_both(scoring_module, threshold, calibration_scores, onnx_path, X, batch_size)
    reference, exported, missing = paired.reference, paired.exported, paired.missing
    a, b = paired.torch_score, paired.ort_score
    abs_diff, rel_diff = _diffs(a, b)
    row_bad = (abs_diff > max_abs) & (rel_diff > max_rel)
    decision_bad = paired.decision_bad
    agreement = 1.0 - float(decision_bad.mean())

    p_bad = np.zeros(paired.n_rows, dtype=bool)
    if P_VALUE_NAME in reference and P_VALUE_NAME in exported:
        torch_p, ort_p = reference[P_VALUE_NAME], exported[P_VALUE_NAME]
        p_bad = _p_value_mismatches(a, b, torch_p, ort_p, calibration_scores)
    map_bad = 0
    map_abs = map_rel = 0.0
    if ANOMALY_MAP_NAME in reference and ANOMALY_MAP_NAME in exported:
        torch_map, ort_map = reference[ANOMALY_MAP_NAME], exported[ANOMALY_MAP_NAME]
        if torch_map.shape != ort_map.shape:
            map_bad, map_abs, map_rel = torch_map.size, math.inf, math.inf
        else:
            pixel_abs, pixel_rel = _diffs(torch_map, ort_map)
            map_bad = int(((pixel_abs > max_abs) & (pixel_rel > max_rel)).sum())
            map_abs, map_rel = float(pixel_abs.max()), float(pixel_rel.max())

    worst_row: dict = {}
    if row_bad.any():
        i = int(np.flatnonzero(row_bad)[np.argmax(abs_diff[row_bad])])
        worst_row = {"row": i, "torch": float(a[i]), "onnxruntime": float(b[i])}
    passed = (
        not missing
        and not row_bad.any()
        and agreement >= min_agreement
        and not p_bad.any()
        and map_bad == 0
    )
    return ParityReport(
        max_abs_diff=float(abs_diff.max()),
        max_rel_diff=float(rel_diff.max()),
        spearman=_spearman(a, b),
        is_anomaly_agreement=agreement,
        n_rows=paired.n_rows,
        passed=bool(passed),
        tolerances={
            "parity_max_abs": max_abs,
            "parity_max_rel": max_rel,
            "parity_min_agreement": min_agreement,
        },
        n_score_mismatches=int(row_bad.sum()),
        n_decision_mismatches=int(decision_bad.sum()),
        worst_row=worst_row,
        n_p_value_mismatches=int(p_bad.sum()),
        max_p_value_diff=paired.max_p_value_diff(),
        n_map_mismatches=map_bad,
        max_map_abs_diff=map_abs,
        max_map_rel_diff=map_rel,
        outputs_compared=paired.compared,
        missing_outputs=missing,
    )


def require_parity(report: ParityReport) -> None:
    """Gate for the pipeline: a graph that does not match torch must not be registered."""
    if not report.passed:
        raise ParityError(report)


# --- INT8: dynamic quantization and its own, looser gate ---------------------------------------


def quantize_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """INT8 dynamic quantization (weights QInt8, activations quantized at run time) of an
    exported graph; its metadata is copied with `"quantized": "int8"`.

    `quant_pre_process` (shape inference and basic, portable graph optimizations) runs first, as
    onnxruntime recommends; it folds part of the calibration head into constants, which
    `recalibrate_graph` handles. Should it fail on some graph, the graph is quantized as
    exported. Only MatMul/Gemm-style weights change; the calibration head stays float32.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    metadata = read_onnx_metadata(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(onnx_path), str(source))
        except Exception as exc:  # a graph the symbolic shape inference cannot follow
            log.warning("quant_pre_process failed (%s); quantizing the graph as exported", exc)
            source = Path(onnx_path)
        quantized = Path(tmp) / "quantized.onnx"
        quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
        model = onnx.load_model(str(quantized))
    _set_metadata(model, {**metadata, "quantized": "int8"})
    return _save(model, Path(out_path))


@dataclass
class QuantizedParityReport:
    """torch eager vs the INT8 graph. INT8 cannot meet the float tolerances, so the gate is on
    what matters for anomaly detection: the ranking (spearman), the decisions (is_anomaly
    agreement) and a cap on the score error relative to the score's own scale."""

    max_rel_diff: float  # max |torch - int8| / max(|torch|, median |torch|)
    max_abs_diff: float
    spearman: float
    is_anomaly_agreement: float
    max_p_value_diff: float
    n_rows: int
    passed: bool
    tolerances: dict
    n_decision_mismatches: int = 0
    worst_row: dict = field(default_factory=dict)
    outputs_compared: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        tol = self.tolerances
        figures = [
            (
                f"spearman {self.spearman:.4f}",
                f"quantized_min_spearman {tol['quantized_min_spearman']}",
                self.spearman >= tol["quantized_min_spearman"],
            ),
            (
                f"is_anomaly agreement {self.is_anomaly_agreement:.4f} "
                f"({self.n_decision_mismatches} of {self.n_rows} differ)",
                f"quantized_min_agreement {tol['quantized_min_agreement']}",
                self.is_anomaly_agreement >= tol["quantized_min_agreement"],
            ),
            (
                f"max relative score diff {self.max_rel_diff:.2e}",
                f"quantized_max_rel {tol['quantized_max_rel']:.2e}",
                self.max_rel_diff <= tol["quantized_max_rel"],
            ),
        ]
        if self.passed:
            shown = ", ".join(f"{value} ({limit})" for value, limit, _ in figures)
            return (
                f"INT8 parity passed on {self.n_rows} rows: {shown}; "
                f"max p_value diff {self.max_p_value_diff:.2e}"
            )
        problems = (
            [f"the file lacks the outputs {self.missing_outputs}"] if self.missing_outputs else []
        )
        for value, limit, ok in figures:
            if not ok:
                problems.append(f"{value} misses {limit}")
        if self.max_rel_diff > tol["quantized_max_rel"]:
            problems[-1] += (
                f" by {_ratio(self.max_rel_diff, tol['quantized_max_rel'])} "
                f"(worst row {self.worst_row})"
            )
        return f"INT8 parity FAILED on {self.n_rows} rows: " + "; ".join(problems)


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
) -> QuantizedParityReport:
    """Compare an INT8 graph with torch; never raises on a mismatch.

    The relative score error is floored at the median |torch score|: a score near zero is
    'small' whatever INT8 makes of it, and a per-row relative error there says nothing.
    """
    paired = _run_both(scoring_module, threshold, calibration_scores, onnx_path, X, batch_size)
    a, b = paired.torch_score, paired.ort_score
    abs_diff, _ = _diffs(a, b)
    scale = np.maximum(np.abs(a), max(float(np.nanmedian(np.abs(a))), REL_EPS))
    with np.errstate(invalid="ignore"):
        rel_diff = np.nan_to_num(abs_diff / np.nan_to_num(scale, nan=np.inf), nan=np.inf)
    decision_bad = paired.decision_bad
    agreement = 1.0 - float(decision_bad.mean())
    spearman = _spearman(a, b)
    i = int(np.argmax(rel_diff))
    max_rel_diff = float(rel_diff[i])
    passed = (
        not paired.missing
        and spearman >= min_spearman
        and agreement >= min_agreement
        and max_rel_diff <= max_rel
    )
    return QuantizedParityReport(
        max_rel_diff=max_rel_diff,
        max_abs_diff=float(abs_diff.max()),
        spearman=spearman,
        is_anomaly_agreement=agreement,
        max_p_value_diff=paired.max_p_value_diff(),
        n_rows=paired.n_rows,
        passed=bool(passed),
        tolerances={
            "quantized_max_rel": max_rel,
            "quantized_min_spearman": min_spearman,
            "quantized_min_agreement": min_agreement,
        },
        n_decision_mismatches=int(decision_bad.sum()),
        worst_row={"row": i, "torch": float(a[i]), "int8": float(b[i])},
        outputs_compared=paired.compared,
        missing_outputs=paired.missing,
    )
