"""The MMD family: exact under no drift, sees a change of correlation that KS cannot, shares the
overall level, and refuses permutation counts that could never reach its level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from normalcy.config import ConfigError, load_params
from normalcy.drift import detect_drift
from normalcy.drift_mmd import mmd_test, rbf_kernel

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def correlated(rng: np.random.Generator, n: int, rho: float) -> np.ndarray:
    z = rng.normal(size=(n, 2))
    return np.c_[z[:, 0], rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]]


def test_kernel_is_one_on_the_diagonal_and_falls_with_distance():
    kernel = rbf_kernel(np.array([[0.0], [1.0], [3.0]]))
    np.testing.assert_allclose(np.diag(kernel), 1.0)
    assert kernel[0, 1] > kernel[0, 2] > 0
    # median squared distance of the pairs (1, 9, 4) is 4: k(0, 1) = exp(-1 / 4)
    assert kernel[0, 1] == pytest.approx(np.exp(-0.25))


def test_p_values_are_uniform_enough_without_drift():
    rng = np.random.default_rng(1)
    p = np.array(
        [
            mmd_test(rng.normal(size=(300, 4)), rng.normal(size=(100, 4)), 100, 99, i)[1]
            for i in range(300)
        ]
    )
    assert np.mean(p <= 0.05) <= 0.08
    assert np.mean(p <= 0.5) == pytest.approx(0.5, abs=0.1)
    assert p.min() >= 1 / 100


def test_a_broken_correlation_is_seen_by_mmd_and_missed_by_ks():
    rng = np.random.default_rng(2)
    reference, batch = correlated(rng, 1000, 0.0), correlated(rng, 300, 0.9)
    statistic, p = mmd_test(reference, batch, 300)
    assert p == 1 / 1001 and statistic > 0  # no permutation of 1000 reaches it
    assert min(stats.ks_2samp(reference[:, j], batch[:, j]).pvalue for j in range(2)) > 0.01
    report = detect_drift(
        reference, batch, None, rng.normal(size=500), rng.normal(size=300), 0.01, mmd_rows=300
    )
    assert report.fired() == ["mmd"] and report.family_level == pytest.approx(0.01 / 3)
    assert report.test("mmd").p_value == pytest.approx(p)


def test_same_batch_same_p_value_and_bad_settings_refused():
    rng = np.random.default_rng(3)
    reference, batch = rng.normal(size=(200, 3)), rng.normal(size=(50, 3))
    assert mmd_test(reference, batch, 40) == mmd_test(reference, batch, 40)
    with pytest.raises(ValueError, match="max_rows"):
        mmd_test(reference, batch, 1)
    with pytest.raises(ValueError, match="permutations"):
        mmd_test(reference, batch, 40, permutations=0)
    with pytest.raises(ValueError, match="cannot reach the MMD's level"):
        detect_drift(
            reference, batch, None, np.ones(5), np.ones(5), 0.01, mmd_rows=40, mmd_permutations=100
        )


def test_config_refuses_too_few_permutations_for_alpha():
    with pytest.raises(ConfigError, match="monitor.mmd_permutations must be at least 499"):
        load_params(PARAMS, ["monitor.mmd_permutations=100"])
    assert load_params(PARAMS, ["monitor.mmd_permutations=100", "monitor.mmd=false"])
    with pytest.raises(ConfigError, match="monitor.mmd_max_rows"):
        load_params(PARAMS, ["monitor.mmd_max_rows=2"])
