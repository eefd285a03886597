"""Request bodies -> checked rows: every refusal is a 422 (or 413) naming the field."""

from __future__ import annotations

import base64
import binascii
import reprlib
from typing import Any

import numpy as np
from fastapi import HTTPException

from normalcy.scoring import ANOMALY_MAP_NAME, InputError, InputSpec, check_rows

_NUMBER_TYPES = (int, float)  # exact types: JSON true/false (bool) is not a number here
_REQUEST_KEYS = ("records", "instances", "images")
EXPLAIN_KEY = "explain"  # optional: K, for each row's top-K features


def unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def _first_non_number(values: list) -> tuple[int, Any] | None:
    """(index, value) of the first value that is not an int or float, or None."""
    for j, value in enumerate(values):
        if type(value) not in _NUMBER_TYPES:
            return j, value
    return None


def _describe_value(value: Any) -> str:
    """Type and a short repr: a deep or huge value is cut (reprlib), never echoed whole."""
    return "null" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"


def rows_from_records(records: list, spec: InputSpec) -> np.ndarray:
    """`[{feature: value, ...}, ...]` -> rows in the model's column order; a missing feature,
    an unknown field or a value that is not a number is refused, naming it and the record."""
    names = spec.feature_names
    if not names:
        raise unprocessable(
            "this model's metadata names no features, so 'records' cannot be matched to its "
            f"input; send 'instances' (arrays of shape {list(spec.shape)} in the training order)"
        )
    allowed = set(names) | ({spec.id_column} if spec.id_column else set())
    matrix = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise unprocessable(
                f"records[{i}]: expected an object {{feature: value, ...}}, got "
                f"{type(record).__name__}"
            )
        try:
            row = [record[name] for name in names]
        except KeyError as missing:
            raise unprocessable(
                f"records[{i}]: missing feature {missing.args[0]!r}; the model expects "
                f"{spec.describe()}"
            ) from None
        if len(record) > len(names):
            unknown = [key for key in record if key not in allowed]
            if unknown:
                raise unprocessable(
                    f"records[{i}]: unknown field(s) {reprlib.repr(unknown)}; the model expects "
                    f"{spec.describe()}"
                )
        bad = _first_non_number(row)
        if bad is not None:
            raise unprocessable(
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
            raise unprocessable(
                f"instances[{i}]: {got}; the model expects one row of shape {list(spec.shape)}"
                f" ({spec.describe()})"
            )
        bad = _first_non_number(row.ravel().tolist())
        if bad is not None:
            raise unprocessable(
                f"instances[{i}]: non-numeric value ({_describe_value(bad[1])}) in "
                f"{spec.position(bad[0])}; expected a number"
            )
    raise unprocessable(  # pragma: no cover - every failure of the fast path is found above
        f"instances: expected arrays of shape {list(spec.shape)}"
    )


def rows_from_images(images: list, spec: InputSpec) -> np.ndarray:
    """Base64 PNG/JPEG/BMP/TIFF strings -> `[N, c, h, w]`, decoded and resized as the training
    images were (`normalcy.data.images.decode_image`); an image the model cannot take, or a
    string that is not base64 of an image, is refused naming its index."""
    from normalcy.data.images import decode_image
    from normalcy.data.sources import DataError

    if not spec.is_image or len(spec.shape) != 3 or spec.shape[0] not in (1, 3):
        raise unprocessable(
            f"'images' is for image models; this model takes rows of shape {list(spec.shape)} "
            f"({spec.describe()}): send 'records' or 'instances'"
        )
    channels, height, width = spec.shape
    size = (height, width) if spec.image_resize == "bilinear" else None
    X = np.empty((len(images), channels, height, width), dtype=np.float32)
    for i, encoded in enumerate(images):
        if not isinstance(encoded, str):
            got = _describe_value(encoded)
            raise unprocessable(f"images[{i}]: expected a base64 string, got {got}")
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise unprocessable(f"images[{i}]: not base64 ({exc})") from None
        try:
            image = decode_image(data, channels, size, name=f"images[{i}]")
        except DataError as exc:  # not an image file, or a corrupted one
            raise unprocessable(str(exc)) from None
        if image.shape != X.shape[1:]:
            raise unprocessable(
                f"images[{i}]: {image.shape[1]}x{image.shape[2]} pixels; this model takes "
                f"{height}x{width} images (it was not trained on an image folder, so it does not "
                "resize): resize before sending"
            )
        X[i] = image
    return X


def parse_request(payload: Any, spec: InputSpec, max_rows: int) -> tuple[np.ndarray, str, bool]:
    """(checked rows, which key they came in, whether the anomaly map is wanted) for a request
    body; raises HTTPException 422 (bad input, naming the field) or 413 (too many rows)."""
    if not isinstance(payload, dict):
        raise unprocessable(
            'the body must be a JSON object: {"records": [{feature: value, ...}, ...]} or '
            '{"instances": [[value, ...], ...]}'
        )
    given = [key for key in _REQUEST_KEYS if key in payload]
    optional = (ANOMALY_MAP_NAME, EXPLAIN_KEY)
    unknown = [key for key in payload if key not in (*_REQUEST_KEYS, *optional)]
    if len(given) != 1 or unknown:
        problem = f"got {given or 'neither'}"
        if unknown:
            problem = f"unknown field(s) {reprlib.repr(unknown)}"
        raise unprocessable(
            f"send exactly one of 'records' (a list of {{feature: value}} objects), "
            f"'instances' (a list of arrays) or 'images' (base64 image files), optionally "
            f"with '{ANOMALY_MAP_NAME}': true and '{EXPLAIN_KEY}': K; {problem}"
        )
    key = given[0]
    rows = payload[key]
    if not isinstance(rows, list) or not rows:
        raise unprocessable(f"'{key}' must be a non-empty list of rows")
    if len(rows) > max_rows:
        raise HTTPException(
            status_code=413,
            detail=f"{len(rows)} rows in one request; this service takes at most {max_rows} "
            "(--max-batch / scoring.max_request_rows): split the request",
        )
    want_map = payload.get(ANOMALY_MAP_NAME, False)
    if not isinstance(want_map, bool):
        raise unprocessable(
            f"'{ANOMALY_MAP_NAME}' must be true or false, got {reprlib.repr(want_map)}"
        )
    readers = {"records": rows_from_records, "instances": rows_from_instances}
    X = readers.get(key, rows_from_images)(rows, spec)
    try:
        return check_rows(X, spec, key), key, want_map
    except InputError as exc:
        raise unprocessable(str(exc)) from None
