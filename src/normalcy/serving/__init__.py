"""`normalcy serve`: an HTTP scoring service over one exported model (FastAPI + uvicorn).

Modules: `models` (the served version and the alias poll), `parsing` (bodies -> checked rows),
`responses` (one /score answer), `app` (routes, `create_app`, `serve`)."""

from normalcy.serving.app import create_app, serve
from normalcy.serving.models import LoadedModel, ModelStore, load_model
from normalcy.serving.parsing import parse_request, rows_from_instances, rows_from_records
from normalcy.serving.responses import score_request

__all__ = [
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
