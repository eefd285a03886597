"""Boot Prefect's temporary API server while the rest of the process is still getting ready.

With no `PREFECT_API_URL`, Prefect starts a temporary API server (a uvicorn subprocess) the first
time a flow runs, and waits for it: several seconds in which this process does nothing. Starting
that same server from a background thread before the heavy imports and the params checks lets
the two overlap on a second core. Prefect's own code then finds the server already running (it is
one instance per process), so nothing else changes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def _configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def start_temporary_api_early() -> Callable[[], None]:
    """Start the temporary API in the background when no API is configured.

    Returns `wait()`, which blocks until the server answers and re-raises whatever its start
    raised; call it before the first flow. With an API configured both are no-ops."""
    if _configured_api_url():
        return lambda: None
    failure: list[BaseException] = []

    def boot() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            SubprocessASGIServer().start()
        except BaseException as exc:  # handed to wait(), the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=boot, name="prefect-temporary-api", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait
