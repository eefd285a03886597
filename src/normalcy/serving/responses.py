"""One /score body -> its JSON response: parse, score with the caller's model snapshot, log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from normalcy.artifact.names import DECISION_NAME, SCORE_NAME
from normalcy.scoring import ANOMALY_MAP_NAME, InputError, per_row_outputs, score_outputs
from normalcy.scoring.explanations import explained_output, feature_labels, top_features
from normalcy.scoring.prediction_log import PredictionLog
from normalcy.serving.limits import load_json
from normalcy.serving.models import VERSION_KEY, LoadedModel
from normalcy.serving.parsing import EXPLAIN_KEY, parse_request, unprocessable

# Arrays orjson writes itself (no Python list in between); it writes NaN/inf as null.
_ORJSON_DTYPES = frozenset(map(np.dtype, (np.float32, np.float64, np.int32, np.int64, np.bool_)))


def _json_values(values: np.ndarray) -> list:
    """A JSON-ready list; a non-finite float becomes null (JSON has no NaN)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.where(np.isfinite(values), values, None)
    return values.tolist()


def _json_ready(values: np.ndarray) -> np.ndarray | list:
    """`values` as `encode_response` can write them: the array itself when orjson can."""
    if values.dtype in _ORJSON_DTYPES and values.flags.c_contiguous:
        return values
    return _json_values(values)


def encode_response(answer: dict[str, Any]) -> bytes:
    """The JSON bytes of a /score answer (numpy arrays written directly, NaN/inf as null)."""
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass(frozen=True)
class ScoreJob:
    """A parsed, checked /score body: the rows and which outputs to return for them."""

    X: np.ndarray
    names: tuple[str, ...]
    explain_k: int | None
    explained: str | None  # the contributions output ranked for `explain`


def prepare_request(model: LoadedModel, body: bytes, max_rows: int) -> ScoreJob:
    """Parse and check one /score body against `model` (422/413 naming what is wrong)."""
    payload = load_json(body)
    try:
        X, _, want_map = parse_request(payload, model.spec, max_rows)
        k = payload.get(EXPLAIN_KEY)
        explained = None if k is None else explained_output(k, model.outputs, model.spec)
    except InputError as exc:
        raise unprocessable(str(exc)) from None
    except RecursionError:  # a deeply nested value reached a repr
        raise unprocessable("a value is nested too deeply; expected a number") from None
    if want_map and ANOMALY_MAP_NAME not in model.outputs:
        raise unprocessable(f"this model has no '{ANOMALY_MAP_NAME}' output ({model.outputs})")
    names = per_row_outputs(model.outputs) + ([ANOMALY_MAP_NAME] if want_map else [])
    return ScoreJob(X=X, names=tuple(names), explain_k=k, explained=explained)


def build_response(
    model: LoadedModel,
    job: ScoreJob,
    outputs: dict[str, np.ndarray],
    prediction_log: PredictionLog | None = None,
) -> dict[str, Any]:
    """The answer for `job` from its rows' `outputs` (numeric outputs stay arrays: write it
    with `encode_response`); logs the rows when asked."""
    if prediction_log is not None:
        prediction_log.append(model.version, outputs[SCORE_NAME], outputs[DECISION_NAME])
    response = {name: _json_ready(values) for name, values in outputs.items()}
    if job.explained is not None:
        top = top_features(outputs[job.explained], feature_labels(model.spec), job.explain_k)
        response |= {name: _json_ready(values) for name, values in top.items()}
    return {**response, VERSION_KEY: model.version}


def score_request(
    model: LoadedModel, body: bytes, max_rows: int, prediction_log: PredictionLog | None = None
) -> dict[str, Any]:
    """The response for one POST /score body, scored by `model` (the caller's snapshot):
    every output of the graph by name, whatever it is called (score, is_anomaly, p_value and
    each named explanation), a `[N]` or `[N, ...]` output as an array (one entry per row; a
    list once written by `encode_response`); `anomaly_map` only when the body asks for it;
    with `"explain": K`, `top1_feature, top1_contribution, ..., topK_contribution` (422 when
    the model has no per-feature contributions or K is outside 1..d); and `model_version`.
    With a `prediction_log`, each row's score and decision are appended to it."""
    job = prepare_request(model, body, max_rows)
    outputs = score_outputs(model.session, job.X, names=list(job.names))  # runs of ROWS_PER_RUN
    return build_response(model, job, outputs, prediction_log)
