"""Behaviour of goad, knn and iforest beyond the shared zoo suite: each is checked against the
definition it claims (the paper's score, sklearn's kNN distance, sklearn's Isolation Forest)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

from normalcy.detectors import create_detector
from normalcy.detectors.coreset import greedy_coreset
from normalcy.export import export_onnx
from normalcy.scoring import SCORE_NAME


def blobs(n: int, seed: int, n_features: int = 5) -> np.ndarray:
    """Clustered rows with uneven scales, so standardization matters."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).normal(0, 4, size=(4, n_features))
    rows = centers[rng.integers(4, size=n)] + rng.normal(size=(n, n_features))
    return (rows * np.arange(1, n_features + 1) + 3.0).astype(np.float32)


def onnx_scores(detector, X: np.ndarray, path) -> tuple[np.ndarray, onnx.ModelProto]:
    """Export the detector and score `X` with onnxruntime alone."""
    export_onnx(detector.scoring_module(), 1.0, X[:2], path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (score,) = session.run([SCORE_NAME], {session.get_inputs()[0].name: X})
    return score, onnx.load(str(path))


# --- goad --------------------------------------------------------------------------------------


def test_goad_transforms_are_fixed_by_seed_and_stored_in_the_graph(tmp_path):
    train = blobs(120, 0)

    def transforms(seed: int) -> torch.Tensor:
        return create_detector("goad", seed=seed, n_transforms=4).random_transforms(5)

    same = transforms(3)
    assert torch.equal(same, transforms(3)) and not torch.equal(same, transforms(4))

    goad = create_detector("goad", seed=3, n_transforms=4, transform_dim=6, epochs=2)
    goad.fit(train)
    assert same.shape == (4, 5, 32)
    expected = goad.random_transforms(5)  # [M, d, k], stored as one [d, M * k] matrix
    stored = goad.network.transforms
    assert torch.equal(stored, expected.permute(1, 0, 2).reshape(5, 4 * 6))

    test = blobs(30, 1)
    ort_score, model = onnx_scores(goad, test, tmp_path / "goad.onnx")
    stored_in_graph = {
        t.name.rsplit(".", 1)[-1]: numpy_helper.to_array(t) for t in model.graph.initializer
    }
    np.testing.assert_array_equal(stored_in_graph["transforms"], stored.numpy())
    np.testing.assert_array_equal(stored_in_graph["minus_two_centers_t"], -2 * goad.centers.T)
    np.testing.assert_allclose(ort_score, goad.score(test), rtol=1e-4, atol=1e-4)


def test_goad_score_is_minus_sum_of_log_probabilities_of_the_true_transform():
    goad = create_detector("goad", seed=0, n_transforms=3, transform_dim=4, epochs=2)
    goad.fit(blobs(100, 0))
    x = blobs(7, 1)
    with torch.no_grad():
        z = goad.preprocess(torch.as_tensor(x)) @ goad.random_transforms(5)  # [M, N, k]
        features = torch.stack([goad.network.extractor(z[m]) for m in range(3)], dim=1)
        distances = ((features[:, :, None, :] - goad.centers) ** 2).sum(-1)  # [N, M, M']
        log_p = torch.log_softmax(-distances, dim=-1)
        expected_log_p = torch.stack([log_p[:, m, m] for m in range(3)], dim=1)
        expected = -expected_log_p.sum(1)
    np.testing.assert_allclose(goad.score(x), expected.numpy(), rtol=1e-4, atol=1e-5)
    explained = goad.predict(x)["transformation_log_probs"]
    np.testing.assert_allclose(explained, expected_log_p.numpy(), rtol=1e-4, atol=1e-5)


# --- knn ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_knn_score_is_sklearn_kth_neighbour_distance_on_standardized_rows(k):
    train, test = blobs(300, 0), blobs(80, 1)
    knn = create_detector("knn", k=k).fit(train)
    mean, std = train.mean(0, dtype=np.float64), train.std(0, dtype=np.float64)
    neighbours = NearestNeighbors(n_neighbors=k).fit((train - mean) / std)
    expected = neighbours.kneighbors((test - mean) / std)[0][:, -1]
    np.testing.assert_allclose(knn.score(test), expected, rtol=1e-4, atol=1e-4)


def test_knn_scores_training_rows_near_zero_with_k_1():
    """The documented caveat: a training row finds itself in the bank."""
    train = blobs(200, 0)
    assert create_detector("knn", k=1).fit(train).score(train).max() < 1e-2


def test_knn_k_fraction_unmasks_a_cluster_of_contamination():
    """30 near-identical contaminating rows hide each other from k=5 (masking); k at 10% of the
    bank (40 rows) reaches past the cluster and ranks all 30 above the normal rows."""
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 3)).astype(np.float32)
    rows[:30] = 6.0 + 0.05 * rng.normal(size=(30, 3))
    cluster = np.arange(400) < 30
    masked = create_detector("knn", k=5).fit(rows).score(rows)
    wide = create_detector("knn", k=5, k_fraction=0.1).fit(rows)
    assert wide.neighbours(400) == 40
    assert masked[cluster].max() < np.median(masked[~cluster])
    assert wide.score(rows)[cluster].min() > wide.score(rows)[~cluster].max()


def test_knn_wide_is_knn_at_5_percent_of_the_rows_in_min_max_units(tmp_path):
    """knn_wide is plain knn with other defaults (not a second implementation): the same
    scores as knn given k_fraction=0.05 and min-max, through onnxruntime too."""
    train, test = blobs(400, 0), blobs(60, 1)
    wide = create_detector("knn_wide").fit(train)
    assert wide.neighbours(400) == 20
    same = create_detector("knn", k_fraction=0.05, preprocessing="minmax").fit(train)
    np.testing.assert_allclose(wide.score(test), same.score(test), rtol=1e-6)
    plain = create_detector("knn").fit(train)
    assert not np.allclose(wide.score(test), plain.score(test))
    scores, _ = onnx_scores(wide, test, tmp_path / "wide.onnx")
    np.testing.assert_allclose(scores, wide.score(test), rtol=1e-4, atol=1e-5)


def test_knn_nearest_row_is_the_lowest_index_among_equally_near_rows_in_both_runtimes(tmp_path):
    """Digits are integer-valued, so squared distances are integers and bank rows tie. torch's and
    onnxruntime's top-k order ties differently (5 of 1797 rows named different rows when
    `nearest_row` was the first of the top-k); the lowest index among the tied is the same in
    both, and it is the one a brute-force search finds."""
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float32)
    knn = create_detector("knn", k=5, preprocessing="none").fit(X[:1200])
    module = knn.scoring_module()
    export_onnx(module, 1.0, X[:2], tmp_path / "knn.onnx")
    session = ort.InferenceSession(str(tmp_path / "knn.onnx"), providers=["CPUExecutionProvider"])
    (exported,) = session.run(["nearest_row"], {session.get_inputs()[0].name: X})
    with torch.no_grad():
        reference = module(torch.from_numpy(X)).explanations["nearest_row"].numpy()
    distances = ((X[:, None, :] - X[None, :1200, :]) ** 2).sum(axis=2)
    lowest_tied = (distances == distances.min(axis=1, keepdims=True)).argmax(axis=1)
    tied = (distances == distances.min(axis=1, keepdims=True)).sum(axis=1) > 1
    assert tied[1200:].sum() >= 5  # held-out rows with two or more equally near bank rows (9)
    np.testing.assert_array_equal(reference, lowest_tied)
    np.testing.assert_array_equal(exported, lowest_tied)


def test_knn_k_fraction_never_lowers_k_and_is_capped_by_the_bank():
    knn = create_detector("knn", k=5, k_fraction=0.01)
    assert knn.neighbours(100) == 5
    assert create_detector("knn", k=1, k_fraction=1.0).neighbours(7) == 7


def test_greedy_coreset_covers_the_bank_better_than_a_random_subset():
    rows = torch.as_tensor(blobs(500, 0)[:, :3])
    rows = (rows - rows.mean(0)) / rows.std(0)
    chosen = greedy_coreset(rows, 25, torch.Generator().manual_seed(0))
    assert len(set(chosen.tolist())) == 25

    def radius(index: torch.Tensor) -> float:
        return float(torch.cdist(rows, rows[index]).min(dim=1).values.max())

    random_radii = [
        radius(torch.randperm(500, generator=torch.Generator().manual_seed(s))[:25])
        for s in range(5)
    ]
    assert radius(chosen) <= min(random_radii)


def test_knn_coreset_bank_and_max_bank():
    train = blobs(400, 0)
    knn = create_detector("knn", k=2, coreset_fraction=0.1, seed=1).fit(train)
    assert knn.bank.shape == (40, 5)
    standardized = knn.preprocess(torch.as_tensor(train))
    assert torch.equal(knn.bank, standardized[knn.coreset_indices])
    again = create_detector("knn", k=2, coreset_fraction=0.1, seed=1).fit(train)
    assert torch.equal(knn.coreset_indices, again.coreset_indices)

    with pytest.raises(ValueError, match=r"400 rows, above max_bank=100.*coreset_fraction"):
        create_detector("knn", max_bank=100).fit(train)
    capped = create_detector("knn", max_bank=100, coreset_size=100).fit(train)
    assert capped.bank.shape == (100, 5)
    with pytest.raises(ValueError, match="k=5 needs at least 5 rows"):
        create_detector("knn", k=5).fit(train[:3])


# --- iforest -----------------------------------------------------------------------------------


def boundary_rows(forest: IsolationForest, base: np.ndarray) -> np.ndarray:
    """Rows whose split feature sits on float32 values around each threshold of the first trees:
    where a float32 comparison against a float64 threshold can go the wrong way."""
    rows = []
    for estimator in forest.estimators_[:5]:
        tree = estimator.tree_
        for node in np.flatnonzero(tree.children_left >= 0)[:20]:
            t32 = np.float32(tree.threshold[node])
            for value in (np.nextafter(t32, np.float32(-np.inf)), t32, np.nextafter(t32, np.inf)):
                row = base.copy()
                row[tree.feature[node]] = value
                rows.append(row)
    return np.asarray(rows, dtype=np.float32)


def test_iforest_graph_equals_sklearn_score_samples():
    train = blobs(400, 0)
    detector = create_detector("iforest", n_estimators=30, seed=2).fit(train)
    forest = detector.forest
    assert forest.n_estimators == 30 and forest.random_state == 2 and forest.max_samples_ == 256
    test = np.concatenate([blobs(100, 1), blobs(20, 2) * 3, boundary_rows(forest, train[0])])
    np.testing.assert_allclose(detector.score(test), -forest.score_samples(test), rtol=1e-6)
    as_float64 = test.astype(np.float64) + 1e-9  # sklearn rounds to float32; so must the graph
    np.testing.assert_allclose(
        detector.score(as_float64), -forest.score_samples(as_float64), rtol=1e-6
    )


def test_iforest_onnx_graph_equals_sklearn(tmp_path):
    train = blobs(200, 0)
    detector = create_detector("iforest", n_estimators=10, max_samples=32).fit(train)
    test = np.concatenate([blobs(50, 1), boundary_rows(detector.forest, train[0])])
    ort_score, model = onnx_scores(detector, test, tmp_path / "iforest.onnx")
    np.testing.assert_allclose(ort_score, -detector.forest.score_samples(test), rtol=1e-6)
    # the forest is onnxruntime's native tree ensemble, not depth rounds of gathers
    trees = next(n for n in model.graph.node if n.op_type == "TreeEnsembleRegressor")
    assert "Gather" not in {n.op_type for n in model.graph.node}
    treeids = next(a.ints for a in trees.attribute if a.name == "nodes_treeids")
    assert sorted(set(treeids)) == list(range(10))


def test_iforest_max_samples():
    train = blobs(100, 0)

    def rows_per_tree(max_samples: int | float) -> int:
        detector = create_detector("iforest", n_estimators=5, max_samples=max_samples)
        return detector.fit(train).forest.max_samples_

    assert [rows_per_tree(64), rows_per_tree(500), rows_per_tree(0.5)] == [64, 100, 50]
    with pytest.raises(ValueError, match="leaves 1 rows per tree"):
        rows_per_tree(0.01)


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("knn", {"k": 0}, "k must be an integer >= 1"),
        ("knn", {"k": 2.5}, "k must be an integer >= 1"),
        ("knn", {"k_fraction": 0.0}, r"k_fraction must be in \(0, 1\]"),
        ("knn", {"k_fraction": 2.0}, r"k_fraction must be in \(0, 1\]"),
        ("knn", {"coreset_fraction": 0.0}, r"coreset_fraction must be in \(0, 1\]"),
        ("knn", {"coreset_fraction": 1.5}, r"coreset_fraction must be in \(0, 1\]"),
        ("knn", {"coreset_fraction": 0.5, "coreset_size": 10}, "not both"),
        ("knn", {"k": 5, "coreset_size": 3}, "coreset_size must be >= k=5"),
        ("goad", {"n_transforms": 1}, "n_transforms must be an integer >= 2"),
        ("goad", {"margin": -1.0}, "must be >= 0"),
        ("iforest", {"n_estimators": 0}, "n_estimators must be an integer >= 1"),
        ("iforest", {"max_samples": "all"}, "max_samples must be 'auto'"),
        ("iforest", {"max_samples": 1.5}, r"fraction in \(0, 1\]"),
    ],
)
def test_bad_params_are_rejected_at_construction(name, params, message):
    with pytest.raises(ValueError, match=message):
        create_detector(name, **params)
