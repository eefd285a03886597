"""The reconstruction family: each option changes what it claims to change, and nothing else."""

import numpy as np
import pytest
import torch

from normalcy.detectors import create_detector
from normalcy.detectors.autoencoder import encoder_jacobian_norm
from normalcy.detectors.memae import addressing_entropy, hard_shrink
from normalcy.detectors.vae import GaussianVAE, LikelihoodRatio
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.export import export_onnx, parity_check

QUICK = {"epochs": 15, "seed": 0}


def plane_data(n: int, seed: int, off_plane: float = 0.0) -> np.ndarray:
    """Rows near a 2-d plane in 6-d space; `off_plane` adds isotropic noise (anomalies)."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).normal(size=(2, 6))
    rows = rng.normal(size=(n, 2)) @ basis + 0.1 * rng.normal(size=(n, 6)) + 3.0
    return (rows + off_plane * rng.normal(size=rows.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    test = np.concatenate([plane_data(100, 2), plane_data(20, 3, off_plane=2.0)])
    return plane_data(300, 0), test, np.r_[np.zeros(100), np.ones(20)]


def standardized(detector, X):
    return detector.preprocess(torch.as_tensor(X))


# -- autoencoder ---------------------------------------------------------------------------


def test_sparsity_penalty_shrinks_the_code(data):
    train = data[0]
    plain = create_detector("autoencoder", **QUICK).fit(train)
    sparse = create_detector("autoencoder", sparsity_weight=0.1, **QUICK).fit(train)
    assert np.abs(sparse.encode(train)).mean() < 0.5 * np.abs(plain.encode(train)).mean()


def test_jacobian_norm_is_exact():
    encoder = (
        create_detector("autoencoder", hidden_dims=[5], latent_dim=3).build_network((4,)).encoder
    )
    x = torch.randn(6, 4)
    expected = [
        (torch.autograd.functional.jacobian(lambda r: encoder(r[None])[0], row) ** 2).sum()
        for row in x
    ]
    assert torch.allclose(encoder_jacobian_norm(encoder, x), torch.stack(expected), rtol=1e-5)


def test_contractive_penalty_flattens_the_encoder_and_scores_reconstruction(data):
    train, test, labels = data
    plain = create_detector("autoencoder", **QUICK).fit(train)
    contractive = create_detector("autoencoder", contractive_weight=0.1, **QUICK).fit(train)

    def jacobian(detector):
        return encoder_jacobian_norm(detector.network.encoder, standardized(detector, train))

    with torch.no_grad():
        assert jacobian(contractive).mean() < 0.5 * jacobian(plain).mean()
        # The penalty is training-only: the score is still the plain reconstruction error.
        x = standardized(contractive, test)
        error = ((contractive.network(x) - x) ** 2).mean(dim=1).double().numpy()
    assert np.allclose(contractive.score(test), error, rtol=1e-5)
    assert ranking_metrics(labels, contractive.score(test))["auroc"] > 0.9


def test_autoencoder_rejects_negative_weights():
    with pytest.raises(ValueError, match="contractive_weight must be >= 0"):
        create_detector("autoencoder", contractive_weight=-1.0)


# -- memae ---------------------------------------------------------------------------------


def test_hard_shrink_zeroes_small_weights_and_renormalizes():
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.26, 0.24, 0.25, 0.25]])
    shrunk = hard_shrink(weights, 0.25)
    assert torch.allclose(shrunk[0], torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(shrunk[1], torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-6)


def test_memae_addressing_is_sparse_and_convex_and_scores_the_memory_read(data):
    train, test, labels = data
    detector = create_detector("memae", memory_size=40, **QUICK).fit(train)
    with torch.no_grad():
        x = standardized(detector, train)
        weights = detector.network.memory.address(detector.network.encoder(x))
        read = detector.network.decoder(weights @ detector.network.memory.items)
    assert weights.shape == (len(train), 40) and (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(len(train)), atol=1e-5)
    assert (weights > 0).sum(dim=1).float().mean() < 0.25 * 40  # hard shrinkage: few items used
    assert np.allclose(detector.score(train), ((read - x) ** 2).mean(dim=1).numpy(), rtol=1e-5)
    assert ranking_metrics(labels, detector.score(test))["auroc"] > 0.9


def test_memae_entropy_loss_concentrates_the_addressing(data):
    train = data[0]

    def mean_entropy(entropy_weight):
        detector = create_detector("memae", entropy_weight=entropy_weight, **QUICK).fit(train)
        with torch.no_grad():
            code = detector.network.encoder(standardized(detector, train))
            return addressing_entropy(detector.network.memory.address(code)).mean().item()

    assert mean_entropy(0.1) < mean_entropy(0.0)


# -- vae -----------------------------------------------------------------------------------


def test_vae_negative_elbo_matches_torch_distributions():
    torch.manual_seed(0)
    vae = GaussianVAE(5, [8], 2)
    vae.log_variance.fill_(-1.3)
    x = torch.randn(4, 5)
    with torch.no_grad():
        mu, logvar = vae.encoder(x).chunk(2, dim=1)
        q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        p_z = torch.distributions.Normal(torch.zeros(2), torch.ones(2))
        p_x = torch.distributions.Normal(vae.decoder(mu), torch.exp(torch.tensor(-1.3 / 2)))
        expected = -p_x.log_prob(x).sum(1) + torch.distributions.kl_divergence(q, p_z).sum(1)
        assert torch.allclose(vae(x), expected, atol=1e-4)


def test_vae_scores_rows_far_outside_the_training_data_finitely(data, tmp_path):
    """A row 1e4 standard deviations out pushed the code's log-variance past float32's exp range
    and the KL term to inf; the bounded log-variance keeps the score finite, the largest of all,
    in torch and in the exported graph."""
    train, test, _ = data
    detector = create_detector("vae", **QUICK).fit(train)
    far = np.concatenate([test[:5], test[:5] + 1e4 * train.std(axis=0)]).astype(np.float32)
    with torch.no_grad():
        logvar = detector.network.encoder(standardized(detector, far[5:])).chunk(2, dim=1)[1]
    assert logvar.abs().max() > 88  # exp() of it overflows float32
    scores = detector.score(far)
    assert np.isfinite(scores).all() and scores[5:].min() > scores[:5].max()
    export_onnx(detector.scoring_module(), 1.0, far[:2], tmp_path / "vae.onnx")
    module = detector.scoring_module()
    report = parity_check(module, 1.0, tmp_path / "vae.onnx", far, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


def test_vae_scores_are_deterministic_and_training_is_seeded(data):
    train, test, labels = data
    detector = create_detector("vae", **QUICK).fit(train)
    first = detector.score(test)
    torch.randn(100, generator=detector.generator)  # a moved generator must not change scores
    assert np.array_equal(first, detector.score(test))
    again = create_detector("vae", **QUICK).fit(train)
    assert np.array_equal(first, again.score(test))
    assert ranking_metrics(labels, first)["auroc"] > 0.9


def test_likelihood_ratio_trains_a_background_model_and_exports(data, tmp_path):
    train, test, labels = data
    detector = create_detector("vae", scoring="likelihood_ratio", **QUICK).fit(train)
    assert isinstance(detector.background, GaussianVAE)
    assert detector.background is not detector.network
    assert detector.background_history is not None
    module = detector.scoring_module()
    assert isinstance(module.head, LikelihoodRatio)
    with torch.no_grad():
        x = standardized(detector, test)
        ratio = (detector.network(x) - detector.background(x)).double().numpy()
    scores = detector.score(test)
    assert np.allclose(scores, ratio, rtol=1e-5, atol=1e-4)
    assert ranking_metrics(labels, scores)["auroc"] > 0.9

    threshold = float(np.quantile(scores, 0.9))
    path = export_onnx(module, threshold, test[:2], tmp_path / "vae_lr.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


def test_vae_rejects_unknown_scoring():
    with pytest.raises(
        ValueError, match=r"scoring must be one of \['elbo', 'likelihood_ratio'\], got 'nll'"
    ):
        create_detector("vae", scoring="nll")
