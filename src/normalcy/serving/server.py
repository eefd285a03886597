"""Running the service: `serve` under uvicorn, in one process or several workers.

Several workers (`workers > 1`) are separate processes started by uvicorn, each with its own
model session, alias poll and micro-batcher, sharing the listening socket. They cannot receive
a Python object from the parent, so `serve` writes the service's settings (never the token:
only the name of its environment variable) to `CONFIG_ENV` as JSON and each worker builds its
app with `app_from_environment`. onnxruntime threads are shared out so that workers x threads
<= available CPUs (`normalcy.threads.worker_threads`), and metrics use prometheus_client's
multiprocess mode (see `metrics`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastapi import FastAPI

from normalcy.scoring import SessionSettings
from normalcy.scoring.prediction_log import PredictionLog
from normalcy.serving.app import BatchOptions, create_app
from normalcy.serving.auth import token_from_env
from normalcy.serving.limits import DEFAULT_MAX_BODY_BYTES
from normalcy.serving.metrics import MULTIPROC_ENV
from normalcy.serving.models import ModelStore
from normalcy.threads import worker_threads

log = logging.getLogger(__name__)

CONFIG_ENV = "NORMALCY_SERVE_CONFIG"


@dataclass(frozen=True)
class ServiceConfig:
    """Everything a worker needs to build the app, JSON-serialisable."""

    model_source: str
    tracking_uri: str | None = None
    max_batch: int = 10000
    reload_interval: float = 30.0
    settings: SessionSettings = field(default_factory=SessionSettings)
    prediction_log: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    batching: BatchOptions | None = None
    token_env: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServiceConfig:
        raw = json.loads(text)
        raw["settings"] = SessionSettings(**raw["settings"])
        if raw["batching"] is not None:
            raw["batching"] = BatchOptions(**raw["batching"])
        return cls(**raw)

    def build_app(self) -> FastAPI:
        log_path = self.prediction_log
        return create_app(
            self.model_source,
            tracking_uri=self.tracking_uri,
            max_batch=self.max_batch,
            reload_interval=self.reload_interval,
            settings=self.settings,
            prediction_log=None if log_path is None else PredictionLog(log_path),
            max_body_bytes=self.max_body_bytes,
            batching=self.batching,
            token=None if self.token_env is None else token_from_env(self.token_env),
        )


def app_from_environment() -> FastAPI:
    """The app of one worker, from the settings `serve` put in `CONFIG_ENV` (uvicorn factory)."""
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start workers with normalcy serve")
    return ServiceConfig.from_json(text).build_app()


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
    prediction_log: PredictionLog | str | Path | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    batching: BatchOptions | None = None,
    token_env: str | None = None,
    workers: int = 1,
) -> None:
    """Run the service under uvicorn until interrupted, in `workers` processes."""
    import uvicorn

    settings = settings or SessionSettings()
    threads = worker_threads(workers, settings.intra_op_threads)
    if token_env is not None:
        token_from_env(token_env)  # fail now, naming the variable, not in every worker
    log_path = prediction_log.path if isinstance(prediction_log, PredictionLog) else prediction_log
    config = ServiceConfig(
        model_source=str(model_source),
        tracking_uri=tracking_uri,
        max_batch=max_batch,
        reload_interval=reload_interval,
        settings=replace(settings, intra_op_threads=threads),
        prediction_log=None if log_path is None else str(log_path),
        max_body_bytes=max_body_bytes,
        batching=batching,
        token_env=token_env,
    )
    if workers == 1:
        app = config.build_app()
        model = app.state.store.current
        log.info("serving %s version %s on http://%s:%d", model.source, model.version, host, port)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    ModelStore(config.model_source, tracking_uri, config.settings, reload_interval).stop()
    metrics_dir = tempfile.mkdtemp(prefix="normalcy-metrics-")  # fresh: no stale samples
    os.environ[CONFIG_ENV] = config.to_json()
    os.environ[MULTIPROC_ENV] = metrics_dir
    log.info(
        "serving %s on http://%s:%d: %d workers x %d threads",
        model_source,
        host,
        port,
        workers,
        threads,
    )
    try:
        uvicorn.run(
            "normalcy.serving.server:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Poll `url`/health until it answers 200 (a `normalcy serve` started as `process`);
    RuntimeError with the process's stderr when it exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except OSError:  # refused while it starts (URLError is an OSError)
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
            stderr = process.communicate(timeout=30)[1] if process.stderr else ""
            raise RuntimeError(f"normalcy serve did not start at {url}: {stderr}")
        time.sleep(0.2)
