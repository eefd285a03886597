from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from normalcy.config import DataParams, PrepareParams
from normalcy.data.sources import DataError, load_batch, load_dataset
from normalcy.data.splits import check_no_leakage, load_splits, save_splits, split_dataset


def test_digits_one_class_setup():
    dataset = load_dataset(DataParams(normal_digits=[0, 1], anomaly_fraction=0.1))
    assert dataset.X.shape[1] == 64 and dataset.X.dtype == np.float32
    assert dataset.y.mean() == pytest.approx(0.1, abs=0.01)
    images = load_dataset(DataParams(as_images=True))
    assert images.X.shape[1:] == (1, 8, 8) and images.is_image


def test_splits_are_deterministic_stratified_and_disjoint():
    dataset = load_dataset(DataParams())
    params = PrepareParams(seed=3, train_contamination=None)
    a, b = split_dataset(dataset, params), split_dataset(dataset, params)
    for (_, split_a), (_, split_b) in zip(a.items(), b.items(), strict=True):
        assert np.array_equal(split_a.ids, split_b.ids)
    rates = [a.train.y.mean(), a.val.y.mean(), a.test.y.mean()]
    assert max(rates) - min(rates) < 0.02  # stratified (the holdout is chosen by row hash)
    all_ids = np.concatenate([split.ids for _, split in a.items()])
    assert len(all_ids) == len(np.unique(all_ids))
    other_seed = split_dataset(dataset, PrepareParams(seed=4, train_contamination=None))
    assert not np.array_equal(a.train.ids, other_seed.train.ids)


def test_holdout_is_the_same_rows_whatever_else_the_data_holds():
    dataset = load_dataset(DataParams())
    params = PrepareParams(holdout_fraction=0.2)
    splits = split_dataset(dataset, params)
    assert len(splits.holdout) == pytest.approx(0.2 * len(dataset.X), rel=0.2)
    assert 0 < splits.holdout.y.sum() < len(splits.holdout)  # both classes, as drawn at random
    # Half of the rows removed and the seed changed: every remaining row keeps its side.
    kept = np.arange(len(dataset.X)) % 2 == 0
    smaller = replace(dataset, X=dataset.X[kept], y=dataset.y[kept], ids=dataset.ids[kept])
    other = split_dataset(smaller, PrepareParams(holdout_fraction=0.2, seed=7))
    expected = np.intersect1d(splits.holdout.ids, dataset.ids[kept])
    assert np.array_equal(np.sort(other.holdout.ids), np.sort(expected))
    assert len(expected) > 0


def test_tiny_data_still_holds_out_a_row():
    dataset = load_dataset(DataParams())
    tiny = replace(dataset, X=dataset.X[:40], y=dataset.y[:40], ids=dataset.ids[:40])
    splits = split_dataset(tiny, PrepareParams(holdout_fraction=0.001, train_contamination=None))
    assert len(splits.holdout) == 1
    again = split_dataset(tiny, PrepareParams(holdout_fraction=0.001, seed=5))
    assert np.array_equal(again.holdout.ids, splits.holdout.ids)  # by hash, not by seed


def test_train_contamination_is_capped():
    dataset = load_dataset(DataParams(anomaly_fraction=0.2))
    splits = split_dataset(dataset, PrepareParams(train_contamination=0.03))
    assert splits.train.y.mean() <= 0.03 + 1e-9
    assert splits.train.y.sum() > 0
    assert splits.dropped_train_anomalies > 0
    assert splits.test.y.mean() == pytest.approx(0.2, abs=0.02)


def test_duplicate_rows_never_leak_across_splits():
    X = np.repeat(np.arange(100, dtype=np.float32).reshape(50, 2), 2, axis=0)  # every row twice
    from normalcy.data.sources import Dataset

    splits = split_dataset(Dataset(X, None, ["a", "b"]), PrepareParams())
    assert splits.dropped_duplicates == 50
    check_no_leakage(splits)  # would raise on a shared row
    splits.test.X[0] = splits.train.X[0]
    with pytest.raises(DataError, match="identical row"):
        check_no_leakage(splits)


def test_save_and_load_round_trip(tmp_path):
    splits = split_dataset(load_dataset(DataParams()), PrepareParams())
    save_splits(splits, tmp_path / "prepared", {"source": "sklearn_digits"})
    loaded = load_splits(tmp_path / "prepared")
    assert np.array_equal(loaded.test.X, splits.test.X)
    assert np.array_equal(loaded.train.y, splits.train.y)
    assert loaded.feature_names == splits.feature_names


def _csv(tmp_path, frame, name="data.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def test_csv_source_with_label_and_id(tmp_path):
    frame = pd.DataFrame(
        {"id": range(20), "a": np.arange(20.0), "b": np.ones(20), "label": [0] * 18 + [1] * 2}
    )
    dataset = load_dataset(
        DataParams(source="csv", path=_csv(tmp_path, frame), label_column="label", id_column="id")
    )
    assert dataset.feature_names == ["a", "b"]
    assert dataset.y.sum() == 2
    assert list(dataset.ids[:3]) == [0, 1, 2]


@pytest.mark.parametrize(
    ("frame", "kwargs", "fragment"),
    [
        (
            pd.DataFrame({"a": [1.0, np.nan], "b": [1.0, 2.0]}),
            {},
            "NaN/inf values in 1 feature(s) (first: ['a']",
        ),
        (pd.DataFrame({"a": [1.0, np.inf], "b": [1.0, 2.0]}), {}, "NaN/inf"),
        (pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}), {}, "non-numeric column(s) {'b': "),
        (
            pd.DataFrame({"a": [1.0, 2.0]}),
            {"feature_columns": ["a", "b"]},
            "missing column(s) ['b']",
        ),
        (
            pd.DataFrame({"a": [1.0, 2.0], "b": [1.0, 2.0], "c": [0, 0]}),
            {"feature_columns": ["a", "b"]},
            "unexpected column(s) ['c']",
        ),
        (
            pd.DataFrame({"a": [1.0, 2.0], "label": [0, 2]}),
            {"label_column": "label"},
            "expected 0 (normal) / 1 (anomaly)",
        ),
    ],
)
def test_bad_tables_fail_naming_what_is_wrong(tmp_path, frame, kwargs, fragment):
    with pytest.raises(DataError) as info:
        load_dataset(DataParams(source="csv", path=_csv(tmp_path, frame), **kwargs))
    assert fragment in str(info.value)


def test_empty_and_corrupted_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_dataset(DataParams(source="csv", path=str(empty)))
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b\n")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(DataParams(source="csv", path=str(header_only)))
    corrupted = tmp_path / "broken.npz"
    corrupted.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(DataParams(source="npz", path=str(corrupted)))
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, features=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no array 'X'"):
        load_dataset(DataParams(source="npz", path=str(no_x)))


def test_all_anomalous_training_data_is_refused(tmp_path):
    path = tmp_path / "all_bad.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(40, 3)), y=np.ones(40))
    with pytest.raises(DataError, match="every row is labelled anomalous"):
        split_dataset(load_dataset(DataParams(source="npz", path=str(path))), PrepareParams())


def test_load_batch_checks_columns_and_shape(tmp_path):
    names = ["a", "b"]
    good = _csv(tmp_path, pd.DataFrame({"a": [1.0], "b": [2.0]}), "good.csv")
    assert load_batch(good, names, [2]).shape == (1, 2)
    bad = _csv(tmp_path, pd.DataFrame({"a": [1.0], "c": [2.0]}), "bad.csv")
    with pytest.raises(DataError, match=r"missing \['b'\], unexpected \['c'\]"):
        load_batch(bad, names, [2])
    npz = tmp_path / "batch.npz"
    np.savez(npz, X=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"rows have shape \[3\]; the model expects \[2\]"):
        load_batch(npz, names, [2])


def test_parquet_with_string_ids_survives_prepare(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"id": [f"row-{i}" for i in range(60)], "a": rng.normal(size=60), "b": rng.normal(size=60)}
    )
    path = tmp_path / "table.parquet"
    frame.to_parquet(path)
    dataset = load_dataset(DataParams(source="parquet", path=str(path), id_column="id"))
    assert dataset.y is None and dataset.feature_names == ["a", "b"]
    splits = split_dataset(dataset, PrepareParams())
    save_splits(splits, tmp_path / "prepared", {})
    loaded = load_splits(tmp_path / "prepared")
    assert loaded.train.ids[0].startswith("row-")


def test_duplicate_ids_are_refused(tmp_path):
    frame = pd.DataFrame({"id": [1, 1, 2], "a": [1.0, 2.0, 3.0]})
    with pytest.raises(DataError, match="duplicate ids"):
        load_dataset(DataParams(source="csv", path=_csv(tmp_path, frame), id_column="id"))


def table_with_time_and_groups(path, n: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    frame["label"] = (rng.random(n) < 0.05).astype(int)
    days = pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 120, n), unit="D")
    frame["when"] = days.strftime("%Y-%m-%d")
    frame["machine"] = [f"m{k}" for k in rng.integers(0, 30, n)]
    frame.to_csv(path, index=False)
    return frame


def table_params(path, **extra) -> DataParams:
    return DataParams(
        source="csv",
        path=str(path),
        label_column="label",
        time_column="when",
        group_column="machine",
        **extra,
    )


def test_time_split_trains_on_the_past_and_tests_on_the_latest(tmp_path):
    frame = table_with_time_and_groups(tmp_path / "t.csv")
    dataset = load_dataset(table_params(tmp_path / "t.csv"))
    assert dataset.feature_names == ["a", "b", "c"]  # time and group columns are not features
    splits = split_dataset(dataset, PrepareParams(split="time", train_contamination=None))
    when = pd.to_datetime(frame["when"]).to_numpy()

    def times(split):
        return when[split.ids]

    assert times(splits.train).max() < times(splits.val).min()  # ties kept on one side
    assert times(splits.val).max() < times(splits.test).min()
    assert len(splits.test) == pytest.approx(PrepareParams().test_fraction * len(frame), rel=0.25)
    random = split_dataset(dataset, PrepareParams(train_contamination=None))
    assert np.array_equal(np.sort(random.holdout.ids), np.sort(splits.holdout.ids))


def test_group_split_keeps_every_group_in_one_split(tmp_path):
    frame = table_with_time_and_groups(tmp_path / "g.csv")
    dataset = load_dataset(table_params(tmp_path / "g.csv"))
    splits = split_dataset(dataset, PrepareParams(split="group", train_contamination=None))
    machines = frame["machine"].to_numpy()
    seen = [set(machines[split.ids]) for _, split in splits.items()]
    for i, a in enumerate(seen):
        for b in seen[i + 1 :]:
            assert not a & b, f"group(s) {a & b} in two splits"
    assert all(len(group_set) > 0 for group_set in seen)


def test_split_kinds_need_their_column(tmp_path):
    from pydantic import ValidationError

    from normalcy.config import Params

    with pytest.raises(ValidationError, match="needs data.time_column"):
        Params(prepare={"split": "time"})
    with pytest.raises(ValidationError, match="needs data.group_column"):
        Params(data={"source": "csv", "path": "x.csv"}, prepare={"split": "group"})


def test_an_unreadable_time_column_is_named(tmp_path):
    frame = table_with_time_and_groups(tmp_path / "t.csv")
    frame.loc[3, "when"] = "not a date"
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="time column 'when' cannot be read as dates"):
        load_dataset(table_params(tmp_path / "t.csv"))
    frame.loc[3, "when"] = None
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="missing or non-finite"):
        load_dataset(table_params(tmp_path / "t.csv"))
