"""A detector from outside normalcy adds an explanation output to its `Prediction`; with no
edit anywhere else, it is exported, passes the parity gate, and comes back from `normalcy score`
and `POST /score` (issue 8's test of the typed prediction)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from normalcy.cli import main
from normalcy.detectors import create_detector, register
from normalcy.detectors.base import Detector, FitData, Prediction
from normalcy.export import export_onnx, parity_check
from normalcy.scoring import load_session

FEATURES = ["a", "b", "c"]


class SquaredDeviation(nn.Module):
    """score = sum of squared deviations from the training mean; the deviations explain it."""

    def __init__(self, mean: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Prediction:
        deviation = (x.to(torch.float32) - self.mean) ** 2
        return Prediction(
            score=deviation.sum(dim=1),
            explanations={"deviation": deviation, "largest_feature": deviation.argmax(dim=1)},
        )


@register("toy_explained")
class ExplainedToy(Detector):
    name = "toy_explained"

    def _fit(self, data: FitData) -> None:
        self.mean = data.train.mean(axis=0)

    def scoring_module(self) -> nn.Module:
        return SquaredDeviation(self.mean).eval()

    # Persistence hooks: test_persistence saves and loads every registered detector, this too.
    def fitted_state(self) -> dict[str, torch.Tensor]:
        return {"mean": torch.as_tensor(self.mean)}

    def load_fitted_state(self, state: dict[str, torch.Tensor], input_shape: tuple) -> None:
        self.mean = state["mean"].numpy()
        self.input_shape = tuple(input_shape)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 3)).astype(np.float32)
    test = np.vstack([rng.normal(size=(40, 3)), [[6.0, 0.0, 0.0], [0.0, 0.0, -7.0]]])
    test = test.astype(np.float32)
    detector = create_detector("toy_explained").fit(train)
    calibration = detector.score(train[:100])
    threshold = float(np.quantile(calibration, 0.99))
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    metadata = {"input": {"name": "input", "dtype": "float32", "shape": ["N", 3]}}
    metadata["input"]["feature_names"] = FEATURES
    module = detector.scoring_module()
    export_onnx(
        module, threshold, train[:4], path, metadata=metadata, calibration_scores=calibration
    )
    report = parity_check(
        module, threshold, path, test, 1e-4, 1e-3, 1.0, calibration_scores=calibration
    )
    return {"path": path, "detector": detector, "test": test, "report": report}


def test_the_explanations_are_graph_outputs_and_pass_parity(exported):
    report = exported["report"]
    assert report.passed, report.message()
    names = ["score", "is_anomaly", "p_value", "deviation", "largest_feature"]
    assert report.outputs_compared == names
    assert [o.name for o in load_session(exported["path"]).get_outputs()] == names
    expected = exported["detector"].predict(exported["test"])
    assert expected["largest_feature"][-2:].tolist() == [0, 2]  # the planted deviations


def test_normalcy_score_writes_the_explanations(exported, tmp_path):
    source = tmp_path / "batch.csv"
    pd.DataFrame(exported["test"], columns=FEATURES).to_csv(source, index=False)
    out = tmp_path / "scores.csv"
    argv = ["score", "--model", str(exported["path"]), "--input", str(source)]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0
    result = pd.read_csv(out)
    expected = exported["detector"].predict(exported["test"])
    deviation = result[[f"deviation[{k}]" for k in range(3)]].to_numpy(np.float32)
    np.testing.assert_allclose(deviation, expected["deviation"], rtol=1e-5, atol=1e-6)
    assert result["largest_feature"].tolist() == expected["largest_feature"].tolist()


def test_post_score_returns_the_explanations(exported):
    from fastapi.testclient import TestClient

    from normalcy.serving import create_app

    rows = exported["test"][-2:]
    with TestClient(create_app(exported["path"])) as client:
        response = client.post("/score", json={"instances": rows.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["largest_feature"] == [0, 2]
    assert body["is_anomaly"] == [True, True]
    np.testing.assert_allclose(
        body["deviation"], exported["detector"].predict(rows)["deviation"], rtol=1e-5
    )
