"""The calibration head: is_anomaly and p_value as plain ONNX nodes on a graph's score.

    is_anomaly = score > threshold
    p_value    = (1 + #{calibration scores >= score}) / (n + 1)

The count is exact (float32 comparisons, as in `conformal_p_values`) but does not compare a score
with all n calibration scores. The sorted scores are cut into B blocks of b consecutive values
(b = ceil(sqrt(n + 1))), padded with at least one NaN below the smallest, and stored as the
[B, b] initializer `calibration_scores`, one block per row from the top block down, each row
ascending. A score is compared with the first (smallest) value of every row: the q rows whose
first value is >= score lie wholly at or above it, and they are rows 0..q-1, so row q is the
only one that can hold values on both sides. That row is gathered and compared value by value:
count = q * b + #{row q >= score}, about 2 sqrt(n) comparisons per row instead of n. NaN is
never >= anything, so the padding counts for no score (and keeps q < B, a -inf score included),
and a NaN score counts nothing, as the brute-force comparison does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normalcy.artifact.metadata import load_model, output_specs
from normalcy.artifact.names import (
    CALIBRATION_NAME,
    DECISION_NAME,
    HEAD_OUTPUTS,
    HEAD_PREFIX,
    P_VALUE_NAME,
    SCORE_NAME,
    THRESHOLD_NAME,
)


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


def check_threshold(threshold: float) -> float:
    """The threshold as a finite float, or a ValueError saying what was given."""
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return value


def conformal_p_values(scores: np.ndarray, calibration_scores: np.ndarray) -> np.ndarray:
    """`(1 + #{c >= s}) / (n + 1)` per score, compared in float32 as the graph does (float64
    result); the brute-force reference for the graph's blocked lookup. A score tied with
    calibration scores counts them as at least as extreme, so ties make the p-value larger
    (conservative), never smaller."""
    cal = calibration_array(calibration_scores)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    counts = (cal[None, :] >= s[:, None]).sum(axis=1)
    return (1.0 + counts) / (len(cal) + 1.0)


def subsample_calibration(
    calibration_scores: np.ndarray, max_scores: int, seed: int = 0
) -> np.ndarray:
    """At most `max_scores` of the calibration scores, drawn at random without replacement.

    Every stored score is a constant in the graph (a file that grows with the batch) and sets
    the head's block size, so a recalibration on a large batch must not store all of it. A
    random subsample of exchangeable scores still gives valid conformal p-values; only their
    resolution, 1/(n + 1), gets coarser. Seeded, and in the original order, so the result is
    reproducible."""
    arr = np.asarray(calibration_scores).reshape(-1)
    if max_scores < 1:
        raise ValueError(f"max_scores must be >= 1, got {max_scores}")
    if len(arr) <= max_scores:
        return arr
    rows = np.random.default_rng(seed).choice(len(arr), max_scores, replace=False)
    return arr[np.sort(rows)]


def calibration_blocks(calibration_scores: np.ndarray) -> np.ndarray:
    """The layout of the blocked p-value lookup: the calibration scores sorted, with NaN padding
    below the smallest (1 to b values), cut into blocks of b = ceil(sqrt(n + 1)) consecutive
    values, as a float32 matrix [B, b] whose row 0 is the top block (each row ascending)."""
    cal = np.sort(calibration_array(calibration_scores))
    size = math.isqrt(len(cal)) + 1  # ceil(sqrt(n + 1)) for n >= 1, and b * b >= n + 1
    n_blocks = -(-(len(cal) + 1) // size)
    padding = np.full(n_blocks * size - len(cal), np.nan, dtype=np.float32)
    return np.concatenate([padding, cal]).reshape(n_blocks, size)[::-1].copy()


def scores_of_blocks(blocks: np.ndarray) -> np.ndarray:
    """The calibration scores stored in a [B, b] block matrix, sorted (the padding dropped)."""
    flat = np.asarray(blocks, dtype=np.float32)[::-1].reshape(-1)
    return flat[np.isfinite(flat)]  # the scores themselves are finite (calibration_array)


# --- writing and removing the head -------------------------------------------------------------


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


def _batch_dim(graph: onnx.GraphProto) -> str | int:
    """The score output's first dimension: its symbolic name, or a fixed size."""
    score = next(o for o in graph.output if o.name == SCORE_NAME)
    dims = score.type.tensor_type.shape.dim
    if not dims:
        return "N"
    dim = dims[0]
    return dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else "N")


class _HeadWriter:
    """Appends constants and nodes to a graph under fresh names with the head's prefix."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.taken = _names_in_use(graph)

    def constant(self, base: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(np.asarray(value))
        tensor.name = _unique(self.taken, base)
        self.graph.initializer.append(tensor)
        return tensor.name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """One node; `output` is its fixed name (a graph output) or, if None, a fresh one."""
        name = _unique(self.taken, HEAD_PREFIX + op.lower())
        out = output or _unique(self.taken, name + "_out")
        self.graph.node.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def _write_p_value(head: _HeadWriter, calibration: np.ndarray) -> None:
    """The blocked count of the module docstring, as ONNX nodes writing P_VALUE_NAME."""
    blocks = calibration_blocks(calibration)
    size = blocks.shape[1]
    constant = head.constant
    blocks_name = constant(CALIBRATION_NAME, blocks)
    axis = constant(HEAD_PREFIX + "axis_1", np.asarray([1], dtype=np.int64))
    f32 = TensorProto.FLOAT
    first = constant(HEAD_PREFIX + "first", np.asarray([0], dtype=np.int64))
    firsts = head.node("Gather", [blocks_name, first], axis=1)  # [B, 1], folded to a constant
    # [B, N], not [N, B]: onnxruntime broadcasts one constant against a whole row of scores at a
    # time, several times faster than one score against a short row of constants.
    above = head.node("GreaterOrEqual", [firsts, SCORE_NAME])  # rows wholly at or above
    axis_0 = constant(HEAD_PREFIX + "axis_0", np.asarray([0], dtype=np.int64))
    whole = head.node("ReduceSum", [head.node("Cast", [above], to=f32), axis_0], keepdims=0)
    boundary = head.node("Cast", [whole], to=TensorProto.INT64)  # row q
    block = head.node("Gather", [blocks_name, boundary], axis=0)  # [N, b]
    column = head.node("Unsqueeze", [SCORE_NAME, axis])  # [N, 1]
    within = head.node("GreaterOrEqual", [block, column])  # [N, b]
    partial = head.node("ReduceSum", [head.node("Cast", [within], to=f32), axis], keepdims=0)
    whole_count = head.node("Mul", [whole, constant(HEAD_PREFIX + "block_size", _f32(size))])
    count = head.node("Add", [whole_count, partial])
    numerator = head.node("Add", [count, constant(HEAD_PREFIX + "one", _f32(1.0))])
    denominator = constant(HEAD_PREFIX + "n_plus_1", _f32(len(calibration) + 1))
    head.node("Div", [numerator, denominator], P_VALUE_NAME)


def _f32(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def attach_head(
    model: onnx.ModelProto, threshold: float, calibration: np.ndarray | None = None
) -> None:
    """Append is_anomaly (and p_value when there are calibration scores) to a graph with a score
    output. Outputs end up ordered score, is_anomaly, p_value, then the rest as they were."""
    graph = model.graph
    batch = _batch_dim(graph)
    head = _HeadWriter(graph)
    threshold_name = head.constant(THRESHOLD_NAME, _f32(check_threshold(threshold)))
    head.node("Greater", [SCORE_NAME, threshold_name], DECISION_NAME)
    outputs = [helper.make_tensor_value_info(DECISION_NAME, TensorProto.BOOL, [batch])]
    if calibration is not None:
        _write_p_value(head, calibration_array(calibration))
        outputs.append(helper.make_tensor_value_info(P_VALUE_NAME, TensorProto.FLOAT, [batch]))
    score = [o for o in graph.output if o.name == SCORE_NAME]
    rest = [o for o in graph.output if o.name != SCORE_NAME]
    del graph.output[:]
    graph.output.extend([*score, *outputs, *rest])


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Every value a node reads, including outer-scope values read inside If/Loop bodies."""
    yield from node.input
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield from _subgraph_inputs(inner)


def strip_head(model: onnx.ModelProto, source: str) -> None:
    """Remove is_anomaly and p_value and every node and constant only they needed.

    Dead-code elimination from the remaining outputs (score, anomaly_map, explanations) rather
    than a lookup by name, so it also strips an older file's head (a bare Greater against a
    threshold, or the all-pairs p_value count) and a head that a graph optimizer has rewritten.
    The score subgraph is kept node for node.
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


def head_metadata(
    model: onnx.ModelProto, threshold: float, calibration: np.ndarray | None
) -> dict[str, Any]:
    """What the head writes into the metadata, always from the graph itself."""
    meta: dict[str, Any] = {"outputs": output_specs(model), "threshold": float(threshold)}
    if calibration is not None:
        meta["n_p_value_scores"] = len(calibration)
    return meta


def graph_calibration(onnx_path: str | Path) -> tuple[float, np.ndarray | None]:
    """(threshold, calibration scores sorted ascending) stored in a file's calibration head;
    None for the scores when the head has no p_value. Reads this head's block matrix and the
    older head's plain vector alike."""
    graph = load_model(onnx_path).graph
    initializers = {t.name: t for t in graph.initializer}
    decision = next((n for n in graph.node if DECISION_NAME in n.output), None)
    if decision is None or decision.input[1] not in initializers:
        raise ValueError(f"{onnx_path}: no '{DECISION_NAME}' head with a threshold initializer")
    threshold = float(numpy_helper.to_array(initializers[decision.input[1]]))
    head = [n for n in graph.node if n.name.startswith(HEAD_PREFIX) and n.input[0] in initializers]
    # The blocked lookup gathers from the [B, b] matrix; an older head compared with a vector.
    # Blocks first: a graph optimizer may fold the block firsts into a vector compared likewise.
    for op, ndim, scores in (("Gather", 2, scores_of_blocks), ("GreaterOrEqual", 1, np.sort)):
        for node in head:
            stored = numpy_helper.to_array(initializers[node.input[0]])
            if node.op_type == op and stored.ndim == ndim:
                return threshold, scores(stored)
    return threshold, None
