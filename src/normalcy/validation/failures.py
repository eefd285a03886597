"""Great Expectations results turned into failures people can act on: which check, which
column (or image pixel), how many values, and a few examples."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

EXAMPLES = 5
# Python-side checks (GX cannot see array shapes or duplicate labels) use these names.
SHAPE_CHECK = "expect_array_shape"
IMAGE_SHAPE_CHECK = "expect_image_shape"
UNIQUE_COLUMNS_CHECK = "expect_unique_column_names"
_ORDER = {
    SHAPE_CHECK: 0,
    IMAGE_SHAPE_CHECK: 0,
    UNIQUE_COLUMNS_CHECK: 0,
    "expect_table_columns_to_match_ordered_list": 1,
    "expect_table_row_count_to_be_between": 2,
    "expect_column_values_to_be_in_type_list": 3,
    "expect_column_values_to_not_be_null": 4,
    "expect_column_values_to_be_between": 5,
}


def tabular_failure(result: Any, names: list[str], min_rows: int) -> dict:
    kind, column, info = _unpack(result)
    error = _exception_message(result)
    if error is not None:
        return make_failure(kind, column, f"could not evaluate: {error}", [])
    if kind == "expect_table_columns_to_match_ordered_list":
        return _columns_failure(info.get("observed_value") or [], names)
    if kind == "expect_table_row_count_to_be_between":
        observed = info.get("observed_value")
        return make_failure(kind, None, f"{observed} rows, need at least {min_rows}", [observed])
    if kind == "expect_column_values_to_be_in_type_list":
        return _type_failure(kind, column, info)
    count, total = info.get("unexpected_count"), info.get("element_count")
    rows = jsonable(info.get("partial_unexpected_index_list") or [])[:EXAMPLES]
    if kind == "expect_column_values_to_not_be_null":
        detail = f"{count} of {total} values are null/NaN (rows {rows})"
        return make_failure(kind, column, detail, rows)
    if kind == "expect_column_values_to_be_between":
        return _out_of_range(result, column, info, "values", f"rows {rows}")
    return _raw_failure(kind, column, info)


def image_failure(result: Any, min_rows: int, geometry: tuple[int, int, list[str]]) -> dict:
    h, w, names = geometry
    kind, column, info = _unpack(result)
    error = _exception_message(result)
    if error is not None:
        return make_failure(kind, column, f"could not evaluate: {error}", [])
    if kind == "expect_table_row_count_to_be_between":
        images = (info.get("observed_value") or 0) // (h * w)
        return make_failure(kind, None, f"{images} images, need at least {min_rows}", [images])
    if kind == "expect_column_values_to_be_in_type_list":
        return _type_failure(kind, column, info)
    channel = int(column.rsplit("_", 1)[1]) if column else 0
    indices = jsonable(info.get("partial_unexpected_index_list") or [])[:EXAMPLES]
    where = [_pixel(int(i), channel, h, w, names) for i in indices]
    count = info.get("unexpected_count")
    total = info.get("element_count")
    if kind == "expect_column_values_to_not_be_null":
        detail = f"{count} of {total} pixel values are null/NaN (at {where})"
        return make_failure(kind, column, detail, sorted({int(i) // (h * w) for i in indices}))
    if kind == "expect_column_values_to_be_between":
        return _out_of_range(result, column, info, "pixel values", f"at {where}")
    return _raw_failure(kind, column, info)


def _out_of_range(result: Any, column: str | None, info: dict, what: str, where: str) -> dict:
    """`expect_column_values_to_be_between` (tabular or image): how many of `what` fall
    outside the bounds, `where` they are, and a few of the values."""
    low, high = _bounds(result)
    count, total = info.get("unexpected_count"), info.get("element_count")
    values = jsonable(info.get("partial_unexpected_list") or [])[:EXAMPLES]
    detail = f"{count} of {total} {what} outside [{low:.6g}, {high:.6g}] ({where})"
    return make_failure("expect_column_values_to_be_between", column, detail, values)


def _raw_failure(kind: str, column: str | None, info: dict) -> dict:
    """A check without its own wording: its raw result, clipped."""
    return make_failure(kind, column, json.dumps(jsonable(info))[:300], [])


def _pixel(row: int, channel: int, h: int, w: int, names: list[str]) -> str:
    image, offset = divmod(row, h * w)
    return f"image {image} {names[channel * h * w + offset]}"


def _columns_failure(observed: list, expected: list[str]) -> dict:
    observed = [str(c) for c in observed]
    missing = [c for c in expected if c not in set(observed)]
    extra = [c for c in observed if c not in set(expected)]
    parts = []
    if missing:
        parts.append(f"missing columns {_clip(missing)}")
    if extra:
        parts.append(f"unexpected columns {_clip(extra)}")
    if not parts:
        moved = [
            f"{e!r} at position {i}, found {o!r}"
            for i, (e, o) in enumerate(zip(expected, observed, strict=False))
            if e != o
        ]
        parts.append(f"columns out of order: expected {_clip(moved)}")
    examples = (missing + extra)[:EXAMPLES] or observed[:EXAMPLES]
    return make_failure(
        "expect_table_columns_to_match_ordered_list", None, "; ".join(parts), examples
    )


def _type_failure(kind: str, column: str | None, info: dict) -> dict:
    if "observed_value" in info:  # aggregate version: the column's dtype
        observed = info["observed_value"]
        detail = f"dtype {observed}, expected a numeric dtype (int/float)"
        return make_failure(kind, column, detail, [observed])
    values = jsonable(info.get("partial_unexpected_list") or [])[:EXAMPLES]
    types = sorted({type(v).__name__ for v in info.get("partial_unexpected_list") or []})
    detail = (
        f"object column: {info.get('unexpected_count')} values of python type {types} "
        "are not numpy numbers"
    )
    return make_failure(kind, column, detail, values)


def _unpack(result: Any) -> tuple[str, str | None, dict]:
    config = result.expectation_config
    return config.type, config.kwargs.get("column"), dict(result.result or {})


def _bounds(result: Any) -> tuple[float, float]:
    kwargs = result.expectation_config.kwargs
    return float(kwargs["min_value"]), float(kwargs["max_value"])


def _exception_message(result: Any) -> str | None:
    """GX reports errors either flat or keyed by metric id; either way, return the message."""
    info = result.exception_info or {}
    if "raised_exception" in info:
        entries = [info]
    else:
        entries = [v for v in info.values() if isinstance(v, dict)]
    for entry in entries:
        if entry.get("raised_exception") or entry.get("exception_message"):
            message = str(entry.get("exception_message") or "exception")
            return message.strip().splitlines()[-1][:300] if message.strip() else "exception"
    return None


def make_failure(expectation: str, column: str | None, details: str, examples: list) -> dict:
    return {
        "expectation": expectation,
        "column": column,
        "details": details,
        "examples": jsonable(list(examples)[:EXAMPLES]),
    }


def sort_key(failure: dict, columns: list[str]) -> tuple[int, int]:
    column = failure.get("column")
    position = columns.index(column) if column in columns else -1
    return position, _ORDER.get(failure["expectation"], 9)


def _clip(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def jsonable(value: Any) -> Any:
    """Plain JSON values; NaN/inf become the strings 'nan'/'inf'/'-inf' so the JSON stays strict."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bool, int, str)):
        return value
    return str(value)
