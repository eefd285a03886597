"""Density methods (DAGMM, normalizing flow): the likelihoods they score by are the ones claimed."""

import copy

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from normalcy.detectors import create_detector
from normalcy.export import export_onnx, parity_check
from normalcy.scoring import score_onnx


def curved_data(n: int, seed: int, n_features: int = 4) -> np.ndarray:
    """A noisy 1-d curve embedded in `n_features` dimensions (non-Gaussian on purpose)."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-2, 2, size=(n, 1))
    curve = np.concatenate([t, t**2, np.sin(2 * t), t**3 / 4][:n_features], axis=1)
    while curve.shape[1] < n_features:
        curve = np.concatenate([curve, np.cos(t * curve.shape[1])], axis=1)
    return (curve + 0.1 * rng.normal(size=curve.shape) + 3.0).astype(np.float32)


@pytest.fixture(scope="module")
def dagmm():
    return create_detector("dagmm", epochs=5, seed=0).fit(curved_data(400, 0), curved_data(100, 1))


def gmm_energy_scipy(z: np.ndarray, gmm: dict) -> np.ndarray:
    """-log sum_k phi_k N(z | mu_k, Sigma_k), straight from the definition."""
    log_terms = np.stack(
        [
            np.log(phi) + multivariate_normal(mu, sigma).logpdf(z)
            for phi, mu, sigma in zip(gmm["phi"], gmm["mu"], gmm["sigma"], strict=True)
        ],
        axis=1,
    )
    return -logsumexp(log_terms, axis=1)


def latent(detector, x: np.ndarray) -> np.ndarray:
    module = detector.scoring_module()
    with torch.no_grad():
        return detector.network.compress(module.preprocess(torch.as_tensor(x)))[0].double().numpy()


def test_dagmm_memberships_are_distributions_and_fix_the_mixture(dagmm):
    train = curved_data(400, 0)
    gamma = dagmm.memberships(train)
    assert gamma.shape == (400, 4) and (gamma >= 0).all()
    assert np.allclose(gamma.sum(axis=1), 1.0, atol=1e-5)
    # the fixed mixture is the paper's M-step over the whole training set
    z = latent(dagmm, train)
    assert np.allclose(dagmm.gmm["phi"], gamma.mean(axis=0), atol=1e-6)
    mu = gamma.T @ z / gamma.sum(axis=0)[:, None]
    assert np.allclose(dagmm.gmm["mu"], mu, atol=1e-5)
    diff = z[:, None, :] - mu[None]
    sigma = np.einsum("nk,nkd,nke->kde", gamma, diff, diff) / gamma.sum(axis=0)[:, None, None]
    assert np.allclose(dagmm.gmm["sigma"], sigma + dagmm.cov_eps * np.eye(z.shape[1]), atol=1e-5)


def test_dagmm_exported_energy_matches_scipy_gmm_energy(dagmm, tmp_path):
    x = np.concatenate([curved_data(100, 2), curved_data(20, 3) + np.float32(2.0)])
    expected = gmm_energy_scipy(latent(dagmm, x), dagmm.gmm)
    path = export_onnx(dagmm.scoring_module(), 0.0, x[:2], tmp_path / "dagmm.onnx")
    exported = score_onnx(path, x)[0].astype(np.float64)
    assert np.allclose(dagmm.score(x), expected, rtol=1e-4, atol=1e-3)
    assert np.allclose(exported, expected, rtol=1e-4, atol=1e-3)
    assert expected[100:].mean() > expected[:100].mean()  # shifted rows are less likely


@pytest.mark.parametrize("coupling", ["realnvp", "maf"])
@pytest.mark.parametrize("n_features", [1, 3])
def test_flow_nll_is_change_of_variables_with_the_exact_jacobian(coupling, n_features):
    """score = -log N(f(x); 0, I) - log|det df/dx|, the determinant taken from autograd's full
    Jacobian (so a triangular-Jacobian bug in a layer would show), on odd d and d = 1."""
    train = curved_data(200, 0, n_features)
    flow = create_detector("flow", coupling=coupling, n_layers=3, epochs=3, seed=0).fit(train)
    network = copy.deepcopy(flow.network).double()
    x = flow.preprocess(torch.as_tensor(curved_data(5, 1, n_features))).double()
    with torch.no_grad():
        nll = network(x).numpy()
    for row, value in zip(x, nll, strict=True):
        jacobian = torch.autograd.functional.jacobian(
            lambda v: network.transform(v[None])[0][0], row
        )
        u = network.transform(row[None])[0][0]
        log_det = torch.linalg.slogdet(jacobian)[1]
        expected = 0.5 * (u**2).sum() + 0.5 * n_features * np.log(2 * np.pi) - log_det
        assert value == pytest.approx(expected.item(), abs=1e-8)
    assert np.isfinite(flow.score(curved_data(10, 2, n_features))).all()


@pytest.mark.parametrize("coupling", ["realnvp", "maf"])
def test_flow_density_integrates_to_one_on_2d(coupling):
    flow = create_detector("flow", coupling=coupling, n_layers=4, epochs=5, seed=0)
    flow.fit(curved_data(300, 0, 2))
    grid = np.linspace(-9, 9, 361)
    xx, yy = np.meshgrid(grid, grid)
    points = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], axis=1), dtype=torch.float32)
    with torch.no_grad():
        density = torch.exp(-flow.network(points)).double().numpy()
    mass = density.sum() * (grid[1] - grid[0]) ** 2
    assert mass == pytest.approx(1.0, abs=0.02)


def test_flow_nll_decreases_with_training():
    train, val = curved_data(400, 0), curved_data(200, 1)
    untrained = create_detector("flow", epochs=0, seed=0).fit(train)  # every layer is the identity
    trained = create_detector("flow", epochs=15, seed=0).fit(train, val)
    standardized = untrained.preprocess(torch.as_tensor(val)).numpy()
    gaussian_nll = (0.5 * (standardized**2).sum(axis=1) + 2 * np.log(2 * np.pi)).mean()
    assert untrained.score(val).mean() == pytest.approx(gaussian_nll, rel=1e-5)
    assert trained.history.train_loss[-1] < trained.history.train_loss[0]
    assert trained.score(val).mean() < gaussian_nll - 1.0


def test_maf_flow_exports_with_parity(tmp_path):
    train = curved_data(200, 0, 3)
    flow = create_detector("flow", coupling="maf", n_layers=2, epochs=3, seed=0).fit(train)
    test = np.concatenate([curved_data(50, 1, 3), curved_data(10, 2, 3) * np.float32(2.0)])
    module = flow.scoring_module()
    threshold = float(np.quantile(flow.score(test), 0.8))
    path = export_onnx(module, threshold, test[:2], tmp_path / "maf.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("dagmm", {"n_components": 0}, "n_components must be an integer >= 1, got 0"),
        ("dagmm", {"latent_dim": 0}, "latent_dim must be an integer >= 1"),
        ("dagmm", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ("flow", {"n_layers": 0}, "n_layers must be an integer >= 1, got 0"),
        ("flow", {"coupling": "glow"}, r"coupling must be one of \['realnvp', 'maf'\]"),
        ("flow", {"log_scale_bound": 0.0}, "log_scale_bound must be > 0"),
    ],
)
def test_bad_params_are_rejected_at_construction(name, params, match):
    with pytest.raises(ValueError, match=match):
        create_detector(name, **params)
