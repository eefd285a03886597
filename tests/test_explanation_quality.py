"""Issue 10's check of the explanations: on correlated Gaussian rows, a +6 standard deviation
anomaly injected into one known feature per row is that row's top feature for at least 80% of
the rows, for every detector with per-feature contributions, scored by onnxruntime through
`normalcy score --explain 1` on the exported graph (which passes the parity gate)."""

import numpy as np
import pandas as pd
import pytest

from normalcy.cli import main
from normalcy.detectors.registry import create_with_settings
from normalcy.export import export_onnx, parity_check

N_FEATURES = 8
FEATURES = [f"sensor_{j}" for j in range(N_FEATURES)]
INJECTED_SDS = 6.0
MIN_TOP1_SHARE = 0.8
# Short, seeded, one-thread training; a small code for the reconstruction family, since a
# code as wide as the input could learn the identity and reconstruct the anomaly too.
SETTINGS = {"epochs": 30, "seed": 0, "threads": 1}
CODE = {"latent_dim": 3}
EXPLAINED = {
    "autoencoder": CODE,
    "memae": CODE,
    "vae": CODE,
    "deep_svdd": {"leave_feature_out": True},  # opt-in: it costs d + 1 score passes a row
    "flow": {"leave_feature_out": True},
    "dagmm": {"leave_feature_out": True},
    "pca": {},  # exact terms of the quadratic form, no training settings
    "mahalanobis": {},
}


def correlated_rows(n: int, seed: int) -> np.ndarray:
    """Rows of a 3-factor Gaussian in 8 features (every pair correlated), far from 0."""
    loadings = np.random.default_rng(123).normal(size=(N_FEATURES, 3))
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 3))
    noise = 0.3 * rng.normal(size=(n, N_FEATURES))
    return (factors @ loadings.T + noise + 10.0).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    train, val = correlated_rows(1000, 1), correlated_rows(200, 2)
    test = correlated_rows(240, 3)
    injected = np.arange(len(test)) % N_FEATURES
    anomalies = test.copy()
    anomalies[np.arange(len(test)), injected] += INJECTED_SDS * train.std(axis=0)[injected]
    return train, val, anomalies, injected


@pytest.mark.parametrize("name", sorted(EXPLAINED))
def test_the_injected_feature_ranks_first(name, data, tmp_path):
    train, val, anomalies, injected = data
    detector = create_with_settings(name, EXPLAINED[name], SETTINGS).fit(train, val)
    module = detector.scoring_module()
    calibration = detector.score(val)
    threshold = float(np.quantile(calibration, 0.99))
    metadata = {"input": {"name": "input", "dtype": "float32", "shape": ["N", N_FEATURES]}}
    metadata["input"]["feature_names"] = FEATURES
    path = export_onnx(
        module,
        threshold,
        train[:4],
        tmp_path / f"{name}.onnx",
        metadata=metadata,
        calibration_scores=calibration,
    )
    rows = np.vstack([val, anomalies])
    report = parity_check(
        module, threshold, path, rows, 1e-4, 1e-3, 1.0, calibration_scores=calibration
    )
    assert report.passed, report.message()
    assert "feature_contributions" in report.outputs_compared

    batch, out = tmp_path / "anomalies.csv", tmp_path / "scores.csv"
    pd.DataFrame(anomalies, columns=FEATURES).to_csv(batch, index=False)
    argv = ["score", "--model", str(path), "--input", str(batch), "--output", str(out)]
    assert main([*argv, "--explain", "1", "--quiet"]) == 0
    top1 = pd.read_csv(out)["top1_feature"].to_numpy()
    share = float(np.mean(top1 == np.asarray(FEATURES)[injected]))
    assert share >= MIN_TOP1_SHARE, f"{name}: the injected feature ranks first in {share:.0%}"
