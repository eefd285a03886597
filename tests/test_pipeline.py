import json

import numpy as np
import pytest

from normalcy.config import (
    CalibrationParams,
    CleanParams,
    DataParams,
    EvaluateParams,
    PrepareParams,
    TrainParams,
)
from normalcy.data.sources import load_dataset
from normalcy.data.splits import split_dataset
from normalcy.detectors.autoencoder import Autoencoder
from normalcy.pipeline import artifacts, clean, evaluate, export, train


class LabelSpy(Autoencoder):
    """Records what fit() received."""

    seen_labels: object = "unset"

    def fit(self, train, val=None, val_labels=None, train_labels=None):
        self.seen_labels = (val_labels, train_labels)
        return super().fit(train, val)


class LabelUsingSpy(LabelSpy):
    uses_labels = True


@pytest.fixture(scope="module")
def splits():
    return split_dataset(load_dataset(DataParams()), PrepareParams())


def test_labels_reach_only_detectors_that_declare_them(splits):
    quiet = train.fit_detector(LabelSpy(epochs=1), splits.train, splits.val)
    assert quiet.seen_labels == (None, None)
    using = train.fit_detector(LabelUsingSpy(epochs=1), splits.train, splits.val)
    assert np.array_equal(using.seen_labels[0], splits.val.y)
    assert np.array_equal(using.seen_labels[1], splits.train.y)


def test_train_evaluate_calibrates_on_validation_normals(splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = TrainParams(epochs=5, candidates=["autoencoder", "deep_svdd"])
    detectors, results, winner = train.train_candidates(splits.train, splits.val, params)
    assert [r.name for r in results] == ["autoencoder", "deep_svdd"]
    assert winner.metric == max(r.metric for r in results)
    saved = json.loads(artifacts.CANDIDATES.read_text())
    assert saved["winner"] == winner.name
    loaded = train.load_winner()
    assert np.allclose(
        loaded.score(splits.test.X[:5]), detectors[winner.name].score(splits.test.X[:5])
    )

    evaluation = evaluate.evaluate(
        loaded, splits, EvaluateParams(), CalibrationParams(target_fpr=0.05)
    )
    normal_val = evaluation.val_scores[splits.val.y == 0]
    assert evaluation.n_calibration == len(normal_val)
    assert np.mean(normal_val > evaluation.threshold) <= 0.05
    assert 0 <= evaluation.test["fpr"] <= 1 and "auroc" in evaluation.test
    point = evaluate.load_operating_point(EvaluateParams())
    assert point.threshold == pytest.approx(evaluation.threshold)
    assert len(point.calibration_scores) == evaluation.n_calibration
    assert point.target_fpr == 0.05


def test_model_metadata_describes_the_input(splits):
    detector = Autoencoder(epochs=1).fit(splits.train.X)
    metadata = export.model_metadata(
        detector, splits.feature_names, splits.test.X, 1.5, 0.01, 180, 18, {"data_version": "x"}
    )
    assert metadata["input"]["shape"] == ["N", 64]
    assert metadata["input"]["feature_names"] == splits.feature_names
    assert metadata["detector_params"]["hidden_dims"] == [64, 32]
    assert metadata["threshold"] == 1.5 and metadata["data_version"] == "x"
    json.dumps(metadata)


def test_ensemble_candidate_combines_the_best_fitted_candidates(splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = TrainParams(candidates=["autoencoder", "deep_svdd", "ensemble"], epochs=3)
    detectors, results, _ = train.train_candidates(splits.train, splits.val, params)
    ensemble = detectors["ensemble"]
    assert sorted(m.name for m in ensemble.fitted) == ["autoencoder", "deep_svdd"]
    assert ensemble.fitted[0] is detectors[ensemble.fitted[0].name]  # reused, not retrained
    assert [r.name for r in results] == ["autoencoder", "deep_svdd", "ensemble"]
    # Each member's normalized validation scores have median 0: the scales are comparable.
    for member, location, scale in zip(
        ensemble.fitted, ensemble.location, ensemble.scale, strict=True
    ):
        assert abs(np.median((member.score(splits.val.X) - location) / scale)) < 1e-6


def test_ensemble_needs_two_other_candidates(tmp_path):
    from normalcy.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="'ensemble' combines the other candidates"):
        load_params(tmp_path / "absent.yaml", ["train.candidates=[autoencoder, ensemble]"])


def test_candidates_without_a_training_loop_take_only_the_settings_they_accept(splits):
    """knn and iforest have no epochs/learning rate; the shared train.* settings skip them."""
    params = TrainParams(candidates=["knn", "iforest", "autoencoder"], epochs=2)
    detectors, results, winner = train.fit_candidates(splits.train, splits.val, params)
    assert [r.name for r in results] == ["knn", "iforest", "autoencoder"]
    assert detectors["iforest"].seed == params.seed
    assert winner.name in detectors and all(np.isfinite(r.metric) for r in results)
    cleaner = clean.cleaning_detector(CleanParams(detector="knn", epochs=3))()
    assert cleaner.name == "knn"


def test_a_list_of_preprocessings_is_chosen_on_validation_and_recorded(splits):
    """Each choice is fitted; the best validation metric wins and every metric is recorded."""
    choices = ["standardize", "none", {"kind": "minmax"}]
    params = TrainParams(candidates=["knn"], detectors={"knn": {"preprocessing": choices}})
    detectors, results, _ = train.fit_candidates(splits.train, splits.val, params)
    trials = results[0].extra["preprocessing_trials"]
    assert list(trials) == ["standardize", "none", '{"kind": "minmax"}']
    best = max(trials, key=trials.get)
    assert results[0].extra["preprocessing"] == best
    assert results[0].metric == trials[best]
    chosen = detectors["knn"].constructor_params()["preprocessing"]
    assert train.describe(chosen) == best
    # The kept detector is the one that scored best: refitting that choice gives its scores.
    again = train.build_candidate("knn", params, {"preprocessing": chosen}).fit(splits.train.X)
    np.testing.assert_allclose(again.score(splits.val.X), detectors["knn"].score(splits.val.X))
