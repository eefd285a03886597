"""Loss truncation (`trim_fraction`): the reduction, its checks, and what it does to a fit."""

from pathlib import Path

import numpy as np
import pytest
import torch

from normalcy.config import load_params
from normalcy.detectors import create_detector
from normalcy.detectors.training import LossTrimming, trimmed_mean
from normalcy.evaluation.metrics import ranking_metrics

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_trimmed_mean_leaves_out_the_largest_losses():
    losses = torch.tensor([1.0, 100.0, 2.0, 3.0, 50.0])
    assert trimmed_mean(losses, 0.4).item() == pytest.approx(2.0)  # 100 and 50 left out
    assert trimmed_mean(losses, 0.1).item() == pytest.approx(31.2)  # floor(0.5) = 0 left out
    assert trimmed_mean(torch.tensor([7.0]), 0.49).item() == 7.0  # one row is always kept


def test_trimming_starts_after_the_warm_up_and_keeps_gradients():
    losses = torch.tensor([1.0, 2.0, 3.0, 90.0], requires_grad=True)
    trimming = LossTrimming(fraction=0.25, after=2)
    assert trimming.reduce(losses, epoch=1).item() == pytest.approx(24.0)  # warm-up: plain mean
    trimmed = trimming.reduce(losses, epoch=2)
    assert trimmed.item() == pytest.approx(2.0)
    trimmed.backward()
    assert losses.grad.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])  # 90 has no say


def test_trimming_refuses_a_batch_mean_and_bad_settings():
    with pytest.raises(ValueError, match="needs a loss per row"):
        LossTrimming(fraction=0.1).reduce(torch.tensor(3.0), epoch=10)
    assert LossTrimming().reduce(torch.tensor(3.0), epoch=10).item() == 3.0  # off: any loss
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\)"):
        LossTrimming(fraction=0.5)
    with pytest.raises(ValueError, match="trim_after must be an integer >= 0"):
        LossTrimming(fraction=0.1, after=-1)


def test_a_detector_whose_loss_couples_rows_refuses_trimming():
    with pytest.raises(ValueError, match="dagmm: trim_fraction needs a training loss per row"):
        create_detector("dagmm", trim_fraction=0.1)
    for name in ("autoencoder", "vae", "flow", "deep_svdd", "memae"):
        assert create_detector(name, trim_fraction=0.1).trim_fraction == 0.1


def test_params_refuse_a_trim_fraction_out_of_range():
    with pytest.raises(ValueError, match="trim_fraction") as error:
        load_params(PARAMS, ["train.detectors.autoencoder.trim_fraction=0.7"])
    assert "0.5" in str(error.value)


def contaminated_rows(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training rows: normal rows near one 2-d plane in 8-d, and 8% contamination near another
    plane; held-out normal rows; held-out anomalies from the second plane)."""
    rng = np.random.default_rng(seed)
    normal_plane, anomaly_plane = rng.normal(size=(2, 8)), rng.normal(size=(2, 8))

    def near(plane: np.ndarray, n: int, shift: float) -> np.ndarray:
        rows = rng.normal(size=(n, 2)) @ plane + 0.05 * rng.normal(size=(n, 8)) + shift
        return rows.astype(np.float32)

    train = np.vstack([near(normal_plane, 920, 0.0), near(anomaly_plane, 80, 1.0)])
    return train, near(normal_plane, 300, 0.0), near(anomaly_plane, 60, 1.0)


def test_trimming_keeps_an_autoencoder_from_learning_the_contamination():
    """An autoencoder with room for both planes learns the contaminating one too, and then
    reconstructs new anomalies from it well. A network fits the majority first, so after a
    warm-up the contamination has the largest losses: trimmed away, it is never learned."""
    train, normal, anomalies = contaminated_rows(0)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalies))]
    aurocs = {}
    for fraction in (0.0, 0.1):
        detector = create_detector(
            "autoencoder", hidden_dims=[32], latent_dim=4, epochs=60, patience=60,
            learning_rate=3e-3, trim_fraction=fraction, trim_after=3, seed=0, threads=1,
        ).fit(train)  # fmt: skip
        scores = detector.score(np.vstack([normal, anomalies]))
        aurocs[fraction] = ranking_metrics(labels, scores)["auroc"]
    assert aurocs[0.1] > 0.97 and aurocs[0.0] < aurocs[0.1] - 0.05, aurocs
