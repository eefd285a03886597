"""The OpenAPI description of the service: the /score body (built from the served model's input
spec, so /docs shows its feature names) and every error a route can answer.

The body is read and checked by the service itself (so that the size limit applies before
parsing and each refusal names the field), not by FastAPI: these schemas document it."""

from __future__ import annotations

from typing import Any

from normalcy.scoring import ANOMALY_MAP_NAME, InputSpec

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string", "description": "what is wrong, by name"}},
    "required": ["detail"],
}
ERRORS = {
    400: "malformed request framing (e.g. a Content-Length that is not a number)",
    401: "missing or wrong bearer token (only when the service runs with --token-env)",
    413: "body over --max-body-bytes, or more rows than --max-batch",
    422: "the body is not valid JSON or does not match the model: the message names the field",
    503: "the micro-batch queue is full (only with --batch-window-ms): retry after Retry-After",
}
ROUTE_ERRORS = {"/score": (400, 401, 413, 422, 503), "/metadata": (401,), "/metrics": (401,)}


def _row_schemas(spec: InputSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a record, an instance) of the served model, as JSON schemas."""
    number = {"type": "number"}
    record: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if spec.feature_names:
        record["properties"] = {name: number for name in spec.feature_names}
        record["required"] = list(spec.feature_names)
    if spec.id_column:
        record.setdefault("properties", {})[spec.id_column] = {}
    instance: dict[str, Any] = number
    for size in reversed(spec.shape):
        instance = {"type": "array", "items": instance, "minItems": size, "maxItems": size}
    return record, instance


def score_body_schema(spec: InputSpec, max_rows: int) -> dict[str, Any]:
    """JSON schema of a /score body for a model with input `spec`."""
    record, instance = _row_schemas(spec)
    rows = {"minItems": 1, "maxItems": max_rows}
    return {
        "type": "object",
        "properties": {
            "records": {"type": "array", "items": record, **rows},
            "instances": {"type": "array", "items": instance, **rows},
            "images": {
                "type": "array",
                "items": {"type": "string", "contentEncoding": "base64"},
                **rows,
                "description": "image models: PNG/JPEG/BMP/TIFF files, base64-encoded",
            },
            ANOMALY_MAP_NAME: {"type": "boolean", "description": "image models that have one"},
            "explain": {
                "type": "integer",
                "minimum": 1,
                "maximum": spec.row_size,
                "description": "each row's top-K features (models with contributions)",
            },
        },
        "oneOf": [
            {"required": ["records"]},
            {"required": ["instances"]},
            {"required": ["images"]},
        ],
        "additionalProperties": False,
    }


SCORE_DESCRIPTION = """Scores for `records`, `instances` or `images`; 422 names the field that is
wrong.

Body: `{"records": [{feature: value, ...}, ...]}`, `{"instances": [[value, ...], ...]}` or, for
image models, `{"images": ["<base64 PNG/JPEG>", ...]}` (decoded and resized as the training
images were), optionally `"anomaly_map": true` (image models that have one) and `"explain": K`
(models with per-feature contributions: adds `top1_feature, top1_contribution, ...,
topK_feature, topK_contribution`, largest contribution first; 422 when the model has none or K
is outside 1..d). A body over the size limit gets 413 before it is parsed."""

SCORE_RESPONSE_SCHEMA = {
    "type": "object",
    "description": "every graph output by name, one entry per row, and the model version",
    "properties": {
        "score": {"type": "array", "items": {"type": ["number", "null"]}},
        "is_anomaly": {"type": "array", "items": {"type": "boolean"}},
        "p_value": {"type": "array", "items": {"type": ["number", "null"]}},
        "model_version": {"type": "string"},
    },
    "required": ["score", "is_anomaly", "model_version"],
}


def score_operation() -> dict[str, Any]:
    """POST /score: the app serves it as a plain route, so it is described here in full."""
    return {
        "summary": "Score rows",
        "operationId": "score",
        "description": SCORE_DESCRIPTION,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}
            },
        },
        "responses": {
            "200": {
                "description": "one entry per row in every output, and the model version",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ScoreResponse"}}
                },
            }
        },
    }


def document(schema: dict[str, Any], spec: InputSpec, max_rows: int, auth: bool) -> None:
    """Add the /score body, the response and error schemas (and bearer auth) to `schema`."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    components["ScoreRequest"] = score_body_schema(spec, max_rows)
    components["ScoreResponse"] = SCORE_RESPONSE_SCHEMA
    schema["paths"]["/score"] = {"post": score_operation()}
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, codes in ROUTE_ERRORS.items():
        for operation in schema["paths"].get(path, {}).values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's validation error: this service sends Error
            for code in codes:
                if code != 401 or auth:
                    responses[str(code)] = {"description": ERRORS[code], "content": error_ref}
            if auth:
                operation["security"] = [{"bearer": []}]
    if auth:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
