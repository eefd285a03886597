"""The pipeline's stages on real benchmark data from ../shared/data (skipped when it is absent)."""

import numpy as np

from normalcy.config import DataParams, PrepareParams, TrainParams, ValidateParams
from normalcy.data.sources import load_dataset
from normalcy.data.splits import split_dataset
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.pipeline import train
from normalcy.validation.suite import build_suite_spec, validate_batch

from .conftest import shared_data


def test_adbench_wbc_npz_prepares_validates_and_trains(tmp_path, monkeypatch):
    path = shared_data("tabular", "42_WBC.npz")
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset(DataParams(source="npz", path=str(path)))
    assert dataset.X.shape[1] == 9 and 0 < dataset.y.mean() < 0.1
    splits = split_dataset(dataset, PrepareParams(train_contamination=None))
    spec = build_suite_spec(splits.train.X, splits.feature_names, ValidateParams())
    assert all(validate_batch(split.X, spec, name).success for name, split in splits.items())
    _, _, winner = train.train_candidates(
        splits.train, splits.val, TrainParams(epochs=60, candidates=["autoencoder"])
    )
    detector = train.load_winner()
    auroc = ranking_metrics(splits.test.y, detector.score(splits.test.X))["auroc"]
    assert winner.name == "autoencoder" and np.isfinite(winner.metric)
    assert auroc > 0.8  # WBC is an easy set: ADBench's IForest reaches about 0.97
