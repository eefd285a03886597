"""The training window: vetted batches folded once, read back with the source."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.config import DataParams
from normalcy.data.sources import DataError, Dataset, load_dataset
from normalcy.data.window import batch_name, fold_batch, with_window


def test_a_batch_is_folded_once_and_read_back_as_normal_rows(tmp_path):
    window = tmp_path / "window"
    rows = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    first = fold_batch(rows, window)
    assert first is not None and first.name == batch_name(rows)
    assert fold_batch(rows, window) is None  # the same batch again: nothing new
    assert fold_batch(rows[:10], window) is not None  # another batch
    # the same batch vetted differently (by a new champion) is still the same batch
    assert fold_batch(rows[:15], window, batch=rows) is None
    base = load_dataset(DataParams())
    grown = with_window(base, window)
    assert len(grown.X) == len(base.X) + 30
    assert np.array_equal(grown.X[: len(base.X)], base.X)
    assert grown.y[len(base.X) :].tolist() == [0] * 30  # vetted rows count as normal
    assert len(np.unique(grown.ids)) == len(grown.ids)  # ids after the source's own
    assert not list(window.glob(".*"))  # no temporary file left behind


def test_no_window_or_an_empty_one_changes_nothing(tmp_path):
    base = load_dataset(DataParams())
    assert with_window(base, None) is base
    assert with_window(base, tmp_path / "absent") is base
    (tmp_path / "empty").mkdir()
    assert with_window(base, tmp_path / "empty") is base


def test_window_rows_of_another_shape_and_empty_batches_are_refused(tmp_path):
    fold_batch(np.zeros((5, 3), dtype=np.float32), tmp_path)
    with pytest.raises(DataError, match="another data schema"):
        with_window(load_dataset(DataParams()), tmp_path)
    with pytest.raises(DataError, match="no vetted rows"):
        fold_batch(np.zeros((0, 3)), tmp_path)


def test_window_refuses_time_and_group_splits(tmp_path):
    fold_batch(np.zeros((5, 3), dtype=np.float32), tmp_path)
    timed = Dataset(np.ones((4, 3), np.float32), None, ["a", "b", "c"], times=np.arange(4.0))
    with pytest.raises(DataError, match="prepare.split random only"):
        with_window(timed, tmp_path)


def test_retrain_on_drift_needs_a_window_dir():
    from pydantic import ValidationError

    from normalcy.config import Params

    with pytest.raises(ValidationError, match="needs data.window_dir"):
        Params(monitor={"retrain_on_drift": True})
