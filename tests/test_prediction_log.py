"""The prediction log: batched appends to SQLite or Parquet parts, read back, alert rates."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from normalcy.scoring.prediction_log import (
    PredictionLog,
    read_prediction_log,
    realised_alert_rates,
)


@pytest.mark.parametrize("name", ["log.sqlite", "log_parts"])
def test_rows_are_buffered_then_written_and_read_back(tmp_path, name):
    path = tmp_path / name
    log = PredictionLog(path, flush_rows=5, flush_seconds=3600)
    log.append("3", np.array([0.1, 2.0, 0.3]), np.array([False, True, False]), np.array([7, 8, 9]))
    assert not path.exists() or read_prediction_log(path).empty  # 3 < 5 rows: still buffered
    log.append("3", np.array([0.2, 0.4]), np.array([False, False]))
    frame = read_prediction_log(path)  # 5 rows: written
    assert list(frame["score"]) == pytest.approx([0.1, 2.0, 0.3, 0.2, 0.4])
    assert list(frame["is_anomaly"]) == [0, 1, 0, 0, 0]
    assert list(frame["row_id"][:3]) == ["7", "8", "9"] and frame["row_id"][3:].isna().all()
    log.append("4", np.array([5.0]), np.array([True]))
    log.flush()
    rates = {r.model_version: r for r in realised_alert_rates(read_prediction_log(path))}
    assert (rates["3"].rows, rates["3"].alerts, rates["3"].rate) == (5, 1, 0.2)
    assert rates["3"].low < 0.2 < rates["3"].high
    assert (rates["4"].rows, rates["4"].alerts) == (1, 1)


def test_since_keeps_only_later_rows_and_refuses_a_bad_time(tmp_path):
    log = PredictionLog(tmp_path / "log.db", flush_rows=1)
    log.append("1", np.array([1.0]), np.array([False]))
    assert len(read_prediction_log(tmp_path / "log.db", since="2000-01-01")) == 1
    assert read_prediction_log(tmp_path / "log.db", since="2999-01-01").empty
    with pytest.raises(ValueError, match="ISO time"):
        read_prediction_log(tmp_path / "log.db", since="yesterday-ish")


def test_concurrent_appends_lose_no_row(tmp_path):
    log = PredictionLog(tmp_path / "log.sqlite", flush_rows=7, flush_seconds=3600)

    def work():
        for _ in range(50):
            log.append("1", np.arange(3.0), np.array([True, False, False]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.flush()
    frame = read_prediction_log(tmp_path / "log.sqlite")
    assert len(frame) == 4 * 50 * 3 and int(frame["is_anomaly"].sum()) == 4 * 50


def test_bad_paths_and_settings_are_refused(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(ValueError, match="existing file of another kind"):
        PredictionLog(tmp_path / "plain.txt")
    with pytest.raises(ValueError, match="flush_rows"):
        PredictionLog(tmp_path / "log.db", flush_rows=0)
    with pytest.raises(FileNotFoundError, match="no prediction log"):
        read_prediction_log(tmp_path / "missing.db")
