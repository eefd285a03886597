"""ICL beyond the shared zoo suite: the paper's window rule, the windows and their complements,
the score as the InfoNCE loss written out independently, seeding, early stopping, bad params."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normalcy.detectors import create_detector
from normalcy.detectors.icl import paper_window_size, window_indices
from normalcy.detectors.registry import DetectorParamsError
from tests.test_detector_zoo import low_rank_data

SMALL = {"epochs": 3, "hidden_dims": [16], "window_hidden_dims": [8], "embedding_dim": 8}


def small_icl(**params):
    return create_detector("icl", **{**SMALL, **params})


TRAIN, VAL, TEST = (low_rank_data(n, seed) for n, seed in ((200, 0), (60, 1), (40, 2)))


@pytest.fixture(scope="module")
def fitted():
    return small_icl(seed=0, epochs=6).fit(TRAIN, VAL)


@pytest.mark.parametrize(
    ("n_features", "expected"),
    [(2, 1), (3, 2), (8, 2), (40, 2), (41, 10), (160, 10), (161, 11), (200, 50)],
)
def test_window_size_follows_the_paper_and_leaves_a_complement(n_features, expected):
    assert paper_window_size(n_features) == expected


def test_windows_are_consecutive_and_complements_are_the_other_features():
    windows, complements = window_indices(5, 2)
    assert windows.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert complements.tolist() == [[2, 3, 4], [0, 3, 4], [0, 1, 4], [0, 1, 2]]


def reference_score(detector, x: torch.Tensor) -> torch.Tensor:
    """The per-row mean over windows of cross-entropy(complement j vs all windows, target j),
    with windows cut by plain slicing: an independent statement of the paper's loss."""
    network = detector.network
    k, d = network.window_size, x.shape[1]
    losses = []
    with torch.no_grad():
        for row in detector.preprocess(x):
            starts = range(d - k + 1)
            windows = torch.stack([row[j : j + k] for j in starts])
            complements = torch.stack([torch.cat([row[:j], row[j + k :]]) for j in starts])
            # one row's [m, part] stack; the encoders normalize per window position
            w = F.normalize(network.window_encoder(windows[None])[0], dim=1)
            c = F.normalize(network.complement_encoder(complements[None])[0], dim=1)
            logits = c @ w.T / detector.temperature
            losses.append(F.cross_entropy(logits, torch.arange(len(starts))))
    return torch.stack(losses)


def test_score_is_the_internal_contrastive_loss_per_row(fitted):
    expected = reference_score(fitted, torch.from_numpy(TEST))
    np.testing.assert_allclose(fitted.score(TEST), expected.numpy(), rtol=1e-4, atol=1e-4)
    # a row's score does not depend on the rows scored with it
    one_by_one = np.concatenate([fitted.score(TEST[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, fitted.score(TEST[:5]), rtol=1e-5, atol=1e-5)


def test_early_stopping_keeps_the_best_validation_epoch(fitted):
    history = fitted.history
    assert len(history.val_loss) == 6
    best = min(history.val_loss)
    assert history.val_loss[history.best_epoch] == best
    # the kept weights give exactly the best epoch's validation loss (loss = mean score)
    assert fitted.score(VAL).mean() == pytest.approx(best, rel=1e-5)


def test_patience_ends_training_early():
    detector = small_icl(epochs=200, patience=1, learning_rate=0.05).fit(TRAIN, VAL)
    assert len(detector.history.val_loss) < 200


def test_same_seed_same_scores_other_seed_other_scores(fitted):
    again = small_icl(seed=0, epochs=6).fit(TRAIN, VAL)
    np.testing.assert_array_equal(again.score(TEST), fitted.score(TEST))
    other = small_icl(seed=1, epochs=6).fit(TRAIN, VAL)
    assert not np.allclose(other.score(TEST), fitted.score(TEST))


def test_a_window_size_that_leaves_no_complement_is_refused_before_training():
    detector = small_icl(window_size=8)
    with pytest.raises(ValueError, match=r"window_size must be in \[1, 7\].*8 features.*got 8"):
        detector.fit(TRAIN)
    assert detector.network is None and detector.history is None


def test_rows_of_one_feature_are_refused():
    with pytest.raises(ValueError, match="at least 2 features.*got 1"):
        small_icl().fit(TRAIN[:, :1])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window_size": 0}, "window_size must be an integer >= 1 or null, got 0"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"embedding_dim": 0}, "embedding_dim must be an integer >= 1, got 0"),
        ({"hidden_dims": [0]}, "hidden_dims must be a list of integers >= 1"),
    ],
)
def test_bad_params_are_refused_by_name(params, message):
    with pytest.raises(DetectorParamsError, match=message):
        create_detector("icl", **params)


def test_the_constructor_refuses_what_the_spec_refuses():
    from normalcy.detectors.icl import ICL

    with pytest.raises(ValueError, match="window_size must be >= 1 or null, got 0"):
        ICL(window_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        ICL(temperature=-1)
