"""Data mistakes end in one message: repeated column names are refused, `check_source` catches
a missing file or column before a run starts, and Prefect's run logs leave out the traceback of
a user error (the CLI prints the message) while keeping a bug's."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from normalcy.config import DataParams
from normalcy.data.sources import (
    DataError,
    check_batch_file,
    check_source,
    load_batch,
    load_dataset,
)
from normalcy.run_logs import UserErrorTracebacks, hide_user_error_tracebacks

REPO = Path(__file__).resolve().parents[1]


def repeated_csv(tmp_path: Path) -> Path:
    path = tmp_path / "repeated.csv"
    path.write_text("id,a,b,a\n0,1.0,2.0,3.0\n1,1.5,2.5,3.5\n")
    return path


def repeated_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "repeated.parquet"
    columns = [pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array([5.0, 6.0])]
    pq.write_table(pa.Table.from_arrays(columns, ["a", "b", "b"]), path)
    return path


def test_a_repeated_csv_column_is_refused_by_name(tmp_path):
    path = repeated_csv(tmp_path)
    message = r"column name\(s\) \['a'\] appear more than once"
    with pytest.raises(DataError, match=message):
        load_dataset(DataParams(source="csv", path=str(path)))
    with pytest.raises(DataError, match=message):
        check_source(DataParams(source="csv", path=str(path)))
    with pytest.raises(DataError, match=message):
        load_batch(path, ["id", "a", "b"], [3])


def test_a_repeated_parquet_column_is_refused_by_name(tmp_path):
    path = repeated_parquet(tmp_path)
    with pytest.raises(DataError, match=r"\['b'\] appear more than once"):
        load_dataset(DataParams(source="parquet", path=str(path)))
    with pytest.raises(DataError, match=r"\['b'\] appear more than once"):
        check_batch_file(path)


def test_check_source_catches_what_needs_no_reading(tmp_path):
    table = tmp_path / "table.csv"
    pd.DataFrame({"a": [1.0, 2.0], "b": [0.0, 1.0], "y": [0, 1]}).to_csv(table, index=False)
    check_source(DataParams())  # digits: nothing to check
    check_source(DataParams(source="csv", path=str(table), label_column="y"))
    cases = [
        (dict(source="csv", path=str(tmp_path / "missing.csv")), "missing.csv: file not found"),
        (dict(source="csv", path=str(tmp_path)), "is a folder; expected a file"),
        (
            dict(source="csv", path=str(table), feature_columns=["a", "c"]),
            "missing column(s) ['c'] named in data.feature_columns; the file has ['a', 'b', 'y']",
        ),
        (
            dict(source="csv", path=str(table), label_column="label"),
            "missing column(s) ['label'] named in data.label_column/id_column",
        ),
    ]
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    cases.append((dict(source="parquet", path=str(empty)), "the file is empty"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    cases.append((dict(source="parquet", path=str(broken)), "cannot be read as parquet"))
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, features=np.zeros((3, 2)))
    cases.append((dict(source="npz", path=str(no_x)), "no array 'X' (found ['features'])"))
    for kwargs, fragment in cases:
        with pytest.raises(DataError) as info:
            check_source(DataParams(**kwargs))
        assert fragment in str(info.value), kwargs


def test_check_batch_file(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        check_batch_file(tmp_path / "batch.xlsx")
    with pytest.raises(DataError, match="batch.csv: file not found"):
        check_batch_file(tmp_path / "batch.csv")
    good = tmp_path / "good.csv"
    good.write_text("a,b\n1,2\n")
    assert check_batch_file(good) == ".csv"


def _failure_record(logger: logging.Logger, exc: BaseException) -> logging.LogRecord:
    """The record Prefect writes when a task run fails (`logger.error(..., exc_info=True)`)."""
    try:
        raise exc
    except BaseException:
        return logger.makeRecord(
            logger.name, logging.ERROR, __file__, 0, f"Task run failed with exception: {exc!r}",
            (), sys.exc_info(),
        )  # fmt: skip


def test_prefect_run_logs_drop_user_error_tracebacks_only():
    def errors() -> tuple[type[BaseException], ...]:
        return (ValueError, OSError)  # what the CLI counts as user errors, in short

    hide_user_error_tracebacks(errors)
    hide_user_error_tracebacks(errors)  # idempotent
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        filters = [f for f in logger.filters if isinstance(f, UserErrorTracebacks)]
        assert len(filters) == 1
        assert not logger.filter(_failure_record(logger, DataError("x.csv: NaN in 'a'")))
        # A plain ValueError may be a bug in a library: its traceback stays.
        assert logger.filter(_failure_record(logger, ValueError("shapes do not match")))
        assert logger.filter(_failure_record(logger, RuntimeError("bug")))
        plain = logger.makeRecord(name, logging.ERROR, __file__, 0, "Finished", (), None)
        assert logger.filter(plain)


def run_cli(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "normalcy.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["data.path=missing.csv"], "missing.csv: file not found"),
        (["data.path=table.csv", "data.label_column=labl"], "missing column(s) ['labl']"),
        (["data.path=repeated.csv"], "column name(s) ['a'] appear more than once"),
    ],
)
def test_train_reports_a_data_error_before_the_flow_in_one_line(tmp_path, sets, fragment):
    pd.DataFrame({"a": [1.0], "label": [0]}).to_csv(tmp_path / "table.csv", index=False)
    repeated_csv(tmp_path)
    overrides = [f"--set={item}" for item in ["data.source=csv", *sets]]
    result = run_cli(tmp_path, "train", *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normalcy train: error: "), lines
    assert fragment in lines[0]
    assert not (tmp_path / "artifacts").exists()  # nothing ran


@pytest.mark.slow
@pytest.mark.integration
def test_train_with_nan_in_the_data_ends_without_a_traceback(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    frame.loc[7, "b"] = np.nan
    frame.to_csv(tmp_path / "nan.csv", index=False)
    result = run_cli(
        tmp_path,
        "train",
        "--set=data.source=csv",
        "--set=data.path=nan.csv",
        "--set=versioning.enabled=false",
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("normalcy train:")]
    assert len(errors) == 1 and "NaN/inf values" in errors[0] and "['b']" in errors[0], errors
    assert "Task run failed with exception" not in result.stderr  # its record is left out
