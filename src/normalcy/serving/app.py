"""`normalcy serve`: an HTTP scoring service over one exported model (FastAPI + uvicorn).

Like `normalcy.scoring`, it needs no torch: onnxruntime runs the graph, and MLflow is imported
only to follow a registry alias. `create_app(model_source, ...)` builds the app (tests use it
directly); `normalcy.serving.server.serve(...)` runs it under uvicorn, in one or more workers.

A /score request: the body is read under the size limit (`limits`), parsed and checked against
the model snapshot taken when the request started (`responses`, `parsing`), scored alone or in a
micro-batch with concurrent requests (`batching`), and answered; `auth` and `metrics` wrap the
app as ASGI middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from normalcy.scoring import InputSpec, SessionSettings
from normalcy.scoring.prediction_log import PredictionLog
from normalcy.serving.auth import BearerAuth
from normalcy.serving.batching import MicroBatcher
from normalcy.serving.limits import DEFAULT_MAX_BODY_BYTES, read_body
from normalcy.serving.metrics import CONTENT_TYPE, MetricsMiddleware, ServiceMetrics
from normalcy.serving.models import ModelStore
from normalcy.serving.openapi import document
from normalcy.serving.responses import (
    build_response,
    encode_response,
    prepare_request,
    score_request,
)

log = logging.getLogger(__name__)

# A body up to this size is parsed and scored on the event loop: a thread hand-off costs more
# than the work (a single row parses in tens of microseconds). Larger bodies go to a thread so
# that they never stall the other connections.
INLINE_BODY_BYTES = 64 * 2**10


@dataclass(frozen=True)
class BatchOptions:
    """Micro-batching: wait up to `window_ms` for concurrent requests, score at most `max_rows`
    rows per onnxruntime call, refuse (503) past `queue` waiting requests."""

    window_ms: float = 2.0
    max_rows: int = 256
    queue: int = 1024


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batching: BatchOptions | None = None,
    token: str | None = None,
) -> FastAPI:
    """The scoring service for `model_source` (an .onnx path, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`). The model is loaded now, so a bad source fails before serving;
    an alias is polled every `reload_interval` seconds while the app runs. Scored rows go to
    `prediction_log` when given (flushed when the app stops). Bodies over `max_body_bytes` get
    413 before they are parsed; `batching` turns on micro-batching; with `token`, every path
    but /health needs `Authorization: Bearer <token>`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if token is not None and not token.strip():
        raise ValueError("token must not be empty: pass None to serve without authentication")
    store = ModelStore(model_source, tracking_uri, settings, reload_interval)
    metrics = ServiceMetrics()
    batcher: MicroBatcher | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher
        store.start()
        if batching is not None:
            batcher = MicroBatcher(
                batching.window_ms / 1e3, batching.max_rows, batching.queue, metrics
            )
            batcher.start()
        try:
            yield
        finally:
            if batcher is not None:
                await batcher.stop()
            store.stop()
            if prediction_log is not None:
                prediction_log.flush()

    app = FastAPI(
        title="normalcy scoring service",
        description="Anomaly scores from an exported normalcy model (onnxruntime).",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks look the providers up on every request (~30 us, a
        # sixth of a one-row request) even when none is configured; /metrics is ours.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.store = store
    app.state.metrics = metrics

    async def score(request: Request) -> Response:
        """POST /score (documented in `openapi`). A plain Starlette route: FastAPI's dependency
        resolution and response serialisation would cost more than the scoring of one row."""
        model = store.current  # one snapshot per request: a reload never changes it midway
        body = await read_body(request, max_body_bytes)
        inline = len(body) <= INLINE_BODY_BYTES
        if batcher is None:
            args = (model, body, max_batch, prediction_log)
            answer = (
                score_request(*args) if inline else await run_in_threadpool(score_request, *args)
            )
        else:
            job = (
                prepare_request(model, body, max_batch)
                if inline
                else await run_in_threadpool(prepare_request, model, body, max_batch)
            )
            outputs = await batcher.score(model, job.X, job.names)
            answer = build_response(model, job, outputs, prediction_log)
        metrics.rows.inc(len(answer["score"]))
        return Response(encode_response(answer), media_type="application/json")

    app.router.routes.insert(0, Route("/score", score, methods=["POST"]))  # matched first

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what is served: version, source, alias polling state (no token needed)."""
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
    async def metadata() -> dict[str, Any]:
        """The served model's input spec, outputs and stored 'normalcy' metadata."""
        model = store.current
        return {
            "model_version": model.version,
            "model_source": model.source,
            "input": _spec_json(model.spec),
            "outputs": model.outputs,
            "max_batch": max_batch,
            "max_body_bytes": max_body_bytes,
            "metadata": model.metadata,
        }

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Request counts, latency histograms and batch sizes, in Prometheus' text format."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    schemas: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        """The schema for the version served now (its feature names), rebuilt after a reload."""
        model = store.current
        if schemas.get("version") != model.version:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            document(schema, model.spec, max_batch, auth=token is not None)
            schemas.update(version=model.version, schema=schema)
        return schemas["schema"]

    app.openapi = openapi  # type: ignore[method-assign]
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: 401s are counted too
    return app
