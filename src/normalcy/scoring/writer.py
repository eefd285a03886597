"""Scores written to a csv or parquet file, atomically: `score_file` reads, scores and writes
in chunks, and the output appears only when every row is scored.

Columns: the id column, then score, is_anomaly and p_value (those the graph has), then every
other per-row output (named explanations) in graph order. An output of shape `[N]` is one
column named like the output; an output of shape `[N, d]` becomes `d` columns `name[0]` ...
`name[d-1]`, and `[N, d1, d2, ...]` becomes one column per element, `name[i,j,...]` in C order.
`anomaly_map` (an image per row) is not written to tables. With `explain=K`, the columns
`top1_feature, top1_contribution, ..., topK_feature, topK_contribution` follow (see
`scoring.explanations`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from normalcy.artifact.names import ANOMALY_MAP_NAME, DECISION_NAME, SCORE_NAME
from normalcy.atomic import atomic_path
from normalcy.scoring.explanations import explained_output, feature_labels, top_features
from normalcy.scoring.inputs import InputError, input_spec
from normalcy.scoring.maps import MapWriter, check_maps_target
from normalcy.scoring.prediction_log import PredictionLog
from normalcy.scoring.readers import open_input
from normalcy.scoring.session import output_names, per_row_outputs, read_metadata, score_outputs

TABLE_OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")


def check_output_path(path: str | Path) -> Path:
    """The output file, if its extension says csv or parquet; fails before any work otherwise."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_OUTPUT_SUFFIXES:
        raise InputError(
            f"{path}: unsupported output {path.suffix!r}; expected a .csv or .parquet file name"
        )
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file name ending in .csv or .parquet")
    return path


class _TableWriter:
    """Appends frames to one csv or parquet file (the first frame fixes the columns)."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind = path, kind
        self._csv: Any = None
        self._parquet: Any = None

    def write(self, frame: pd.DataFrame) -> None:
        if self.kind == ".csv":
            header = self._csv is None
            if header:
                self._csv = open(self.path, "w", newline="")  # closed in close()
            frame.to_csv(self._csv, header=header, index=False)
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table.cast(self._parquet.schema))

    def close(self) -> None:
        for handle in (self._csv, self._parquet):
            if handle is not None:
                handle.close()


@contextlib.contextmanager
def _table_writer(path: Path) -> Iterator[Callable[[pd.DataFrame], None]]:
    """A function that appends frames to `path` (csv or parquet by extension), atomically."""
    with atomic_path(path) as tmp:
        writer = _TableWriter(tmp, ".csv" if path.suffix.lower() == ".csv" else ".parquet")
        try:
            yield writer.write
        finally:
            writer.close()


def table_columns(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row outputs as flat table columns: `[N]` as itself, `[N, d]` as `name[0]` ...
    `name[d-1]`, higher ranks as `name[i,j,...]` in C order (see the module docstring)."""
    columns: dict[str, np.ndarray] = {}
    for name, values in outputs.items():
        if values.ndim == 1:
            columns[name] = values
            continue
        flat = values.reshape(len(values), -1)
        for k, index in enumerate(np.ndindex(*values.shape[1:])):
            columns[f"{name}[{','.join(map(str, index))}]"] = flat[:, k]
    return columns


@dataclass
class ScoreFileResult:
    """What `score_file` wrote: rows, anomalies, the output file and its columns."""

    n_rows: int
    n_anomalies: int
    output: Path
    columns: list[str]
    notes: list[str]


def score_file(
    session: ort.InferenceSession,
    input_path: str | Path,
    output_path: str | Path,
    chunk_rows: int = 65536,
    progress: bool = True,
    explain: int | None = None,
    prediction_log: PredictionLog | None = None,
    model_version: str = "",
    maps: str | Path | None = None,
) -> ScoreFileResult:
    """Score a csv/parquet/npz file or an image folder into a csv/parquet file (by extension):
    the id column (the model's id column when the data has it, else the row number, or the file
    path for images), then every per-row output (see the module docstring for the columns).

    Input is read, scored and written `chunk_rows` rows at a time, so memory stays bounded;
    the output appears only when every row is scored (temp file + rename), so a bad row late in
    a big file leaves no half-written output behind. `explain=K` adds each row's top-K
    features; a model without per-feature contributions, or K outside 1..d, is refused first.
    `maps` (a folder for PNG heatmaps, or an .npz file) also writes each row's `anomaly_map`
    (see `scoring.maps`); a model without one is refused first."""
    from tqdm import tqdm

    output = check_output_path(output_path)
    metadata = read_metadata(session)
    spec = input_spec(session, metadata)
    available = output_names(session)
    explained = None if explain is None else explained_output(explain, available, spec)
    labels = feature_labels(spec)
    opened = open_input(input_path, spec, chunk_rows)
    names = per_row_outputs(available)
    if opened.id_name in names:
        raise InputError(
            f"the model has an output named {opened.id_name!r}, which is also the id column of "
            f"{opened.source}; the result table cannot hold both"
        )
    map_writer = None
    if maps is not None:
        if ANOMALY_MAP_NAME not in available:
            raise InputError(
                f"--maps: the model has no '{ANOMALY_MAP_NAME}' output (its outputs: "
                f"{available}); only detectors that localize write maps"
            )
        map_writer = MapWriter(check_maps_target(maps))
    elif ANOMALY_MAP_NAME in available:
        opened.notes.append(
            f"'{ANOMALY_MAP_NAME}' is not written to tables; write it with --maps DIR (or "
            "FILE.npz), get it from score_outputs() or from normalcy serve with "
            '"anomaly_map": true'
        )
    run_names = names + ([ANOMALY_MAP_NAME] if map_writer is not None else [])
    n_rows = n_anomalies = 0
    columns: list[str] = []
    bar = tqdm(
        total=opened.total_rows,
        unit="rows",
        desc="scoring",
        file=sys.stderr,
        disable=None if progress else True,  # None: only on a terminal
    )
    with bar, _table_writer(output) as write:
        for ids, X in opened.chunks:
            outputs = score_outputs(session, X, names=run_names)  # in runs of ROWS_PER_RUN
            if map_writer is not None:
                map_writer.add(ids, outputs.pop(ANOMALY_MAP_NAME))
            columns_of_chunk = {opened.id_name: ids, **table_columns(outputs)}
            if explained is not None:
                columns_of_chunk |= top_features(outputs[explained], labels, explain)
            frame = pd.DataFrame(columns_of_chunk)
            write(frame)
            columns = list(frame.columns)
            n_rows += len(X)
            n_anomalies += int(outputs[DECISION_NAME].sum())
            if prediction_log is not None:
                prediction_log.append(
                    model_version, outputs[SCORE_NAME], outputs[DECISION_NAME], ids
                )
            bar.update(len(X))
    if prediction_log is not None:
        prediction_log.flush()
    if map_writer is not None:
        opened.notes.append(map_writer.finish())
    columns = columns or [opened.id_name, *names]
    return ScoreFileResult(n_rows, n_anomalies, output, columns, opened.notes)
