"""One-class methods: Deep SVDD's objectives, pretraining and collapse guards, AE-SVDD, and
Outlier Exposure with and without labelled anomalies. Small generated data, few epochs."""

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from normalcy.detectors import create_detector
from normalcy.detectors.autoencoder import ReconstructionError
from normalcy.detectors.base import forward_in_batches
from normalcy.detectors.deep_svdd import (
    DeepSVDD,
    require_bias_free,
    squared_distance,
    warn_if_collapsed,
)
from normalcy.detectors.networks import mlp
from normalcy.evaluation.metrics import ranking_metrics


def plane(n: int, seed: int, n_features: int = 6) -> np.ndarray:
    """Normal rows near a 2-d plane in `n_features`-d space."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).normal(size=(2, n_features))
    return (rng.normal(size=(n, 2)) @ basis + 0.1 * rng.normal(size=(n, n_features)) + 3.0).astype(
        np.float32
    )


def off_plane(n: int, seed: int, n_features: int = 6) -> np.ndarray:
    noise = np.random.default_rng(seed + 100).normal(0, 2.0, size=(n, n_features))
    return (plane(n, seed, n_features) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    test = np.concatenate([plane(150, 2), off_plane(30, 3)])
    return plane(300, 0), plane(100, 1), test, np.r_[np.zeros(150), np.ones(30)]


def embed(detector, x: np.ndarray) -> torch.Tensor:
    return forward_in_batches(detector.network, detector.preprocess(torch.as_tensor(x)))


# --- Deep SVDD -------------------------------------------------------------------------------


def test_soft_boundary_leaves_about_nu_outside_and_scores_distance_minus_radius(data):
    train, val, test, labels = data
    detector = create_detector(
        "deep_svdd", objective="soft-boundary", nu=0.2, warmup_epochs=2, epochs=6, patience=99
    ).fit(train, val)
    # R stays 0 during the 2 warm-up epochs, then is refitted after epochs 2..6 ...
    assert len(detector.radius_sq_history) == 6 - 2 + 1
    assert detector.radius_sq > 0
    # ... and finally for the kept weights: about nu of the training data lies outside
    outside = (detector.score(train) > 0).mean()
    assert abs(outside - 0.2) < 0.02
    expected = squared_distance(embed(detector, test), detector.center) - detector.radius_sq
    assert np.allclose(detector.score(test), expected.numpy(), atol=1e-5)
    assert ranking_metrics(labels, detector.score(test))["auroc"] > 0.85


def test_one_class_objective_stays_the_default(data):
    train, _, test, _ = data
    detector = create_detector("deep_svdd", epochs=2).fit(train)
    assert detector.objective == "one-class" and detector.radius_sq == 0.0
    assert detector.radius_sq_history == []
    expected = squared_distance(embed(detector, test), detector.center)
    assert np.allclose(detector.score(test), expected.numpy(), rtol=1e-5)


def test_pretraining_changes_the_initialization(data):
    train, val, _, _ = data
    plain = create_detector("deep_svdd", epochs=1, seed=0).fit(train, val)
    pretrained = create_detector("deep_svdd", epochs=1, seed=0, pretrain_epochs=4).fit(train, val)
    assert plain.pretrain_history is None
    history = pretrained.pretrain_history
    assert len(history.train_loss) == 4 and history.train_loss[-1] < history.train_loss[0]
    assert not torch.allclose(plain.center, pretrained.center)
    require_bias_free(pretrained.network)  # the pretrained encoder is still bias-free


class BiasedSVDD(DeepSVDD):
    name = "biased_svdd"

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        return mlp(math.prod(input_shape), self.hidden_dims, self.latent_dim, bias=True)


class AffineNormSVDD(DeepSVDD):
    name = "affine_svdd"

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        net = mlp(math.prod(input_shape), self.hidden_dims, self.latent_dim, bias=False)
        return nn.Sequential(net, nn.BatchNorm1d(self.latent_dim))


@pytest.mark.parametrize("cls", [BiasedSVDD, AffineNormSVDD])
def test_collapse_guard_refuses_bias_or_affine_parameters(cls, data):
    with pytest.raises(ValueError, match="bias/affine parameters.*hypersphere collapse"):
        cls(epochs=1).fit(data[0])
    require_bias_free(nn.Sequential(nn.Linear(3, 2, bias=False), nn.BatchNorm1d(2, affine=False)))


class ZeroWeightSVDD(DeepSVDD):
    """All-zero weights: every gradient is zero, so the embedding stays one point."""

    name = "zero_svdd"

    def build_network(self, input_shape: tuple[int, ...]) -> nn.Module:
        net = super().build_network(input_shape)
        for parameter in net.parameters():
            nn.init.zeros_(parameter)
        return net


def test_collapsed_embedding_is_warned_about(data, caplog):
    with caplog.at_level(logging.WARNING, logger="normalcy.detectors.deep_svdd"):
        ZeroWeightSVDD(epochs=1).fit(data[0])
    assert "collapsed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="normalcy.detectors.deep_svdd"):
        warn_if_collapsed(torch.randn(50, 4), "deep_svdd")
    assert "collapsed" not in caplog.text


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"objective": "hard-boundary"}, "objective must be one of"),
        ({"nu": 0.0}, r"nu must be in \(0, 1\]"),
        ({"nu": 1.5}, r"nu must be in \(0, 1\]"),
        ({"nu": float("nan")}, r"nu must be in \(0, 1\]"),
        ({"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0"),
    ],
)
def test_bad_objective_or_nu_is_rejected_at_construction(params, message):
    with pytest.raises(ValueError, match=message):
        create_detector("deep_svdd", **params)


# --- AE-SVDD ---------------------------------------------------------------------------------


def test_ae_svdd_learns_and_scores_its_objective(data):
    train, val, test, labels = data
    detector = create_detector("ae_svdd", epochs=15, seed=0).fit(train, val)
    assert detector.history.train_loss[-1] < detector.history.train_loss[0]
    scores = detector.score(test)
    assert ranking_metrics(labels, scores)["auroc"] > 0.85
    x = detector.preprocess(torch.as_tensor(test))
    with torch.no_grad():
        reconstruction = ReconstructionError(detector.network)(x).score
        distance = squared_distance(detector.network[0](x), detector.center)
    expected = reconstruction + detector.compactness_weight * detector.gamma * distance
    assert detector.gamma > 0
    assert np.allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-6)


# --- Outlier Exposure ------------------------------------------------------------------------


def uniform_normals(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(size=(n, 4)).astype(np.float32)


def specific_anomalies(n: int, rng: np.random.Generator) -> np.ndarray:
    """A tight cluster inside the normal box: invisible to density, only labels reveal it."""
    return (0.3 + 0.03 * rng.normal(size=(n, 4))).astype(np.float32)


def test_outlier_exposure_uses_labelled_anomalies_when_given():
    rng = np.random.default_rng(0)
    train = np.concatenate([uniform_normals(400, rng), specific_anomalies(20, rng)])
    train_labels = np.r_[np.zeros(400), np.ones(20)].astype(int)
    test = np.concatenate([uniform_normals(200, rng), specific_anomalies(50, rng)])
    test_labels = np.r_[np.zeros(200), np.ones(50)]

    supervised = create_detector("outlier_exposure", epochs=20, seed=0)
    supervised.fit(train, train_labels=train_labels)
    synthetic = create_detector("outlier_exposure", epochs=20, seed=0)
    synthetic.fit(train[train_labels == 0])
    # the labelled anomalies are exposure outliers, never normals
    assert supervised.n_labelled_outliers == 20 and len(supervised.synthetic.normals) == 400
    auroc_supervised = ranking_metrics(test_labels, supervised.score(test))["auroc"]
    auroc_synthetic = ranking_metrics(test_labels, synthetic.score(test))["auroc"]
    assert auroc_supervised > 0.9 and auroc_supervised > auroc_synthetic + 0.3


def test_outlier_exposure_runs_without_labels_and_stops_early_on_validation(data):
    train, val, test, labels = data
    unlabelled = create_detector("outlier_exposure", epochs=10, seed=0).fit(train, val)
    assert unlabelled.n_labelled_outliers == 0
    assert ranking_metrics(labels, unlabelled.score(test))["auroc"] > 0.85
    # labels without anomalies are the same regime as no labels
    zeros = create_detector("outlier_exposure", epochs=10, seed=0)
    zeros.fit(
        train, val, val_labels=np.zeros(len(val), int), train_labels=np.zeros(len(train), int)
    )
    assert np.allclose(zeros.score(test), unlabelled.score(test))
    # validation rows with their labels drive early stopping; the best epoch's weights are kept
    val_labels = np.r_[np.zeros(len(val) - 10), np.ones(10)].astype(int)
    val_with_anomalies = np.concatenate([val[:-10], off_plane(10, 9)])
    stopped = create_detector("outlier_exposure", epochs=30, patience=2, learning_rate=0.05)
    stopped.fit(train, val_with_anomalies, val_labels=val_labels)
    history = stopped.history
    assert history.val_loss[history.best_epoch] == min(history.val_loss)
    assert len(history.val_loss) <= history.best_epoch + 1 + 2


def test_outlier_exposure_needs_normal_training_rows(data):
    with pytest.raises(ValueError, match="at least 2 normal"):
        create_detector("outlier_exposure", epochs=1).fit(data[0][:5], train_labels=np.ones(5, int))
    with pytest.raises(ValueError, match="exposure_ratio must be > 0"):
        create_detector("outlier_exposure", exposure_ratio=0)
