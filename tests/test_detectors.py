import numpy as np
import pytest
import torch

from normalcy.config import DataParams, PrepareParams
from normalcy.data.sources import load_dataset
from normalcy.data.splits import split_dataset
from normalcy.detectors import (
    Detector,
    accepted_params,
    available_detectors,
    create_detector,
    register,
)
from normalcy.detectors.deep_svdd import initial_center
from normalcy.evaluation.metrics import ranking_metrics


@pytest.fixture(scope="module")
def digits_splits():
    """A fixed split (not the params defaults, which may change): 20% test, 20% validation."""
    fixed = PrepareParams(val_fraction=0.2, test_fraction=0.2, holdout_fraction=0.01)
    return split_dataset(load_dataset(DataParams()), fixed)


def test_registry_lists_and_rejects_by_name():
    assert {"autoencoder", "deep_svdd"} <= set(available_detectors())
    with pytest.raises(ValueError, match="unknown detector 'nope'; expected one of"):
        create_detector("nope")
    with pytest.raises(ValueError, match=r"does not accept \['hiden_dims'\]"):
        create_detector("autoencoder", hiden_dims=[3])
    assert {"hidden_dims", "latent_dim", "epochs", "seed"} <= set(accepted_params("autoencoder"))
    with pytest.raises(ValueError, match="registered twice"):
        register("autoencoder")(object)


@pytest.mark.parametrize("name", ["autoencoder", "deep_svdd"])
def test_detector_learns_normality_on_digits(name, digits_splits):
    """Both methods rank held-out anomalies (other digits) above normals, far better than chance."""
    detector = create_detector(name, epochs=25, seed=0).fit(
        digits_splits.train.X, digits_splits.val.X
    )
    scores = detector.score(digits_splits.test.X)
    assert scores.shape == (len(digits_splits.test),) and np.isfinite(scores).all()
    assert ranking_metrics(digits_splits.test.y, scores)["auroc"] > 0.7


@pytest.mark.parametrize("name", ["autoencoder", "deep_svdd"])
def test_seeded_fit_is_reproducible_and_scoring_module_matches_score(name, digits_splits):
    X = digits_splits.train.X
    a = create_detector(name, epochs=3, seed=1).fit(X)
    b = create_detector(name, epochs=3, seed=1).fit(X)
    assert np.allclose(a.score(X[:50]), b.score(X[:50]))
    with torch.no_grad():
        module_scores = a.scoring_module()(torch.as_tensor(X[:50])).score.numpy()
    assert np.allclose(module_scores, a.score(X[:50]), rtol=1e-5)


def test_images_are_accepted(digits_splits):
    images = digits_splits.train.X.reshape(-1, 1, 8, 8)
    detector = create_detector("autoencoder", epochs=2).fit(images)
    assert detector.score(images[:5]).shape == (5,)


def test_deep_svdd_is_bias_free_with_center_away_from_zero(digits_splits):
    detector = create_detector("deep_svdd", epochs=2).fit(digits_splits.train.X)
    linear = [m for m in detector.network.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(layer.bias is None for layer in linear)
    assert (detector.center.abs() >= 0.1 - 1e-9).all()
    center = initial_center(torch.tensor([[0.01, -0.02, 0.5], [0.03, -0.04, 0.7]]))
    assert torch.allclose(center, torch.tensor([0.1, -0.1, 0.6]))


def test_denoising_autoencoder_trains(digits_splits):
    detector = create_detector("autoencoder", epochs=3, noise_std=0.3).fit(digits_splits.train.X)
    assert detector.history.train_loss[-1] < detector.history.train_loss[0]


def test_early_stopping_keeps_best_epoch(digits_splits):
    detector = create_detector("autoencoder", epochs=30, patience=2, learning_rate=0.05)
    detector.fit(digits_splits.train.X, digits_splits.val.X)
    history = detector.history
    assert history.val_loss[history.best_epoch] == min(history.val_loss)
    assert len(history.val_loss) <= history.best_epoch + 1 + 2


def test_unfitted_and_tiny_inputs_fail_clearly():
    detector = create_detector("autoencoder")
    with pytest.raises(RuntimeError, match="call fit"):
        detector.scoring_module()
    with pytest.raises(ValueError, match="at least 2 training rows"):
        detector.fit(np.zeros((1, 4), dtype=np.float32))


def test_constant_features_do_not_divide_by_zero():
    X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    X[:, 2] = 7.0
    scores = create_detector("deep_svdd", epochs=2).fit(X).score(X)
    assert np.isfinite(scores).all()


def test_contract_is_abstract():
    with pytest.raises(TypeError):
        Detector()  # type: ignore[abstract]
