"""The calibration head: is_anomaly and p_value as plain ONNX nodes on a graph's score.

    is_anomaly = score > threshold
    p_value    = (1 + #{calibration scores >= score}) / (n + 1)

The count is exact (float32 comparisons, as in `conformal_p_values`) but does not compare a score
with all n calibration scores: p_value is one `TreeEnsembleRegressor` node (ONNX-ML, run natively
by onnxruntime) whose single tree is a balanced binary search tree over the distinct sorted
calibration scores d_0 < ... < d_{K-1}. Each branch asks `score <= d_m`; leaf i covers
(d_{i-1}, d_i] and holds the p-value of c_i = #{c >= d_i}, (1 + c_i) / (n + 1) divided in
float32, so a row costs about log2(K) comparisons and no arithmetic (16 us per batch of 1024 at
n = 1655, against 51 us for the earlier blocked sqrt(n) lookup). NaN is never <= anything, so a
NaN score ends in the last leaf and counts nothing, as the brute-force comparison does; -inf
ends in the first and counts all n.
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
    DECISION_NAME,
    HEAD_OUTPUTS,
    HEAD_PREFIX,
    ML_DOMAIN,
    ML_OPSET,
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


MAX_TREE_SCORES = 2**22  # leaf p-values give their counts back exactly below this many scores


def leaf_p_values(counts: np.ndarray, n: int) -> np.ndarray:
    """(1 + count) / (n + 1) divided in float32, the values the tree's leaves hold."""
    return (1 + np.asarray(counts)).astype(np.float32) / np.float32(n + 1)


def search_tree(calibration_scores: np.ndarray) -> dict[str, list]:
    """The p-value tree's ONNX-ML attributes: a balanced binary search tree over the distinct
    calibration scores whose leaves, left to right, hold the p-values of the counts
    #{c >= d_i} for i = 0..K (the last count 0, its p-value 1 / (n + 1)).

    Node 0 is the root; children are numbered depth first. Built without recursion depth
    worries: the tree is balanced, so the stack never exceeds log2(K) + 1 entries."""
    cal = np.sort(calibration_array(calibration_scores))
    if len(cal) > MAX_TREE_SCORES:
        raise ValueError(
            f"{len(cal)} calibration scores; the p-value head stores at most {MAX_TREE_SCORES} "
            "(subsample them: a random subsample still gives valid p-values)"
        )
    distinct = np.unique(cal)
    counts = np.append(len(cal) - np.searchsorted(cal, distinct, side="left"), 0)
    leaf_values = leaf_p_values(counts, len(cal))
    modes: list[str] = []
    values: list[float] = []
    true_ids: list[int] = []
    false_ids: list[int] = []
    leaf_ids: list[int] = []
    leaf_weights: list[float] = []

    def grow(low: int, high: int) -> int:  # leaves low..high; returns the subtree's root id
        node = len(modes)
        modes.append("LEAF")
        values.append(0.0)
        true_ids.append(0)
        false_ids.append(0)
        if low == high:
            leaf_ids.append(node)
            leaf_weights.append(float(leaf_values[low]))
            return node
        middle = (low + high) // 2
        modes[node], values[node] = "BRANCH_LEQ", float(distinct[middle])
        true_ids[node] = grow(low, middle)
        false_ids[node] = grow(middle + 1, high)
        return node

    grow(0, len(distinct))
    n_nodes, n_leaves = len(modes), len(leaf_ids)
    return {
        "nodes_treeids": [0] * n_nodes,
        "nodes_nodeids": list(range(n_nodes)),
        "nodes_featureids": [0] * n_nodes,
        "nodes_modes": modes,
        "nodes_values": values,
        "nodes_truenodeids": true_ids,
        "nodes_falsenodeids": false_ids,
        "nodes_missing_value_tracks_true": [0] * n_nodes,
        "target_treeids": [0] * n_leaves,
        "target_nodeids": leaf_ids,
        "target_ids": [0] * n_leaves,
        "target_weights": leaf_weights,
    }


def scores_of_tree(attributes: dict[str, list]) -> np.ndarray:
    """The calibration scores a p-value tree was grown from, sorted: the distinct values are the
    branch thresholds, and each one's multiplicity is the drop between neighbouring leaf counts
    (strictly decreasing from left to right). The smallest leaf, 1 / (n + 1), gives n."""
    branches = [m != "LEAF" for m in attributes["nodes_modes"]]
    distinct = np.sort(np.asarray(attributes["nodes_values"], dtype=np.float32)[branches])
    p_values = np.sort(np.asarray(attributes["target_weights"], dtype=np.float64))[::-1]
    n_plus_1 = np.rint(1.0 / p_values[-1])
    counts = np.rint(p_values * n_plus_1).astype(np.int64) - 1
    return np.repeat(distinct, counts[:-1] - counts[1:])


def scores_of_blocks(blocks: np.ndarray) -> np.ndarray:
    """The calibration scores stored in an earlier head's [B, b] block matrix (NaN padding below
    the smallest, top block first), sorted."""
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

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.taken = _names_in_use(model.graph)

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
    """The search-tree count of the module docstring, as ONNX nodes writing P_VALUE_NAME."""
    _use_ml_opset(head.model)
    axis = head.constant(HEAD_PREFIX + "axis_1", np.asarray([1], dtype=np.int64))
    column = head.node("Unsqueeze", [SCORE_NAME, axis])  # [N, 1]: the tree reads one feature
    p_value = head.node(
        "TreeEnsembleRegressor",
        [column],
        domain=ML_DOMAIN,
        n_targets=1,
        aggregate_function="SUM",
        post_transform="NONE",
        **search_tree(calibration),
    )
    head.node("Squeeze", [p_value, axis], P_VALUE_NAME)


def _use_ml_opset(model: onnx.ModelProto) -> None:
    """Import the ONNX-ML domain at the version whose TreeEnsembleRegressor the head writes
    (later versions replace that operator with TreeEnsemble)."""
    imports = {o.domain: o for o in model.opset_import}
    if ML_DOMAIN not in imports:
        model.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    elif imports[ML_DOMAIN].version != ML_OPSET:
        raise ValueError(
            f"the graph imports {ML_DOMAIN} version {imports[ML_DOMAIN].version}; the calibration "
            f"head needs version {ML_OPSET}"
        )


def _f32(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def attach_head(
    model: onnx.ModelProto, threshold: float, calibration: np.ndarray | None = None
) -> None:
    """Append is_anomaly (and p_value when there are calibration scores) to a graph with a score
    output. Outputs end up ordered score, is_anomaly, p_value, then the rest as they were."""
    graph = model.graph
    batch = _batch_dim(graph)
    head = _HeadWriter(model)
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
    None for the scores when the head has no p_value. Reads this head's search tree and the
    earlier heads' block matrix and plain vector alike."""
    graph = load_model(onnx_path).graph
    initializers = {t.name: t for t in graph.initializer}
    decision = next((n for n in graph.node if DECISION_NAME in n.output), None)
    if decision is None or decision.input[1] not in initializers:
        raise ValueError(f"{onnx_path}: no '{DECISION_NAME}' head with a threshold initializer")
    threshold = float(numpy_helper.to_array(initializers[decision.input[1]]))
    for node in graph.node:
        if node.name.startswith(HEAD_PREFIX) and node.op_type == "TreeEnsembleRegressor":
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attributes["nodes_modes"] = [m.decode() for m in attributes["nodes_modes"]]
            return threshold, scores_of_tree(attributes)
    head = [n for n in graph.node if n.name.startswith(HEAD_PREFIX) and n.input[0] in initializers]
    # Earlier heads: a blocked lookup gathered from a [B, b] matrix, the first compared with a
    # vector.
    # Blocks first: a graph optimizer may fold the block firsts into a vector compared likewise.
    for op, ndim, scores in (("Gather", 2, scores_of_blocks), ("GreaterOrEqual", 1, np.sort)):
        for node in head:
            stored = numpy_helper.to_array(initializers[node.input[0]])
            if node.op_type == op and stored.ndim == ndim:
                return threshold, scores(stored)
    return threshold, None
