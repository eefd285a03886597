"""PCA reconstruction error and robust Mahalanobis distance: what each promises."""

import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from normalcy.detectors import create_detector
from normalcy.detectors.registry import param_problems


def plane_rows(n: int, seed: int) -> np.ndarray:
    """Rows on a 2-d plane in 6 features, with a little noise off it."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).normal(size=(2, 6))
    return (rng.normal(size=(n, 2)) @ basis + 0.01 * rng.normal(size=(n, 6))).astype(np.float32)


@pytest.mark.parametrize("name", ["pca", "mahalanobis"])
def test_feature_contributions_sum_to_the_score(name):
    train = plane_rows(400, 0)
    detector = create_detector(name).fit(train)
    out = detector.predict(plane_rows(50, 1) + 0.5)
    np.testing.assert_allclose(out["feature_contributions"].sum(axis=1), out["score"], rtol=1e-4)


def test_pca_scores_rows_off_the_normal_subspace():
    train = plane_rows(500, 0)
    detector = create_detector("pca", explained_variance=0.9).fit(train)
    on_plane = plane_rows(100, 1)
    off_plane = on_plane + np.random.default_rng(2).normal(0, 0.5, size=on_plane.shape)
    labels = np.r_[np.zeros(100), np.ones(100)]
    assert roc_auc_score(labels, detector.score(np.vstack([on_plane, off_plane]))) > 0.99
    # Rows far along the plane are still normal for PCA: its residual ignores the major axes.
    far_on_plane = 3.0 * on_plane
    assert np.median(detector.score(far_on_plane)) < np.median(detector.score(off_plane))


def contaminated_gaussian(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train with 15% in a tight outlier cluster, normal test rows, rows near the cluster)."""
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    normal = rng.multivariate_normal(np.zeros(3), cov, size=850)
    cluster = rng.normal([3.0, -3.0, 0.0], 0.2, size=(150, 3))
    test_normal = rng.multivariate_normal(np.zeros(3), cov, size=200)
    test_anomalies = rng.normal([3.0, -3.0, 0.0], 0.2, size=(200, 3))
    return (
        np.vstack([normal, cluster]).astype(np.float32),
        test_normal.astype(np.float32),
        test_anomalies.astype(np.float32),
    )


def test_mcd_is_not_fooled_by_contamination_that_fools_the_plain_covariance():
    train, normal, anomalies = contaminated_gaussian(0)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalies))]
    rows = np.vstack([normal, anomalies])
    auroc = {
        covariance: roc_auc_score(
            labels, create_detector("mahalanobis", covariance=covariance).fit(train).score(rows)
        )
        for covariance in ("mcd", "empirical")
    }
    assert auroc["mcd"] > 0.99
    assert auroc["mcd"] > auroc["empirical"] + 0.05, auroc


def test_a_feature_constant_in_training_does_not_break_the_fit_and_flags_change():
    train = plane_rows(300, 0)
    train[:, 3] = 5.0
    for name in ("pca", "mahalanobis"):
        detector = create_detector(name).fit(train)
        normal = plane_rows(20, 1)
        normal[:, 3] = 5.0
        changed = normal.copy()
        changed[:, 3] = 6.0
        scores, changed_scores = detector.score(normal), detector.score(changed)
        assert np.isfinite(scores).all() and np.isfinite(changed_scores).all()
        assert changed_scores.min() > scores.max(), name


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("pca", {"explained_variance": 1.0}, "explained_variance must be in (0, 1)"),
        ("pca", {"explained_variance": 0}, "explained_variance must be in (0, 1)"),
        ("mahalanobis", {"covariance": "robust"}, "covariance must be one of"),
        ("mahalanobis", {"support_fraction": 0.3}, "support_fraction must be in [0.5, 1]"),
    ],
)
def test_bad_params_are_refused_with_what_was_expected(name, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        type(create_detector(name))(**params)
    assert param_problems(name, params), "the torch-free spec must refuse it too"
