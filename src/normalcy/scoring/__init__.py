"""Serving-side scoring of an exported model: numpy, pandas/pyarrow and onnxruntime only.

Deliberately free of torch (and of the training side of normalcy) so a scoring container or a
batch job needs nothing but the .onnx file and onnxruntime. MLflow is imported only for
`models:/NAME@ALIAS` sources (MLflow does not need torch). One module per job:

- `names`: the metadata key and the output names every graph and reader agree on;
- `session`: `load_session` with deliberate `SessionSettings`, `read_metadata`, and
  `score_outputs` (every graph output by name, in chunks) / `score_onnx` ((score, is_anomaly));
- `inputs`: `input_spec` (what one row must look like) and `check_rows` (refuses rows that do
  not match, naming the column or field);
- `readers`: `open_input` reads csv / parquet / npz / an image folder in bounded chunks;
- `writer`: `score_file` scores an input into a csv or parquet file written atomically;
- `sources`: a model file or a registry version / alias, and which MLflow store to ask;
- `describe`: what `normalcy inspect` prints about a model.
"""

from normalcy.artifact.names import (
    ANOMALY_MAP_NAME,
    DECISION_NAME,
    METADATA_KEY,
    P_VALUE_NAME,
    ROW_OUTPUTS,
    SCORE_NAME,
)
from normalcy.scoring.inputs import InputError, InputSpec, check_rows, input_spec, preview_names
from normalcy.scoring.readers import (
    FILE_ID,
    IMAGE_SUFFIXES,
    MAX_CHUNK_BYTES,
    ROW_ID,
    ScoringInput,
    chunk_rows_for,
    open_input,
)
from normalcy.scoring.session import (
    SessionSettings,
    as_session,
    file_digest,
    load_session,
    onnx_type_name,
    output_names,
    per_row_outputs,
    read_metadata,
    score_onnx,
    score_outputs,
)
from normalcy.scoring.sources import (
    ModelRef,
    ModelSourceError,
    ResolvedModel,
    alias_version,
    check_local_store,
    download_version,
    parse_model_source,
    resolve_model,
    store_uris,
    tracking_uri_for_source,
)
from normalcy.scoring.writer import (
    TABLE_OUTPUT_SUFFIXES,
    ScoreFileResult,
    check_output_path,
    score_file,
    table_columns,
)

__all__ = [
    "ANOMALY_MAP_NAME",
    "DECISION_NAME",
    "FILE_ID",
    "IMAGE_SUFFIXES",
    "MAX_CHUNK_BYTES",
    "METADATA_KEY",
    "P_VALUE_NAME",
    "ROW_ID",
    "ROW_OUTPUTS",
    "SCORE_NAME",
    "TABLE_OUTPUT_SUFFIXES",
    "InputError",
    "InputSpec",
    "ModelRef",
    "ModelSourceError",
    "ResolvedModel",
    "ScoreFileResult",
    "ScoringInput",
    "SessionSettings",
    "alias_version",
    "as_session",
    "check_local_store",
    "check_output_path",
    "check_rows",
    "chunk_rows_for",
    "download_version",
    "file_digest",
    "input_spec",
    "load_session",
    "onnx_type_name",
    "open_input",
    "output_names",
    "parse_model_source",
    "per_row_outputs",
    "preview_names",
    "read_metadata",
    "resolve_model",
    "score_file",
    "score_onnx",
    "score_outputs",
    "store_uris",
    "table_columns",
    "tracking_uri_for_source",
]
