"""The torch-free artifact package: no torch import, and the calibration head's search-tree
p-value count against the brute-force count, on plain ONNX graphs run by onnxruntime."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import normalcy.artifact
from normalcy.artifact.calibration_head import (
    attach_head,
    conformal_p_values,
    graph_calibration,
    scores_of_tree,
    search_tree,
)
from normalcy.artifact.metadata import save_model
from normalcy.artifact.recalibration import recalibrate_graph

ARTIFACT_MODULES = sorted(
    f"normalcy.artifact.{m.name}" for m in pkgutil.iter_modules(normalcy.artifact.__path__)
)


def test_artifact_imports_no_torch() -> None:
    """Every artifact module (and the registry, which reads files through it) imports in a
    process where `import torch` fails, and leaves no torch in sys.modules."""
    modules = [*ARTIFACT_MODULES, "normalcy.registry"]
    script = f"""
import importlib, importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({{name}})")
        return None

sys.meta_path.insert(0, NoTorch())
for name in {modules!r}:
    importlib.import_module(name)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok", len({modules!r}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(modules)}"
    assert {"names", "metadata", "calibration_head", "recalibration"} <= {
        m.rsplit(".", 1)[1] for m in ARTIFACT_MODULES
    }


def identity_graph(path: Path, threshold: float, calibration: np.ndarray | None) -> Path:
    """score = input[:, 0] (a plain ONNX graph, no torch) with the calibration head on it."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("Squeeze", ["input", "axes"], ["score"])
    model = helper.make_model(
        helper.make_graph([node], "identity", [x], [score], [axes]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    attach_head(model, threshold, calibration)
    return save_model(model, path)


def graph_p_values(path: Path, scores: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    X = np.asarray(scores, dtype=np.float32)[:, None]
    return session.run(["p_value"], {"input": X})[0]


def brute_force_counts(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    c = np.asarray(calibration, dtype=np.float32)
    return np.array([int(np.sum(c >= s)) for s in np.asarray(scores, dtype=np.float32)])


def counts_of(p_values: np.ndarray, n: int) -> np.ndarray:
    return np.rint(p_values.astype(np.float64) * (n + 1)).astype(np.int64) - 1


def probe_scores(calibration: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random scores, every calibration value itself, its float32 neighbours, below the min,
    above the max, the extremes of float32 and NaN."""
    c = np.asarray(calibration, dtype=np.float32)
    lo, hi = float(c.min()), float(c.max())
    span = max(hi - lo, 1.0)
    return np.concatenate(
        [
            rng.uniform(lo - span, hi + span, size=200).astype(np.float32),
            c,
            np.nextafter(c, np.float32(np.inf)),
            np.nextafter(c, np.float32(-np.inf)),
            np.float32([lo - 1, hi + 1, -np.inf, np.inf, np.nan, 0.0, -0.0]),
            np.float32([np.finfo(np.float32).min, np.finfo(np.float32).max]),
        ]
    ).astype(np.float32)


CASES = {
    "n=1": np.float32([0.5]),
    "n=2 tied": np.float32([1.0, 1.0]),
    "n=3 (a perfect square minus one)": np.float32([3.0, 1.0, 2.0]),
    "n=17 not a block multiple": np.arange(17, dtype=np.float32)[::-1],
    "n=200 heavy ties": np.round(np.random.default_rng(0).normal(size=200), 1),
    "n=1655 continuous": np.random.default_rng(1).gamma(2.0, size=1655),
    "n=5000 with negatives": np.random.default_rng(2).normal(size=5000) * 1e3,
    "all equal": np.full(50, 7.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tree_p_values_equal_the_brute_force_count(case: str, tmp_path: Path) -> None:
    calibration = np.asarray(CASES[case], dtype=np.float32)
    rng = np.random.default_rng(len(calibration))
    scores = probe_scores(calibration, rng)
    path = identity_graph(tmp_path / "p.onnx", 0.0, calibration)
    p = graph_p_values(path, scores)
    n = len(calibration)
    assert p.dtype == np.float32 and p.shape == scores.shape
    np.testing.assert_array_equal(counts_of(p, n), brute_force_counts(scores, calibration))
    # bit-identical to the numpy reference computed in float32 the way the graph divides
    reference = (1 + brute_force_counts(scores, calibration)).astype(np.float32) / np.float32(n + 1)
    np.testing.assert_array_equal(p, reference)
    np.testing.assert_allclose(p, conformal_p_values(scores, calibration), rtol=1e-6)
    assert p[np.isnan(scores)] == pytest.approx(1 / (n + 1))  # NaN is never <= a score
    assert p[scores == -np.inf] == pytest.approx(1.0)  # below everything
    # the file gives the scores back (sorted), and recalibration swaps them
    threshold, stored = graph_calibration(path)
    assert threshold == 0.0
    np.testing.assert_array_equal(stored, np.sort(calibration))
    other = calibration[: max(1, n // 2)] + np.float32(1)
    out = recalibrate_graph(path, 1.0, other, tmp_path / "r.onnx")
    np.testing.assert_array_equal(
        counts_of(graph_p_values(out, scores), len(other)), brute_force_counts(scores, other)
    )
    np.testing.assert_array_equal(graph_calibration(out)[1], np.sort(other))


def tree_depth(tree: dict[str, list]) -> int:
    """The number of comparisons on the longest path from the root (node 0) to a leaf."""
    depth, frontier = 0, [0]
    while True:
        branches = [i for i in frontier if tree["nodes_modes"][i] != "LEAF"]
        if not branches:
            return depth
        depth += 1
        frontier = [
            c
            for i in branches
            for c in (tree["nodes_truenodeids"][i], tree["nodes_falsenodeids"][i])
        ]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 15, 16, 17, 99, 100, 1655, 5000])
def test_search_tree_is_balanced_and_holds_every_score(n: int) -> None:
    calibration = np.random.default_rng(n).normal(size=n).round(2)  # ties from n = 100 on
    tree = search_tree(calibration)
    n_distinct = len(np.unique(calibration.astype(np.float32)))
    assert len(tree["target_nodeids"]) == n_distinct + 1  # one leaf per gap between values
    assert tree_depth(tree) == int(np.ceil(np.log2(n_distinct + 1)))  # balanced: log2, not n
    leaves = np.sort(np.asarray(tree["target_weights"], dtype=np.float32))
    assert leaves[-1] == 1.0 and leaves[0] == np.float32(1) / np.float32(n + 1)
    assert np.all(np.diff(leaves) > 0)  # one count per leaf, all different
    np.testing.assert_array_equal(scores_of_tree(tree), np.sort(calibration.astype(np.float32)))


def test_a_large_calibration_set_gives_its_counts_back_and_a_huge_one_is_refused() -> None:
    calibration = np.round(np.random.default_rng(7).normal(size=300_000), 3)  # ~6000 distinct
    tree = search_tree(calibration)
    np.testing.assert_array_equal(scores_of_tree(tree), np.sort(calibration.astype(np.float32)))
    with pytest.raises(ValueError, match="at most 4194304.*subsample"):
        search_tree(np.zeros(2**22 + 1))


def test_the_head_compares_no_row_with_all_n(tmp_path: Path) -> None:
    """No [N, n] comparison: the count is one search-tree node, not an elementwise compare."""
    calibration = np.random.default_rng(0).normal(size=1655)
    path = identity_graph(tmp_path / "p.onnx", 0.0, calibration)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("TreeEnsembleRegressor") == 1 and "GreaterOrEqual" not in ops
    assert {o.domain: o.version for o in model.opset_import}["ai.onnx.ml"] == 3
    assert not any(t.dims and max(t.dims) >= 1655 for t in model.graph.initializer)


def blocked_head_graph(path: Path, threshold: float, calibration: np.ndarray) -> Path:
    """A file as the previous head wrote it: the sorted scores in a [B, b] matrix (NaN padding
    below the smallest, top block first), row q found by comparing with every row's first value,
    then gathered and compared value by value."""
    ascending = np.sort(calibration.astype(np.float32))
    size = int(np.sqrt(len(ascending))) + 1
    n_blocks = -(-(len(ascending) + 1) // size)
    padding = np.full(n_blocks * size - len(ascending), np.nan, dtype=np.float32)
    blocks = np.concatenate([padding, ascending]).reshape(n_blocks, size)[::-1].copy()
    h, f32 = "normalcy_head/", TensorProto.FLOAT
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis_0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("first", TensorProto.INT64, [1], [0]),
        helper.make_tensor("threshold", f32, [], [threshold]),
        helper.make_tensor("calibration_scores", f32, list(blocks.shape), blocks.ravel().tolist()),
        helper.make_tensor("size", f32, [], [float(size)]),
        helper.make_tensor("one", f32, [], [1.0]),
        helper.make_tensor("n_plus_1", f32, [], [len(ascending) + 1.0]),
    ]

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=h + output, **attrs)

    nodes = [
        helper.make_node("Squeeze", ["input", "axes"], ["score"]),
        node("Greater", ["score", "threshold"], "is_anomaly"),
        node("Gather", ["calibration_scores", "first"], "firsts", axis=1),
        node("GreaterOrEqual", ["firsts", "score"], "above"),
        node("Cast", ["above"], "above_f", to=f32),
        node("ReduceSum", ["above_f", "axis_0"], "whole", keepdims=0),
        node("Cast", ["whole"], "row", to=TensorProto.INT64),
        node("Gather", ["calibration_scores", "row"], "block", axis=0),
        node("Unsqueeze", ["score", "axes"], "column"),
        node("GreaterOrEqual", ["block", "column"], "within"),
        node("Cast", ["within"], "within_f", to=f32),
        node("ReduceSum", ["within_f", "axes"], "partial", keepdims=0),
        node("Mul", ["whole", "size"], "whole_count"),
        node("Add", ["whole_count", "partial"], "count"),
        node("Add", ["count", "one"], "numerator"),
        node("Div", ["numerator", "n_plus_1"], "p_value"),
    ]
    outputs = [
        helper.make_tensor_value_info("score", f32, ["N"]),
        helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["N"]),
        helper.make_tensor_value_info("p_value", f32, ["N"]),
    ]
    x = helper.make_tensor_value_info("input", f32, ["N", 1])
    model = helper.make_model(
        helper.make_graph(nodes, "blocked", [x], outputs, inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    return save_model(model, path)


def test_a_blocked_head_gives_its_scores_back_and_is_replaced_by_the_tree(tmp_path: Path) -> None:
    calibration = np.round(np.random.default_rng(3).gamma(2.0, size=300), 1).astype(np.float32)
    older = blocked_head_graph(tmp_path / "blocked.onnx", 2.0, calibration)
    scores = probe_scores(calibration, np.random.default_rng(0))
    before = graph_p_values(older, scores)
    np.testing.assert_array_equal(counts_of(before, 300), brute_force_counts(scores, calibration))
    threshold, stored = graph_calibration(older)
    assert threshold == 2.0
    np.testing.assert_array_equal(stored, np.sort(calibration))
    out = recalibrate_graph(older, threshold, stored, tmp_path / "tree.onnx")
    np.testing.assert_array_equal(graph_p_values(out, scores), before)  # bit for bit
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Gather" not in ops and "TreeEnsembleRegressor" in ops


def test_a_file_without_p_value_has_no_calibration(tmp_path: Path) -> None:
    path = identity_graph(tmp_path / "bare.onnx", 2.5, None)
    assert graph_calibration(path) == (2.5, None)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        identity_graph(tmp_path / "empty.onnx", 0.0, np.array([]))


def test_an_older_all_pairs_head_gives_its_scores_back_and_is_replaced(tmp_path: Path) -> None:
    """A file written before the blocked lookup: p_value from an [N, n] comparison."""
    calibration = np.float32([3.0, 1.0, 2.0, 2.0])
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1])
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["N"]),
        helper.make_tensor_value_info("p_value", TensorProto.FLOAT, ["N"]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("threshold", TensorProto.FLOAT, [], [1.5]),
        helper.make_tensor("calibration_scores", TensorProto.FLOAT, [4], calibration.tolist()),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    h = "normalcy_head/"
    nodes = [
        helper.make_node("Squeeze", ["input", "axes"], ["score"]),
        helper.make_node("Greater", ["score", "threshold"], ["is_anomaly"], name=h + "greater"),
        helper.make_node("Unsqueeze", ["score", "axes"], ["column"], name=h + "unsqueeze"),
        helper.make_node(
            "GreaterOrEqual", ["calibration_scores", "column"], ["ge"], name=h + "greaterorequal"
        ),
        helper.make_node("Cast", ["ge"], ["ge_f"], name=h + "cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["ge_f", "axes"], ["count"], name=h + "sum", keepdims=0),
        helper.make_node("Add", ["count", "one"], ["numerator"], name=h + "add"),
        helper.make_node("Shape", ["calibration_scores"], ["n"], name=h + "shape"),
        helper.make_node("Cast", ["n"], ["n_f"], name=h + "cast_n", to=TensorProto.FLOAT),
        helper.make_node("Add", ["n_f", "one"], ["denominator"], name=h + "add_n"),
        helper.make_node("Div", ["numerator", "denominator"], ["p_value"], name=h + "div"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "legacy", [x], outputs, inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    legacy = save_model(model, tmp_path / "legacy.onnx")
    threshold, stored = graph_calibration(legacy)
    assert threshold == 1.5
    np.testing.assert_array_equal(stored, np.sort(calibration))
    scores = probe_scores(calibration, np.random.default_rng(0))
    before = graph_p_values(legacy, scores)
    out = recalibrate_graph(legacy, threshold, stored, tmp_path / "tree.onnx")
    np.testing.assert_array_equal(graph_p_values(out, scores), before)  # same p-values, bit for bit
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Shape" not in ops and "TreeEnsembleRegressor" in ops  # old head gone, tree in place
