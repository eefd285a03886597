"""Boot Prefect's temporary API server while the rest of the process is still getting ready.

With no `PREFECT_API_URL`, Prefect starts a temporary API server (a uvicorn subprocess) the first
time a flow runs, and waits for it: several seconds in which this process does nothing. Starting
that same server from a background thread before the heavy imports and the params checks lets
the two overlap on a second core. Prefect's own code then finds the server already running (it is
one instance per process), so nothing else changes."""

from __future__ import annotations

import atexit
import logging
import subprocess
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# uvicorn's graceful shutdown waits for idle keep-alive connections to close, and Prefect's stop
# waits 5 s for it before killing: 5 s added to every run. The temporary server holds nothing
# that needs a graceful end (each request committed its own transaction).
STOP_GRACE_S = 1.0


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
            server = SubprocessASGIServer()
            server.start()
        except BaseException as exc:  # handed to wait(), the caller's thread
            failure.append(exc)
            return
        atexit.register(stop_quickly, server)  # runs before Prefect's own stop (LIFO)

    thread = threading.Thread(target=boot, name="prefect-temporary-api", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait


def stop_quickly(server: Any) -> None:
    """Stop a temporary API server: first send it the logs and events still queued (Prefect's
    log handler otherwise flushes them at the very end of the exit, to a server already gone,
    and waits 5 s for nothing), then SIGTERM, `STOP_GRACE_S` to finish, then SIGKILL."""
    process = server.server_process
    if process is None:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=STOP_GRACE_S * 5)
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    server.server_process = None  # Prefect's own stop finds nothing left to do
