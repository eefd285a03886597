"""`normalcy serve`: an HTTP scoring service over one exported model (FastAPI + uvicorn).

Modules: `models` (the served version and the alias poll), `limits` (body size, numbers,
nesting), `parsing` (bodies -> checked rows), `responses` (one /score answer), `batching`
(micro-batches of concurrent requests), `auth` (bearer token), `metrics` (Prometheus),
`openapi` (the documented schema), `app` (routes, `create_app`), `server` (`serve`, workers)."""

from normalcy.serving.app import BatchOptions, create_app
from normalcy.serving.models import LoadedModel, ModelStore, load_model
from normalcy.serving.parsing import parse_request, rows_from_instances, rows_from_records
from normalcy.serving.responses import score_request
from normalcy.serving.server import serve

__all__ = [
    "BatchOptions",
    "LoadedModel",
    "ModelStore",
    "create_app",
    "load_model",
    "parse_request",
    "rows_from_instances",
    "rows_from_records",
    "score_request",
    "serve",
]
