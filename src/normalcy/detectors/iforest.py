"""Isolation Forest reference baseline, fitted by scikit-learn, scored by a compiled torch graph
and exported as onnxruntime's native tree ensemble."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.ensemble import IsolationForest as SklearnIsolationForest
from torch import nn

from normalcy.artifact.names import ML_DOMAIN, ML_OPSET
from normalcy.detectors.base import Detector, FitData, Prediction, under_prefix, with_prefix
from normalcy.detectors.registry import register


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): mean path length of an unsuccessful BST search among n points (Liu et al. 2008,
    eq. 1), the depth credited to a leaf still holding n training rows; as scikit-learn's
    `_average_path_length` (0 for n <= 1, 1 for n = 2)."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 3.0)
    general = 2.0 * (np.log(safe - 1.0) + np.euler_gamma) - 2.0 * (safe - 1.0) / safe
    return np.where(n <= 1, 0.0, np.where(n == 2, 1.0, general))


def float32_at_most(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 threshold.

    scikit-learn compares a float32 feature with a float64 threshold (`x <= t` goes left). For
    float32 x, `x <= t` holds exactly when `x <= round_down_to_float32(t)`, so the graph can
    compare in float32 and still take every branch sklearn takes (round-to-nearest would not:
    thresholds are midpoints between float32 values, and the nearest float32 may lie above t)."""
    threshold = np.asarray(threshold, dtype=np.float64)
    rounded = threshold.astype(np.float32)
    above = rounded.astype(np.float64) > threshold
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded


def node_depths(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Depth of every node (root 0) from the child arrays (-1 marks a leaf)."""
    depth = np.zeros(len(left), dtype=np.int64)
    for node in range(len(left)):  # sklearn numbers a parent before its children
        if left[node] >= 0:
            depth[left[node]] = depth[right[node]] = depth[node] + 1
    return depth


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`table[index]` for a 1-d table, written so that it exports as one ONNX Gather that reads
    the table initializer itself (plain indexing exports as GatherND on a per-use copy)."""
    return torch.index_select(table, 0, index.reshape(-1)).reshape(index.shape)


TABLES = ("feature", "threshold", "left", "right", "value", "roots")  # the compiled forest


def tree_ensemble(tables: dict[str, np.ndarray]) -> dict[str, list]:
    """The flat `TABLES` of `IsolationForestGraph` as the attributes of one ONNX-ML
    `TreeEnsembleRegressor` averaging the trees' leaf values (the mean path length).

    Only the nodes reachable from a root are written (the padding is not); node ids are local to
    each tree. `x <= threshold` is BRANCH_LEQ on the same float32 thresholds, so onnxruntime takes
    every branch the torch graph and scikit-learn take."""
    feature, threshold, left, right, value, roots = (tables[name] for name in TABLES)
    own = np.arange(len(left))
    split = left != own  # a leaf (and the padding) points to itself
    reachable = np.zeros(len(left), dtype=bool)
    frontier = np.asarray(roots)
    while frontier.size:
        reachable[frontier] = True
        inner = frontier[split[frontier]]
        frontier = np.concatenate([left[inner], right[inner]])
    nodes = own[reachable]
    tree = np.searchsorted(roots, own, side="right") - 1  # the tree of every flat index
    local = own - roots[tree]  # its id within that tree
    is_split = split[nodes]
    leaves = nodes[~is_split]
    return {
        "nodes_treeids": tree[nodes].tolist(),
        "nodes_nodeids": local[nodes].tolist(),
        "nodes_featureids": np.where(is_split, feature[nodes], 0).tolist(),
        "nodes_modes": np.where(is_split, "BRANCH_LEQ", "LEAF").tolist(),
        "nodes_values": np.where(is_split, threshold[nodes], 0.0).astype(np.float32).tolist(),
        "nodes_truenodeids": np.where(is_split, local[left[nodes]], 0).tolist(),
        "nodes_falsenodeids": np.where(is_split, local[right[nodes]], 0).tolist(),
        "nodes_missing_value_tracks_true": [0] * len(nodes),
        "target_treeids": tree[leaves].tolist(),
        "target_nodeids": local[leaves].tolist(),
        "target_ids": [0] * len(leaves),
        "target_weights": value[leaves].astype(np.float32).tolist(),
        "n_targets": 1,
        "aggregate_function": "AVERAGE",
        "post_transform": "NONE",
    }


class IsolationForestGraph(nn.Module):
    """Raw rows -> sklearn's anomaly score `2 ** (-E[h(x)] / c(max_samples))`, as a torch graph.

    The Hummingbird "tree traversal" compilation (Nakandala et al., OSDI 2020): every tree's node
    arrays are padded and concatenated into flat tables (`T * max_nodes` entries, child pointers
    already offset into the flat table, leaves pointing to themselves). All rows start at each
    tree's root and take `depth` steps of gather feature/threshold -> `x <= threshold` ->
    left/right child, with no Python loop over rows or trees; the node reached holds the path
    length `depth(leaf) + c(n_node_samples(leaf))`.

    That traversal is what torch runs. The ONNX export writes the same trees as one native
    `TreeEnsembleRegressor` node instead (`tree_ensemble`): onnxruntime walks each row down each
    tree without the `depth` rounds of gathers over every tree, several times faster.
    """

    def __init__(
        self,
        feature: np.ndarray,
        threshold: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        value: np.ndarray,
        roots: np.ndarray,
        depth: int,
        normalizer: float,
    ) -> None:
        super().__init__()
        self.register_buffer("feature", torch.as_tensor(feature, dtype=torch.long))
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))
        self.register_buffer("left", torch.as_tensor(left, dtype=torch.long))
        self.register_buffer("right", torch.as_tensor(right, dtype=torch.long))
        self.register_buffer("value", torch.as_tensor(value, dtype=torch.float32))
        self.register_buffer("roots", torch.as_tensor(roots, dtype=torch.long))
        self.depth = depth
        self.log2_over_c = math.log(2.0) / normalizer
        self.ensemble = tree_ensemble({name: getattr(self, name).numpy() for name in TABLES})

    def forward(self, x: torch.Tensor) -> Prediction:
        x = x.to(torch.float32).flatten(1)
        if torch.onnx.is_in_onnx_export():
            mean_path = torch.onnx.ops.symbolic(
                f"{ML_DOMAIN}::TreeEnsembleRegressor",
                (x,),
                self.ensemble,
                dtype=torch.float32,
                shape=(x.shape[0], 1),
                version=ML_OPSET,
            ).reshape(-1)
            return Prediction(torch.exp(-mean_path * self.log2_over_c))
        node = self.roots.unsqueeze(0).expand(x.shape[0], -1)  # [N, T] flat node index
        for _ in range(self.depth):
            values = torch.gather(x, 1, lookup(self.feature, node))
            go_left = values <= lookup(self.threshold, node)
            node = torch.where(go_left, lookup(self.left, node), lookup(self.right, node))
        mean_path = lookup(self.value, node).mean(dim=1)
        return Prediction(torch.exp(-mean_path * self.log2_over_c))


def compile_forest(forest: SklearnIsolationForest) -> IsolationForestGraph:
    """The fitted forest as an `IsolationForestGraph` (all features per tree, as fitted here)."""
    trees = [estimator.tree_ for estimator in forest.estimators_]
    width = max(tree.node_count for tree in trees)
    n_trees = len(trees)
    feature = np.zeros((n_trees, width), dtype=np.int64)
    threshold = np.zeros((n_trees, width), dtype=np.float32)
    value = np.zeros((n_trees, width), dtype=np.float64)
    own = np.arange(width) + (np.arange(n_trees) * width)[:, None]  # padding points to itself
    left, right = own.copy(), own.copy()
    for t, tree in enumerate(trees):
        n = tree.node_count
        split = tree.children_left >= 0
        feature[t, :n] = np.where(split, tree.feature, 0)
        threshold[t, :n] = np.where(split, float32_at_most(tree.threshold), 0.0)
        left[t, :n] = np.where(split, tree.children_left + t * width, own[t, :n])
        right[t, :n] = np.where(split, tree.children_right + t * width, own[t, :n])
        depth = node_depths(tree.children_left, tree.children_right)
        value[t, :n] = depth + average_path_length(tree.n_node_samples)
    return IsolationForestGraph(
        feature.reshape(-1),
        threshold.reshape(-1),
        left.reshape(-1),
        right.reshape(-1),
        value.reshape(-1),
        np.arange(n_trees) * width,
        depth=max(tree.max_depth for tree in trees),
        normalizer=float(average_path_length(forest.max_samples_)),
    )


@register("iforest")
class IForest(Detector):
    """Isolation Forest (Liu, Ting & Zhou, "Isolation Forest", ICDM 2008), a reference baseline.

    Fitted with scikit-learn's `IsolationForest` on the raw rows (axis-aligned random splits are
    invariant to per-feature scaling, so no standardization); every tree sees every feature.
    Scored by `IsolationForestGraph`, the trees compiled into torch, so `score` and the exported
    ONNX graph are the same computation, equal to `-IsolationForest.score_samples` (higher = more
    anomalous, in (0, 1]); no skl2onnx is needed.
    """

    name = "iforest"

    def __init__(
        self,
        n_estimators: int = 100,
        max_samples: int | float | str = "auto",
        seed: int = 0,
        batch_size: int = 4096,
    ) -> None:
        if isinstance(n_estimators, bool) or not isinstance(n_estimators, Integral):
            raise ValueError(f"iforest: n_estimators must be an integer, got {n_estimators!r}")
        if n_estimators < 1:
            raise ValueError(f"iforest: n_estimators must be >= 1, got {n_estimators}")
        if isinstance(max_samples, str):
            if max_samples != "auto":
                raise ValueError(f"iforest: max_samples must be 'auto', got {max_samples!r}")
        elif isinstance(max_samples, Integral) and not isinstance(max_samples, bool):
            if max_samples < 2:
                raise ValueError(f"iforest: an integer max_samples must be >= 2, got {max_samples}")
        elif not isinstance(max_samples, Real) or not 0.0 < max_samples <= 1.0:
            raise ValueError(
                "iforest: max_samples must be 'auto' (min(256, rows)), an integer >= 2 or a "
                f"fraction in (0, 1], got {max_samples!r}"
            )
        if batch_size < 1:
            raise ValueError(f"iforest: batch_size must be >= 1, got {batch_size!r}")
        self.n_estimators = int(n_estimators)
        self.max_samples = max_samples
        self.seed = seed
        self.batch_size = batch_size
        self.scoring_batch_size = batch_size
        self.forest: SklearnIsolationForest | None = None
        self.graph: IsolationForestGraph | None = None

    def _fit(self, data: FitData) -> None:
        train = data.train
        max_samples = self.max_samples
        if isinstance(max_samples, Integral):
            max_samples = min(int(max_samples), len(train))  # sklearn would warn and do this
        elif isinstance(max_samples, Real) and int(max_samples * len(train)) < 2:
            raise ValueError(
                f"iforest: max_samples={max_samples} of {len(train)} training rows leaves "
                f"{int(max_samples * len(train))} rows per tree; each tree needs at least 2"
            )
        self.forest = SklearnIsolationForest(
            n_estimators=self.n_estimators, max_samples=max_samples, random_state=self.seed
        ).fit(np.asarray(train, dtype=np.float32).reshape(len(train), -1))
        self.graph = compile_forest(self.forest).eval()

    def scoring_module(self) -> IsolationForestGraph:
        if self.graph is None:
            raise RuntimeError(f"{self.name}: call fit() before scoring_module()")
        return self.graph

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The compiled tables and the two constants of the graph (the sklearn forest itself,
        needed only to compile them, is not kept)."""
        graph = self.scoring_module()
        return {
            **with_prefix("graph", graph.state_dict()),
            "depth": torch.tensor(graph.depth),
            "log2_over_c": torch.tensor(graph.log2_over_c, dtype=torch.float64),
        }

    def load_fitted_state(
        self, state: dict[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> None:
        tables = under_prefix("graph", state)
        normalizer = math.log(2.0) / float(state["log2_over_c"])
        self.graph = IsolationForestGraph(
            **{name: tables[name] for name in ("feature", "threshold", "left", "right", "value")},
            roots=tables["roots"],
            depth=int(state["depth"]),
            normalizer=normalizer,
        ).eval()
        self.graph.log2_over_c = float(state["log2_over_c"])  # exact, not via the normalizer
        self.input_shape = tuple(input_shape)
