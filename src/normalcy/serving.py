"""`normalcy serve`: an HTTP scoring service over one exported model (FastAPI + uvicorn).

Like `normalcy.scoring`, it needs no torch: onnxruntime runs the graph, and MLflow is imported
only to follow a registry alias. `create_app(model_source, ...)` builds the app (tests use it
directly); `serve(...)` runs it under uvicorn.

Zero-downtime reloads: when the model source is a registry alias (`models:/NAME@ALIAS`), a
background thread looks the alias up every `reload_interval` seconds. When it has moved, the new
version is downloaded, its session built and warmed up completely, and only then is the one
reference `ModelStore.current` replaced. A request reads that reference once when it starts, so a
request in flight finishes on the session it started with, and no request ever waits for a load.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from normalcy.artifact.names import DECISION_NAME, SCORE_NAME
from normalcy.scoring import (
    ANOMALY_MAP_NAME,
    InputError,
    InputSpec,
    ModelRef,
    ModelSourceError,
    SessionSettings,
    alias_version,
    check_rows,
    download_version,
    file_digest,
    input_spec,
    load_session,
    output_names,
    parse_model_source,
    per_row_outputs,
    read_metadata,
    score_outputs,
)
from normalcy.scoring.explanations import explained_output, feature_labels, top_features
from normalcy.scoring.prediction_log import PredictionLog

log = logging.getLogger(__name__)

_NUMBER_TYPES = (int, float)  # exact types: JSON true/false (bool) is not a number here
_REQUEST_KEYS = ("records", "instances")
_EXPLAIN_KEY = "explain"  # optional: K, for each row's top-K features
_VERSION_KEY = "model_version"  # beside the outputs in every /score response


@dataclass(frozen=True)
class LoadedModel:
    """Everything a request needs from one model version, built before it is served."""

    session: ort.InferenceSession
    metadata: dict[str, Any]
    spec: InputSpec
    outputs: list[str]
    version: str
    source: str
    loaded_at: str


def load_model(
    path: Path, source: str, version: str | None, settings: SessionSettings
) -> LoadedModel:
    """Session, metadata and input spec for the file at `path`, warmed up with one row so the
    first request does not pay for onnxruntime's lazy initialisation. Without a registry
    `version`, the model is named by the registry version written into its metadata at
    registration, else by its content hash."""
    session = load_session(path, settings=settings)
    if _VERSION_KEY in output_names(session):
        raise ModelSourceError(
            f"{path}: the model has an output named {_VERSION_KEY!r}, which the service's "
            "responses use for the model version; rename that output"
        )
    metadata = read_metadata(session)
    spec = input_spec(session, metadata)
    score_outputs(session, np.zeros((1, *spec.shape), dtype=spec.dtype))
    return LoadedModel(
        session=session,
        metadata=metadata,
        spec=spec,
        outputs=output_names(session),
        version=str(version or metadata.get("model_version") or f"sha256:{file_digest(path)[:12]}"),
        source=source,
        loaded_at=_now(),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelStore:
    """The model being served (`current`), and the thread that follows a registry alias."""

    def __init__(
        self,
        model_source: str | Path,
        tracking_uri: str | None = None,
        settings: SessionSettings | None = None,
        reload_interval: float = 30.0,
    ) -> None:
        if reload_interval <= 0:
            raise ValueError(f"reload_interval must be > 0 seconds, got {reload_interval}")
        self.ref = parse_model_source(model_source)
        self.tracking_uri = tracking_uri
        self.settings = settings or SessionSettings()
        self.reload_interval = reload_interval
        self.alias_checked_at: str | None = None
        self.alias_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache = Path(tempfile.mkdtemp(prefix="normalcy-serve-"))
        try:
            if isinstance(self.ref, Path):
                if not self.ref.is_file():
                    raise FileNotFoundError(
                        f"{self.ref}: no such model file; expected an .onnx file or "
                        "models:/NAME@ALIAS"
                    )
                self.current = load_model(self.ref, str(self.ref), None, self.settings)
            else:
                self.current = self._load_version(alias_version(self.ref, tracking_uri))
        except BaseException:
            shutil.rmtree(self._cache, ignore_errors=True)
            raise

    @property
    def follows_alias(self) -> bool:
        return isinstance(self.ref, ModelRef) and self.ref.alias is not None

    def _load_version(self, version: str) -> LoadedModel:
        assert isinstance(self.ref, ModelRef)
        path = download_version(self.ref.name, version, self._cache, self.tracking_uri)
        return load_model(path, self.ref.uri, version, self.settings)

    def check_alias(self) -> bool:
        """Load and swap in the alias's version if it moved; True when it swapped.

        The new model is complete (downloaded, session built, warmed up) before the single
        assignment that publishes it; the old version's files are then removed (its session,
        still used by requests in flight, lives in memory)."""
        if not self.follows_alias:
            return False
        version = alias_version(self.ref, self.tracking_uri)  # type: ignore[arg-type]
        self.alias_checked_at = _now()
        old = self.current
        if version == old.version:
            return False
        new = self._load_version(version)
        self.current = new
        shutil.rmtree(self._cache / f"v{old.version}", ignore_errors=True)
        log.info("%s moved: now serving version %s (was %s)", new.source, version, old.version)
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.check_alias()
                self.alias_error = None
            except Exception as exc:  # keep serving the current model; say why in /health
                self.alias_error = str(exc)
                log.warning("alias check failed, still serving %s: %s", self.current.version, exc)

    def start(self) -> None:
        """Start following the alias (a no-op for a file or a pinned version)."""
        if self.follows_alias and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="alias-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the poll thread and remove downloaded files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        shutil.rmtree(self._cache, ignore_errors=True)


# --- request parsing --------------------------------------------------------------------------


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def _first_non_number(values: list) -> tuple[int, Any] | None:
    """(index, value) of the first value that is not an int or float, or None."""
    for j, value in enumerate(values):
        if type(value) not in _NUMBER_TYPES:
            return j, value
    return None


def _describe_value(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def rows_from_records(records: list, spec: InputSpec) -> np.ndarray:
    """`[{feature: value, ...}, ...]` -> rows in the model's column order; a missing feature,
    an unknown field or a value that is not a number is refused, naming it and the record."""
    names = spec.feature_names
    if not names:
        raise _unprocessable(
            "this model's metadata names no features, so 'records' cannot be matched to its "
            f"input; send 'instances' (arrays of shape {list(spec.shape)} in the training order)"
        )
    allowed = set(names) | ({spec.id_column} if spec.id_column else set())
    matrix = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise _unprocessable(
                f"records[{i}]: expected an object {{feature: value, ...}}, got "
                f"{type(record).__name__}"
            )
        try:
            row = [record[name] for name in names]
        except KeyError as missing:
            raise _unprocessable(
                f"records[{i}]: missing feature {missing.args[0]!r}; the model expects "
                f"{spec.describe()}"
            ) from None
        if len(record) > len(names):
            unknown = [key for key in record if key not in allowed]
            if unknown:
                raise _unprocessable(
                    f"records[{i}]: unknown field(s) {unknown[:10]}; the model expects "
                    f"{spec.describe()}"
                )
        bad = _first_non_number(row)
        if bad is not None:
            raise _unprocessable(
                f"records[{i}]: non-numeric value ({_describe_value(bad[1])}) in "
                f"{names[bad[0]]!r}; expected a number"
            )
        matrix.append(row)
    return np.asarray(matrix, dtype=np.float64)


def rows_from_instances(instances: list, spec: InputSpec) -> np.ndarray:
    """`[[v, ...], ...]` (nested `[c][h][w]` for images) -> an array; a row of the wrong length
    or shape, or a value that is not a number, is refused, naming the instance and position."""
    try:
        X = np.asarray(instances)
        if X.dtype.kind in "iuf" and X.shape[1:] == spec.shape:
            return X
    except ValueError:  # ragged nesting: find the instance below
        pass
    for i, instance in enumerate(instances):
        try:
            np.asarray(instance)  # raises for ragged nesting
            row = np.asarray(instance, dtype=object)  # the values as sent, for the type check
        except ValueError:
            row = None
        if row is None or row.shape != spec.shape:
            got = "ragged nested lists" if row is None else f"shape {list(row.shape)}"
            if row is not None and len(spec.shape) == 1 and row.ndim == 1:
                got = f"{row.size} values"
            raise _unprocessable(
                f"instances[{i}]: {got}; the model expects one row of shape {list(spec.shape)}"
                f" ({spec.describe()})"
            )
        bad = _first_non_number(row.ravel().tolist())
        if bad is not None:
            raise _unprocessable(
                f"instances[{i}]: non-numeric value ({_describe_value(bad[1])}) in "
                f"{spec.position(bad[0])}; expected a number"
            )
    raise _unprocessable(  # pragma: no cover - every failure of the fast path is found above
        f"instances: expected arrays of shape {list(spec.shape)}"
    )


def parse_request(payload: Any, spec: InputSpec, max_rows: int) -> tuple[np.ndarray, str, bool]:
    """(checked rows, which key they came in, whether the anomaly map is wanted) for a request
    body; raises HTTPException 422 (bad input, naming the field) or 413 (too many rows)."""
    if not isinstance(payload, dict):
        raise _unprocessable(
            'the body must be a JSON object: {"records": [{feature: value, ...}, ...]} or '
            '{"instances": [[value, ...], ...]}'
        )
    given = [key for key in _REQUEST_KEYS if key in payload]
    optional = (ANOMALY_MAP_NAME, _EXPLAIN_KEY)
    unknown = [key for key in payload if key not in (*_REQUEST_KEYS, *optional)]
    if len(given) != 1 or unknown:
        problem = f"unknown field(s) {unknown}" if unknown else f"got {given or 'neither'}"
        raise _unprocessable(
            f"send exactly one of 'records' (a list of {{feature: value}} objects) or "
            f"'instances' (a list of arrays), optionally with '{ANOMALY_MAP_NAME}': true and "
            f"'{_EXPLAIN_KEY}': K; {problem}"
        )
    key = given[0]
    rows = payload[key]
    if not isinstance(rows, list) or not rows:
        raise _unprocessable(f"'{key}' must be a non-empty list of rows")
    if len(rows) > max_rows:
        raise HTTPException(
            status_code=413,
            detail=f"{len(rows)} rows in one request; this service takes at most {max_rows} "
            "(--max-batch / scoring.max_request_rows): split the request",
        )
    want_map = payload.get(ANOMALY_MAP_NAME, False)
    if not isinstance(want_map, bool):
        raise _unprocessable(f"'{ANOMALY_MAP_NAME}' must be true or false, got {want_map!r}")
    X = rows_from_records(rows, spec) if key == "records" else rows_from_instances(rows, spec)
    try:
        return check_rows(X, spec, key), key, want_map
    except InputError as exc:
        raise _unprocessable(str(exc)) from None


def _json_values(values: np.ndarray) -> list:
    """A JSON-ready list; a non-finite float becomes null (JSON has no NaN)."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.where(np.isfinite(values), values, None)
    return values.tolist()


def score_request(
    model: LoadedModel, body: bytes, max_rows: int, prediction_log: PredictionLog | None = None
) -> dict[str, Any]:
    """The response for one POST /score body, scored by `model` (the caller's snapshot):
    every output of the graph by name, whatever it is called (score, is_anomaly, p_value and
    each named explanation), a `[N]` output as a list and an `[N, ...]` output as nested lists
    (one entry per row); `anomaly_map` only when the body asks for it; with `"explain": K`,
    `top1_feature, top1_contribution, ..., topK_contribution` (422 when the model has no
    per-feature contributions or K is outside 1..d); and `model_version`. With a
    `prediction_log`, each row's score and decision are appended to it."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unprocessable(f"the body is not valid JSON ({exc})") from None
    X, _, want_map = parse_request(payload, model.spec, max_rows)
    if want_map and ANOMALY_MAP_NAME not in model.outputs:
        raise _unprocessable(f"this model has no '{ANOMALY_MAP_NAME}' output ({model.outputs})")
    k = payload.get(_EXPLAIN_KEY)
    try:
        explained = None if k is None else explained_output(k, model.outputs, model.spec)
    except InputError as exc:
        raise _unprocessable(str(exc)) from None
    names = per_row_outputs(model.outputs) + ([ANOMALY_MAP_NAME] if want_map else [])
    outputs = score_outputs(model.session, X, names=names)  # in runs of ROWS_PER_RUN
    if prediction_log is not None:
        prediction_log.append(model.version, outputs[SCORE_NAME], outputs[DECISION_NAME])
    response = {name: _json_values(values) for name, values in outputs.items()}
    if explained is not None:
        top = top_features(outputs[explained], feature_labels(model.spec), k)
        response |= {name: _json_values(values) for name, values in top.items()}
    return {**response, _VERSION_KEY: model.version}


# --- the app ----------------------------------------------------------------------------------


def _spec_json(spec: InputSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dtype": str(spec.dtype),
        "shape": ["N", *spec.shape],
        "feature_names": list(spec.feature_names),
        "id_column": spec.id_column,
    }


def create_app(
    model_source: str | Path,
    *,
    tracking_uri: str | None = None,
    max_batch: int = 10000,
    reload_interval: float = 30.0,
    settings: SessionSettings | None = None,
    prediction_log: PredictionLog | None = None,
) -> FastAPI:
    """The scoring service for `model_source` (an .onnx path, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`). The model is loaded now, so a bad source fails before serving;
    an alias is polled every `reload_interval` seconds while the app runs. Scored rows go to
    `prediction_log` when given (flushed when the app stops)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    store = ModelStore(model_source, tracking_uri, settings, reload_interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.start()
        try:
            yield
        finally:
            store.stop()
            if prediction_log is not None:
                prediction_log.flush()

    app = FastAPI(
        title="normalcy scoring service",
        description="Anomaly scores from an exported normalcy model (onnxruntime).",
        lifespan=lifespan,
    )
    app.state.store = store

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        """Scores for `records` or `instances`; 422 names the field that is wrong.

        Body: `{"records": [{feature: value, ...}, ...]}` or `{"instances": [[value, ...],
        ...]}`, optionally `"anomaly_map": true` (image models that have one) and `"explain":
        K` (models with per-feature contributions: adds `top1_feature, top1_contribution, ...,
        topK_feature, topK_contribution`, largest contribution first; 422 when the model has
        none or K is outside 1..d)."""
        model = store.current  # one snapshot per request: a reload never changes it midway
        body = await request.body()
        answer = await run_in_threadpool(score_request, model, body, max_batch, prediction_log)
        return JSONResponse(answer)

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and what is served: version, source, alias polling state."""
        model = store.current
        return {
            "status": "ok",
            "model_version": model.version,
            "model_source": model.source,
            "loaded_at": model.loaded_at,
            "follows_alias": store.follows_alias,
            "reload_interval_s": store.reload_interval if store.follows_alias else None,
            "alias_checked_at": store.alias_checked_at,
            "alias_error": store.alias_error,
        }

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        """The served model's input spec, outputs and stored 'normalcy' metadata."""
        model = store.current
        return {
            "model_version": model.version,
            "model_source": model.source,
            "input": _spec_json(model.spec),
            "outputs": model.outputs,
            "max_batch": max_batch,
            "metadata": model.metadata,
        }

    return app


def serve(
    model_source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    tracking_uri: str | None = None,
    max_batch: int = 10000,
    reload_interval: float = 30.0,
    settings: SessionSettings | None = None,
    log_level: str = "info",
    prediction_log: PredictionLog | None = None,
) -> None:
    """Run the service under uvicorn until interrupted."""
    import uvicorn

    app = create_app(
        model_source,
        tracking_uri=tracking_uri,
        max_batch=max_batch,
        reload_interval=reload_interval,
        settings=settings,
        prediction_log=prediction_log,
    )
    model = app.state.store.current
    log.info("serving %s version %s on http://%s:%d", model.source, model.version, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
