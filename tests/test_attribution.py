"""Per-feature contributions in the graph: the leave-feature-out wrapper is exact on a score
whose contributions are known, it is left out where it would cost too much, it survives
persistence, plain scoring does not pay for it, and its parity is judged on the row's scale."""

import numpy as np
import pytest
import torch
from torch import nn

from normalcy.artifact.names import FEATURE_CONTRIBUTIONS_NAME
from normalcy.detectors import create_detector
from normalcy.detectors.attribution import (
    MAX_LEAVE_OUT_FEATURES,
    LeaveFeatureOut,
    explained_by_leaving_features_out,
    left_out_copies,
)
from normalcy.detectors.base import Prediction
from normalcy.detectors.persistence import load_detector, save_detector
from normalcy.export.parity import _compare_values
from normalcy.export.tolerance import FloatTolerance


class SquaredDeviation(nn.Module):
    """score = sum_j (x_j - center_j)^2, with a `nearest` explanation to carry along."""

    def __init__(self, center: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("center", center)

    def forward(self, x: torch.Tensor) -> Prediction:
        score = ((x - self.center) ** 2).sum(dim=1)
        return Prediction(score, explanations={"nearest": x.argmax(dim=1)})


def test_left_out_copies_replace_one_feature_each():
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    copies = left_out_copies(rows, torch.tensor([0.0, -1.0, -2.0]))
    assert copies.tolist() == [
        [0.0, 2.0, 3.0],
        [1.0, -1.0, 3.0],
        [1.0, 2.0, -2.0],
        [0.0, 5.0, 6.0],
        [4.0, -1.0, 6.0],
        [4.0, 5.0, -2.0],
    ]


def test_leave_feature_out_is_exact_for_an_additive_score_and_keeps_other_outputs():
    center = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    prediction = LeaveFeatureOut(SquaredDeviation(center), baseline=center)(x)
    # replacing x_j by the center removes exactly its term (x_j - c_j)^2 from the score
    expected = (x - center) ** 2
    got = prediction.explanations[FEATURE_CONTRIBUTIONS_NAME]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prediction.score, expected.sum(dim=1))
    assert prediction.explanations["nearest"].tolist() == x.argmax(dim=1).tolist()


def test_no_contributions_without_a_baseline_or_for_too_many_features():
    head = SquaredDeviation(torch.zeros(3))
    assert explained_by_leaving_features_out(head, None) is head
    wide = torch.zeros(MAX_LEAVE_OUT_FEATURES + 1)
    assert explained_by_leaving_features_out(head, wide) is head
    assert isinstance(explained_by_leaving_features_out(head, torch.zeros(3)), LeaveFeatureOut)


@pytest.fixture(scope="module")
def svdd_and_rows():
    rng = np.random.default_rng(0)
    train = (rng.normal(size=(300, 5)) * [1, 2, 3, 4, 5] + 10).astype(np.float32)
    detector = create_detector("deep_svdd", epochs=3, seed=0, threads=1, leave_feature_out=True)
    return detector.fit(train), train


def test_leave_feature_out_is_off_unless_asked_for():
    """d + 1 score passes a row: the default graph must not pay for them."""
    train = np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32)
    detector = create_detector("deep_svdd", epochs=1, seed=0, threads=1).fit(train)
    assert not isinstance(detector.scoring_module().head, LeaveFeatureOut)
    assert FEATURE_CONTRIBUTIONS_NAME not in detector.predict(train[:5])


def test_the_baseline_is_the_preprocessed_training_mean_and_is_saved(svdd_and_rows, tmp_path):
    detector, train = svdd_and_rows
    standardized = detector.preprocess(torch.as_tensor(train)).double().mean(dim=0)
    torch.testing.assert_close(detector.feature_baseline.double(), standardized, atol=1e-6, rtol=0)
    loaded = load_detector(save_detector(detector, tmp_path / "svdd.pt"))
    torch.testing.assert_close(loaded.feature_baseline, detector.feature_baseline)
    expected = detector.predict(train[:20])[FEATURE_CONTRIBUTIONS_NAME]
    np.testing.assert_array_equal(loaded.predict(train[:20])[FEATURE_CONTRIBUTIONS_NAME], expected)


def test_plain_scoring_does_not_compute_contributions(svdd_and_rows):
    detector, train = svdd_and_rows
    assert isinstance(detector.scoring_module().head, LeaveFeatureOut)
    assert not isinstance(detector.score_only_module().head, LeaveFeatureOut)
    predicted = detector.predict(train[:50])
    assert predicted[FEATURE_CONTRIBUTIONS_NAME].shape == (50, 5)
    np.testing.assert_allclose(detector.score(train[:50]), predicted["score"], rtol=1e-6)


def test_contributions_parity_is_relative_to_the_rows_largest_contribution():
    policy = FloatTolerance(1e-4, 1e-3, 1.0)
    reference = np.array([[5000.0, 0.5, -20.0]], dtype=np.float32)
    rounding = reference + np.array([[0.01, 0.01, -0.01]], dtype=np.float32)  # 2e-6 of 5000
    wrong = reference + np.array([[0.0, 30.0, 0.0]], dtype=np.float32)  # 6e-3 of 5000
    name = FEATURE_CONTRIBUTIONS_NAME
    assert _compare_values(name, reference, rounding, policy).n_mismatches == 0
    assert _compare_values(name, reference, wrong, policy).n_mismatches == 1
    # any other explanation keeps the per-value rule
    assert _compare_values("deviation", reference, rounding, policy).n_mismatches == 1
