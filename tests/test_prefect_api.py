"""Prefect's temporary API boots beside the imports, only when no API is configured, and stops
quickly with nothing lost."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from normalcy.prefect_api import STOP_GRACE_S, start_temporary_api_early, stop_quickly

BOOT_RUN_AND_ASK = """
import json, sys, urllib.request
from normalcy.prefect_api import start_temporary_api_early

api = start_temporary_api_early()
from prefect import flow
from prefect.settings import get_current_settings

@flow
def hello():
    return "hi"

with api():
    url = get_current_settings().api.url
    result = hello()
    with urllib.request.urlopen(url + "/health") as response:
        health = response.status
server_loaded = "prefect.server.api.server" in sys.modules
print(json.dumps({"url": url, "result": result, "health": health, "server": server_loaded}))
"""


def test_nothing_starts_when_an_api_is_configured(prefect_harness):
    from prefect.settings import get_current_settings

    harness_url = get_current_settings().api.url
    api = start_temporary_api_early()
    assert api is contextlib.nullcontext  # no server process was started
    with api():
        assert get_current_settings().api.url == harness_url  # the harness stays in charge


@pytest.mark.slow
def test_a_flow_runs_against_the_early_api_and_the_process_ends_promptly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path)  # its own database, not the user's
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", BOOT_RUN_AND_ASK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import json

    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["result"] == "hi" and answer["health"] == 200
    assert answer["url"].startswith("http://127.0.0.1:")
    assert answer["server"] is False  # this process never loaded the server app
    assert "Stopping temporary server" not in result.stderr  # Prefect never started its own
    assert time.monotonic() - started < 240


def test_stop_quickly_ends_a_server_that_ignores_sigterm():
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", stubborn])
    time.sleep(0.5)  # let it install its handler
    started = time.monotonic()
    stop_quickly(process)
    assert process.returncode is not None
    assert time.monotonic() - started < STOP_GRACE_S + 5
    stop_quickly(process)  # a second stop is a no-op


def test_a_server_that_dies_at_start_is_reported_with_its_url(tmp_path, monkeypatch):
    import normalcy.prefect_api as prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api, "_configured_api_url", lambda: None)
    monkeypatch.setattr(
        prefect_api, "_server_command", lambda port: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    api = start_temporary_api_early(timeout_s=30)
    with pytest.raises(RuntimeError, match=r"temporary Prefect API at http://127\.0\.0\.1:\d+/api"):
        with api():
            pass


BOOT_AND_WAIT = """
import sys
from normalcy.prefect_api import start_temporary_api_early

api = start_temporary_api_early()
with api():
    from prefect.settings import get_current_settings

    print(get_current_settings().api.url, flush=True)
    sys.stdin.read()
"""


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
def test_the_temporary_api_stops_when_its_process_is_killed_outright(tmp_path):
    """`kill -9` runs no exit code: the server used to stay behind, orphaned and listening."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path)
    run = subprocess.Popen(
        [sys.executable, "-c", BOOT_AND_WAIT],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = run.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and _answers(url)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
        deadline = time.monotonic() + 30
        while _answers(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _answers(url), f"the temporary API at {url} outlived its killed process"
    finally:  # the whole session: the process, and its server if it outlived it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
