"""Bearer-token authentication for the service: every path but /health needs
`Authorization: Bearer <token>` (the token read from an environment variable at start, never
from a file or a flag, so it stays out of process listings and shell history).

An ASGI middleware rather than a FastAPI dependency: it also guards /docs and /openapi.json,
which FastAPI registers outside the app's routes, and costs no dependency resolution per request.
/health stays open so that load balancers and Kubernetes probes need no secret."""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

OPEN_PATHS = frozenset({"/health"})


def token_from_env(variable: str) -> str:
    """The token in environment variable `variable`; ValueError naming it when unset or empty."""
    token = os.environ.get(variable, "").strip()
    if not token:
        raise ValueError(
            f"--token-env {variable}: the environment variable {variable} is not set or empty; "
            "export the bearer token clients must send there, or drop --token-env to serve "
            "without authentication"
        )
    return token


class BearerAuth:
    """ASGI middleware: 401 with a JSON `detail` for a missing or wrong bearer token."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"detail": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="normalcy"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
