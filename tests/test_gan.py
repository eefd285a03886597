"""GAN detectors: GANomaly's score is its latent consistency, AnoGAN's latent search is seeded and
refused by export, f-AnoGAN's encoder exports with parity, training improves the criterion."""

import inspect

import numpy as np
import pytest
import torch

from normalcy.config import ExportParams
from normalcy.detectors import create_detector
from normalcy.detectors.anogan import anogan_distance
from normalcy.evaluation.selection import CandidateResult, select_winner
from normalcy.export import export_onnx, parity_check
from normalcy.pipeline import export as export_step


def plane_data(n: int, seed: int) -> np.ndarray:
    """Rows near a 2-d plane inside 6-d space."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).normal(size=(2, 6))
    return (rng.normal(size=(n, 2)) @ basis + 0.1 * rng.normal(size=(n, 6)) + 3.0).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def data():
    return plane_data(256, 0), plane_data(64, 1), plane_data(32, 2)


@pytest.fixture(scope="module")
def ganomaly(data):
    train, val, _ = data
    return create_detector("ganomaly", epochs=6, seed=0).fit(train, val)


@pytest.fixture(scope="module")
def anogan(data):
    train, val, _ = data
    return create_detector("anogan", epochs=6, seed=0, search_steps=20).fit(train, val)


@pytest.fixture(scope="module")
def fanogan(data):
    train, val, _ = data
    return create_detector("anogan", epochs=6, seed=0, encoder=True).fit(train, val)


def test_ganomaly_score_is_the_latent_consistency_distance(ganomaly, data):
    x = data[2]
    generator = ganomaly.network.generator
    with torch.no_grad():
        standardized = ganomaly.preprocess(torch.as_tensor(x))
        latent = generator.encoder(standardized)
        latent_again = generator.reencoder(generator.decoder(latent))
        by_hand = ((latent - latent_again) ** 2).sum(dim=1).double().numpy()
    np.testing.assert_allclose(ganomaly.score(x), by_hand, rtol=1e-5, atol=1e-7)


def test_anogan_default_is_never_exported_nor_selected(anogan, data, tmp_path):
    x = data[2]
    assert anogan.exportable is False
    assert create_detector("anogan", encoder=True).exportable is True
    with pytest.raises(NotImplementedError, match="not exportable"):
        create_detector("anogan").scoring_module()  # refused even before fit
    with pytest.raises(NotImplementedError, match="not exportable.*encoder=True"):
        anogan.scoring_module()
    export_args = {"calibration_scores": np.ones(8)}
    if "calibration_scores" not in inspect.signature(export_step.export).parameters:
        export_args = {}
    with pytest.raises(ValueError, match="not exportable"):
        export_step.export(
            anogan, 1.0, x, ExportParams(path=str(tmp_path / "m.onnx")), {}, **export_args
        )
    assert not (tmp_path / "m.onnx").exists()
    results = [
        CandidateResult("anogan", "val_auprc", 0.99, anogan.exportable, 1.0),
        CandidateResult("ganomaly", "val_auprc", 0.60, True, 1.0),
    ]
    assert select_winner(results).name == "ganomaly"
    with pytest.raises(ValueError, match="no exportable candidate"):
        select_winner(results[:1])


def test_anogan_latent_search_is_seeded_and_batched(anogan, data):
    x = data[2]
    first = anogan.score(x)
    assert np.isfinite(first).all() and first.shape == (len(x),)
    np.testing.assert_array_equal(anogan.score(x), first)
    # vectorized over the batch: each row's search is independent of the chunking
    chunked = anogan._score(x, batch_size=5)
    np.testing.assert_allclose(chunked, first, rtol=1e-4, atol=1e-5)
    # the search improves on its seeded start
    real = anogan.preprocess(torch.as_tensor(x)).flatten(1)
    start = torch.randn(len(x), anogan.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = anogan.network.discriminator.features
        before = anogan_distance(real, anogan.network.generator(start), features, anogan.lam)
    assert first.mean() < before.double().numpy().mean()


def test_fanogan_exports_with_parity(fanogan, data, tmp_path):
    x = np.concatenate([data[2], data[2] + np.float32(1.5)])
    assert fanogan.exportable
    module = fanogan.scoring_module()
    with torch.no_grad():
        np.testing.assert_allclose(
            module(torch.as_tensor(x)).score.numpy(), fanogan.score(x), rtol=1e-5
        )
    threshold = float(np.quantile(fanogan.score(x), 0.9))
    path = export_onnx(module, threshold, x[:2], tmp_path / "fanogan.onnx")
    report = parity_check(module, threshold, path, x, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


@pytest.mark.parametrize("name", ["ganomaly", "anogan", "fanogan"])
def test_training_reduces_the_validation_criterion(name, request):
    detector = request.getfixturevalue(name)
    history = detector.history
    assert len(history.discriminator_loss) == len(history.train_loss) == len(history.val_loss)
    assert np.isfinite(history.discriminator_loss).all()
    assert history.val_loss[history.best_epoch] < history.val_loss[0]
    if name == "fanogan":  # the encoder's izi_f loss falls too
        encoder = detector.encoder_history
        assert encoder.val_loss[encoder.best_epoch] < encoder.val_loss[0]
