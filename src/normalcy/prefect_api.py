"""Boot Prefect's temporary API server while the rest of the process is still getting ready.

With no API configured, Prefect starts a temporary API server (a uvicorn subprocess) the first
time a flow runs, and waits for it: several seconds in which this process does nothing, after it
has imported Prefect's whole server package just to start that subprocess. Here the same server
(the same uvicorn app factory, in Prefect's ephemeral mode) is started before the heavy imports,
so it boots on another core while they load, and this process never imports the server package.
The flow then runs against it as against any configured API.

At exit the queued logs and events are sent first, then the server gets `STOP_GRACE_S` to stop:
Prefect's own stop waits 5 s for uvicorn's graceful shutdown, which waits on idle keep-alive
connections, and its log handler flushes only after the server is gone (another 5 s). A process
killed outright (`kill -9`) runs no exit code: on Linux the server is then stopped by the
kernel (`_stop_with_parent`), where it used to stay behind, orphaned and listening."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

STOP_GRACE_S = 1.0
STARTUP_TIMEOUT_S = 120.0
# Prefect's temporary server runs its app in ephemeral mode, without the UI.
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


def _configured_api_url() -> str | None:
    """An API the user configured: the environment, or Prefect's settings once Prefect is
    loaded (a profile, or a test harness)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect.settings" not in sys.modules:
        return None
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _wait_until_healthy(process: subprocess.Popen, api_url: str, timeout_s: float) -> None:
    """Return once `GET /health` answers 200; a server that exits or never answers is an error
    that says which URL was tried."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the temporary Prefect API at {api_url} exited with code {process.returncode} "
                "before answering; set PREFECT_API_URL to use a running Prefect server instead"
            )
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"the temporary Prefect API at {api_url} did not answer within {timeout_s:.0f} s; set "
        "PREFECT_API_URL to use a running Prefect server instead"
    )


def stop_quickly(process: subprocess.Popen) -> None:
    """Send Prefect's queued logs and events while the server still answers, then SIGTERM,
    `STOP_GRACE_S` to finish, then SIGKILL. Safe to call twice."""
    if process.poll() is not None:
        return
    if "prefect.logging.handlers" in sys.modules:  # nothing queued when Prefect never loaded
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


def _stop_with_parent(parent: int) -> Callable[[], None] | None:
    """For the server's Popen on Linux: in the child, before it runs the server, ask the kernel
    to SIGTERM it when `parent` dies, however it dies; and exit at once if `parent` is already
    gone (it died between the fork and the request). None elsewhere (no such request)."""
    if not sys.platform.startswith("linux"):
        return None

    def request() -> None:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return request


def start_temporary_api_early(
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> Callable[[], AbstractContextManager[None]]:
    """Start the temporary API now, unless an API is configured.

    Returns `api()`: a context manager that waits until the server answers and points Prefect
    at it for its duration. With an API configured it does nothing."""
    if _configured_api_url():
        return contextlib.nullcontext
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    process = subprocess.Popen(
        _server_command(port),
        env={**os.environ, **SERVER_ENV},
        preexec_fn=_stop_with_parent(os.getpid()),  # noqa: PLW1509  run_flow calls this before the flow starts threads
    )
    atexit.register(stop_quickly, process)

    @contextlib.contextmanager
    def api() -> Iterator[None]:
        configured = _configured_api_url()  # a profile's API, seen once Prefect has loaded
        if configured:
            stop_quickly(process)
            yield
            return
        _wait_until_healthy(process, api_url, timeout_s)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield

    return api
