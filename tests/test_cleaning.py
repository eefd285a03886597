import numpy as np
import pytest

from normalcy.config import CleanParams, DataParams, PrepareParams
from normalcy.data.sources import load_dataset
from normalcy.data.splits import Split, split_dataset
from normalcy.detectors import create_detector
from normalcy.pipeline.clean import cleaning_detector
from normalcy.validation.cleaning import clean_training_split, contamination_cutoff, removal_quality


def test_cutoff_robust_or_top_fraction():
    scores = np.concatenate([np.random.default_rng(0).normal(size=990), np.full(10, 50.0)])
    robust = contamination_cutoff(scores, CleanParams(mad_threshold=3.5))
    assert 2.5 < robust < 5.0  # the 10 outliers do not inflate the cutoff
    top = contamination_cutoff(scores, CleanParams(top_fraction=0.05))
    assert (scores > top).sum() == pytest.approx(50, abs=1)


def test_removal_quality():
    removed = np.array([True, True, False, False])
    labels = np.array([1, 0, 1, 0])
    assert removal_quality(removed, labels) == (0.5, 0.5)
    assert removal_quality(removed, None) == (None, None)


def test_iterative_cleaning_removes_contamination_on_digits():
    dataset = load_dataset(DataParams(anomaly_fraction=0.3))
    train = split_dataset(dataset, PrepareParams(train_contamination=0.1)).train
    params = CleanParams(max_iter=3, epochs=20)

    def make():
        return create_detector("autoencoder", epochs=params.epochs, seed=0)

    cleaned, result = clean_training_split(train, make, params)
    assert 1 <= len(result.iterations) <= 3
    last = result.iterations[-1]
    assert last.n_removed == result.n_removed == len(train) - len(cleaned)
    base_rate = train.y.mean()
    removed_fraction = last.n_removed / len(train)
    # Far better than chance: a random removal of the same size has precision = base_rate and
    # recall = removed_fraction; ask for at least twice both.
    assert last.precision > 2 * base_rate and last.recall > 2 * removed_fraction
    assert cleaned.y.mean() < train.y.mean()
    assert set(cleaned.ids).isdisjoint(last.removed_ids)
    log = result.to_dict()
    assert log["n_removed"] == result.n_removed and log["iterations"][0]["iteration"] == 1


def test_cleaning_without_labels_reports_no_quality():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    X[:6] += 12
    train = Split(X, None, np.arange(200))
    cleaned, result = clean_training_split(
        train, lambda: create_detector("autoencoder", epochs=10), CleanParams(max_iter=2)
    )
    assert result.iterations[0].precision is None
    assert not set(range(6)) & set(cleaned.ids.tolist())


def test_a_cluster_of_contamination_is_cleaned_by_a_wide_knn():
    """20 near-identical contaminating rows: a k=5 kNN cleaning keeps them all (masking);
    k at 5% of the rows (30) finds them all."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 4)).astype(np.float32)
    X[:20] = 5.0 + 0.05 * rng.normal(size=(20, 4))
    labels = (np.arange(600) < 20).astype(int)
    train = Split(X, labels, np.arange(600))
    narrow = CleanParams(detector="knn", mad_threshold=2.5, max_iter=4)
    wide = narrow.model_copy(update={"detector_params": {"k_fraction": 0.05}})
    _, masked = clean_training_split(train, cleaning_detector(narrow), narrow)
    _, found = clean_training_split(train, cleaning_detector(wide), wide)
    assert masked.iterations[-1].recall == 0.0
    assert found.iterations[-1].recall == 1.0
