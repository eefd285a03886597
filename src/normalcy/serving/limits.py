"""Bounds on a request body, enforced before and while it is parsed, so that no body can cost
more memory than the limit or turn a malformed value into a server error.

- size: Content-Length is checked before a byte is read; a chunked body (no Content-Length) is
  read chunk by chunk against a running total and refused as soon as it passes the limit (413);
- numbers: an integer literal longer than `MAX_INT_DIGITS` digits is refused while parsing
  (Python would build it, then fail to make a float of it);
- nesting: the JSON parser's recursion limit becomes a 422, not a RecursionError.
NaN/Infinity literals pass the parser and are refused by `check_rows`, naming feature and row.

A body is parsed by orjson first (strict JSON, ~10x faster than the standard library on a row
of numbers; an integer beyond 64 bits becomes the float64 it would become as a feature anyway).
What orjson refuses (NaN literals, UTF-16, deep nesting, an integer too long for a float...) goes
through `json` with the checks above, so the service accepts what `json` alone would, and says
the same when it refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import HTTPException, Request

from normalcy.serving.parsing import unprocessable

# float64 holds up to ~1.8e308: an integer of 309+ digits cannot become a feature value.
MAX_INT_DIGITS = 308
DEFAULT_MAX_BODY_BYTES = 16 * 2**20


class NumberOutOfRange(ValueError):
    """An integer literal too long to be a float64."""


def too_large(size_text: str, max_bytes: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"request body of {size_text} is over this service's limit of {max_bytes} bytes "
        "(--max-body-bytes / scoring.max_request_bytes): split the request",
    )


def declared_length(request: Request) -> int | None:
    """The Content-Length header as a number, None when absent; 400 when it is not one."""
    text = request.headers.get("content-length")
    if text is None:
        return None
    if not text.strip().isdigit():
        raise HTTPException(
            status_code=400, detail=f"Content-Length {text!r} is not a whole number of bytes"
        )
    return int(text)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, at most `max_bytes` long: 413 from the header alone when it declares more, and
    413 as soon as a chunked body passes the limit (what was read is dropped)."""
    length = declared_length(request)
    if length is not None and length > max_bytes:
        raise too_large(f"{length} bytes (Content-Length)", max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large(f"more than {max_bytes} bytes (chunked)", max_bytes)
    return bytes(body)


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise NumberOutOfRange(
            f"an integer of {digits} digits ({text[:12]}...) is out of range; expected numbers "
            f"of at most {MAX_INT_DIGITS} digits (a float64 holds about ±1.8e308)"
        )
    return int(text)


def load_json(body: bytes) -> Any:
    """The parsed body; 422 for invalid JSON, an out-of-range integer or nesting deeper than
    the parser's recursion limit, each said in the message."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_int=_bounded_int)
    except NumberOutOfRange as exc:
        raise unprocessable(str(exc)) from None
    except RecursionError:
        raise unprocessable(
            'the body nests arrays or objects too deeply; expected {"records": [{...}]} or '
            '{"instances": [[...]]} (at most the depth of one input row)'
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise unprocessable(f"the body is not valid JSON ({exc})") from None
