import numpy as np
import pytest

from normalcy.evaluation.metrics import ranking_metrics
from normalcy.evaluation.plots import plot_drift, plot_roc_pr, plot_score_histogram
from normalcy.evaluation.selection import (
    LABEL_FREE_METRIC,
    LABELLED_METRIC,
    CandidateResult,
    label_free_score,
    locally_spread,
    select_winner,
    shuffled_features,
    synthetic_auroc,
    uniform_in_box,
    validation_metric,
)


def test_ranking_metrics():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    assert ranking_metrics(labels, scores)["auroc"] == pytest.approx(5 / 6)
    assert np.isnan(ranking_metrics(np.zeros(3), np.arange(3.0))["auroc"])


def test_shuffled_features_keep_marginals_but_break_dependence():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    X = np.stack([a, a + 0.01 * rng.normal(size=500)], axis=1)
    shuffled = shuffled_features(X, seed=0)
    assert np.allclose(np.sort(shuffled, axis=0), np.sort(X, axis=0))
    assert np.corrcoef(X.T)[0, 1] > 0.99 and abs(np.corrcoef(shuffled.T)[0, 1]) < 0.2


def test_label_free_criterion_rewards_a_detector_of_structure_and_spread():
    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    X = np.stack([a, a + 0.05 * rng.normal(size=400)], axis=1)

    def off_diagonal(x):  # distance from the line x0 == x1: knows the structure only
        return np.abs(x[:, 0] - x[:, 1])

    def norm(x):  # looks at the spread only
        return np.linalg.norm(x, axis=1)

    assert synthetic_auroc(off_diagonal, X, 0, "dependency") > 0.9
    assert abs(synthetic_auroc(norm, X, 0, "dependency") - 0.5) < 0.1
    assert synthetic_auroc(norm, X, 0, "global") > 0.75
    assert synthetic_auroc(norm, X, 0, "local") > 0.6
    # Both see something; the one that knows the structure sees all three kinds.
    assert label_free_score(off_diagonal, X, seed=0) > label_free_score(norm, X, seed=0) > 0.6


def test_global_and_local_synthetic_anomalies_leave_the_data_where_expected():
    X = np.random.default_rng(2).normal(size=(1000, 3))
    box = uniform_in_box(X, seed=0)
    widen = 0.1 * (X.max(axis=0) - X.min(axis=0))
    assert (box >= X.min(axis=0) - widen - 1e-12).all() and (box <= X.max(axis=0) + widen).all()
    local = locally_spread(X, seed=0)
    assert np.allclose(local.var(axis=0) / X.var(axis=0), 5.0, rtol=0.15)


def test_validation_metric_uses_labels_only_when_both_classes_are_present():
    X = np.arange(20.0).reshape(10, 2)
    y = np.array([0] * 8 + [1] * 2)
    name, value = validation_metric(lambda x: x[:, 0], X, y, seed=0)
    assert name == LABELLED_METRIC and value == pytest.approx(1.0)
    assert validation_metric(lambda x: x[:, 0], X, np.zeros(10), seed=0)[0] == LABEL_FREE_METRIC
    assert validation_metric(lambda x: x[:, 0], X, None, seed=0)[0] == LABEL_FREE_METRIC


def test_select_winner_is_best_exportable_with_config_order_for_ties():
    results = [
        CandidateResult("a", "m", 0.7, True, 1.0),
        CandidateResult("b", "m", 0.9, False, 1.0),  # best, but cannot be exported
        CandidateResult("c", "m", 0.8, True, 1.0),
        CandidateResult("d", "m", 0.8, True, 1.0),
    ]
    assert select_winner(results).name == "c"
    with pytest.raises(ValueError, match="no exportable candidate"):
        select_winner([CandidateResult("b", "m", 0.9, False, 1.0)])


def test_plots_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 90 + [1] * 10)
    scores = rng.exponential(size=100) + labels
    for path in (
        plot_roc_pr(labels, scores, "t", tmp_path / "roc.png"),
        plot_score_histogram(scores, labels, 1.5, "t", tmp_path / "a" / "hist.png"),
        plot_score_histogram(scores, None, 1.5, "t", tmp_path / "hist_unlabelled.png"),
        plot_drift(
            scores,
            scores * 1.5,
            1.5,
            [(f"f{j}", j / 30, j > 25) for j in range(30)],
            "t",
            tmp_path / "drift.png",
        ),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_free_criterion_does_not_judge_methods_trained_on_synthetic_outliers():
    from normalcy.evaluation.selection import validation_metric

    X = np.random.default_rng(0).normal(size=(50, 3))
    name, value = validation_metric(lambda x: x.sum(axis=1), X, None, 0, True)
    assert name == "val_synthetic_auroc" and np.isnan(value)
    labelled = np.r_[np.zeros(45), np.ones(5)]
    name, value = validation_metric(lambda x: x.sum(axis=1), X, labelled, 0, True)
    assert name == "val_auprc" and np.isfinite(value)
