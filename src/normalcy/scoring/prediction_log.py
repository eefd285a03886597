"""A log of what was scored: (time, model version, score, decision, optional id) per row.

Without it the realised alert rate of a deployed model is unknown, and an alert rate that drifts
from its target is the cheapest sign that something moved. Rows are buffered and appended in
batches: to one SQLite file (`.sqlite`/`.db`: one table, safe for several writer processes) or
to a folder of Parquet parts (any other path: one new file per flush, since Parquet files
cannot be appended to). Torch-free.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from normalcy.evaluation.bootstrap import wilson_interval

SQLITE_SUFFIXES = (".sqlite", ".db")
TABLE = "predictions"
COLUMNS = ("logged_at", "model_version", "score", "is_anomaly", "row_id")


def _is_sqlite(path: Path) -> bool:
    return path.suffix.lower() in SQLITE_SUFFIXES


def _append_sqlite(path: Path, frame: pd.DataFrame) -> None:
    with sqlite3.connect(path, timeout=30) as connection:
        connection.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (logged_at TEXT, model_version TEXT, "
            "score REAL, is_anomaly INTEGER, row_id TEXT)"
        )
        connection.executemany(
            f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?)",
            frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None),
        )
    connection.close()


def _append_parquet(folder: Path, frame: pd.DataFrame) -> None:
    """One new part per flush, written under a temporary name and renamed: a reader never
    sees half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    partial = folder / f".{name}.tmp"
    frame.to_parquet(partial, index=False)
    partial.rename(folder / name)


class PredictionLog:
    """Buffered appends to a prediction log; thread-safe (the service scores in a pool).

    Rows are written when `flush_rows` are buffered or `flush_seconds` have passed since the
    last write, and by `flush()` (call it on shutdown)."""

    def __init__(self, path: str | Path, flush_rows: int = 1000, flush_seconds: float = 5.0):
        if flush_rows < 1 or flush_seconds < 0:
            raise ValueError(
                f"flush_rows must be >= 1 and flush_seconds >= 0, got {flush_rows} and "
                f"{flush_seconds}"
            )
        self.path = Path(path)
        if _is_sqlite(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.exists() and not self.path.is_dir():
            raise ValueError(
                f"{self.path}: a prediction log is a .sqlite/.db file or a folder of Parquet "
                "parts; this is an existing file of another kind"
            )
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._buffer: list[pd.DataFrame] = []
        self._buffered = 0
        self._last_write = time.monotonic()
        self._lock = threading.Lock()

    def append(
        self,
        model_version: str,
        scores: np.ndarray,
        decisions: np.ndarray,
        row_ids: np.ndarray | None = None,
    ) -> None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        frame = pd.DataFrame(
            {
                "logged_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "model_version": str(model_version),
                "score": scores,
                "is_anomaly": np.asarray(decisions, dtype=bool).reshape(-1).astype(int),
                "row_id": None if row_ids is None else np.asarray(row_ids).astype(str),
            },
            columns=list(COLUMNS),
        )
        with self._lock:
            self._buffer.append(frame)
            self._buffered += len(frame)
            due = time.monotonic() - self._last_write >= self.flush_seconds
            if self._buffered >= self.flush_rows or due:
                self._write_locked()

    def flush(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        if self._buffer:
            frame = pd.concat(self._buffer, ignore_index=True)
            (_append_sqlite if _is_sqlite(self.path) else _append_parquet)(self.path, frame)
        self._buffer, self._buffered = [], 0
        self._last_write = time.monotonic()


def read_prediction_log(path: str | Path, since: str | None = None) -> pd.DataFrame:
    """The logged rows (optionally only those logged at or after `since`, an ISO time)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no prediction log here (nothing was logged yet?)")
    if _is_sqlite(path):
        with sqlite3.connect(path) as connection:
            frame = pd.read_sql_query(f"SELECT * FROM {TABLE}", connection)
        connection.close()
    else:
        parts = sorted(path.glob("part-*.parquet"))
        frames = [pd.read_parquet(part) for part in parts]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    if since is not None:
        try:
            start = pd.Timestamp(since)
        except ValueError as exc:
            raise ValueError(f"since must be an ISO time, got {since!r} ({exc})") from None
        start = start.tz_localize("UTC") if start.tzinfo is None else start
        frame = frame[pd.to_datetime(frame["logged_at"], utc=True) >= start]
    return frame.reset_index(drop=True)


@dataclass(frozen=True)
class AlertRate:
    """A model version's realised alert rate over the logged rows, with its Wilson interval."""

    model_version: str
    rows: int
    alerts: int
    rate: float
    low: float
    high: float


def realised_alert_rates(frame: pd.DataFrame, confidence: float = 0.9) -> list[AlertRate]:
    """Per model version: how many logged rows were flagged."""
    rates = []
    for version, rows in frame.groupby("model_version", sort=True):
        alerts = int(rows["is_anomaly"].astype(int).sum())
        low, high = wilson_interval(alerts, len(rows), confidence)
        rates.append(AlertRate(str(version), len(rows), alerts, alerts / len(rows), low, high))
    return rates
