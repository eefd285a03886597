"""`normalcy serve`: an HTTP scoring service over one exported model (FastAPI + uvicorn).

Like `normalcy.scoring`, it needs no torch: onnxruntime runs the graph, and MLflow is imported
only to follow a registry alias. `create_app(model_source, ...)` builds the app (tests use it
directly); `serve(...)` runs it under uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from normalcy.scoring import InputSpec, SessionSettings
from normalcy.scoring.prediction_log import PredictionLog
from normalcy.serving.models import ModelStore
from normalcy.serving.responses import score_request

log = logging.getLogger(__name__)


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
