"""Request, latency and batch metrics in Prometheus' text format, served at GET /metrics.

One worker: the metrics live in a registry of this app. Several workers (`--workers N`): each
process writes its samples to files in `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's
multiprocess mode, set by `serve` before the workers start) and /metrics, answered by whichever
worker gets the request, sums every worker's files, so a scrape sees the whole host. Counters
and histograms aggregate this way; no gauge is exported (a per-process gauge has no meaningful
sum)."""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KNOWN_PATHS = frozenset({"/score", "/health", "/metadata", "/metrics", "/docs", "/openapi.json"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


class ServiceMetrics:
    """The service's counters and histograms, and their exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.requests = Counter(
            "normalcy_http_requests",
            "HTTP requests answered, by path and status code",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "normalcy_http_request_duration_seconds",
            "Time from a request's start to its response's last byte",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter("normalcy_scored_rows", "Rows scored by /score", registry=self.registry)
        self.batch_rows = Histogram(
            "normalcy_batch_rows",
            "Rows per onnxruntime call of the micro-batcher",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The text format: this process's registry, or every worker's in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)


class MetricsMiddleware:
    """ASGI middleware: counts each HTTP response by path and status and times it (unknown
    paths are one label, `other`, so a scan cannot grow the label set)."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        started = time.perf_counter()
        status = 500  # if the app fails before it starts a response

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)
