"""Prefect's temporary API boots in the background, and only when no API is configured."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from normalcy.prefect_api import start_temporary_api_early

BOOT_AND_ASK = """
import httpx
from normalcy.prefect_api import start_temporary_api_early
from prefect.server.api.server import SubprocessASGIServer

wait = start_temporary_api_early()
wait()
server = SubprocessASGIServer()
print(server.running, httpx.get(server.api_url + "/health").status_code)
"""  # the exit handler of start_temporary_api_early stops it


def test_nothing_starts_when_an_api_is_configured(prefect_harness):
    wait = start_temporary_api_early()
    assert not [t for t in threading.enumerate() if t.name == "prefect-temporary-api"]
    wait()  # returns at once


@pytest.mark.slow
def test_without_an_api_the_temporary_server_answers_after_wait(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path)  # its own database, not the user's
    result = subprocess.run(
        [sys.executable, "-c", BOOT_AND_ASK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "200"]
    assert "Stopping temporary server" not in result.stderr  # ours stopped it, quickly


def test_stop_quickly_ends_a_server_that_ignores_sigterm():
    import time
    from types import SimpleNamespace

    from normalcy.prefect_api import STOP_GRACE_S, stop_quickly

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", stubborn])
    time.sleep(0.5)  # let it install its handler
    server = SimpleNamespace(server_process=process)
    started = time.monotonic()
    stop_quickly(server)
    assert process.returncode is not None and server.server_process is None
    assert time.monotonic() - started < STOP_GRACE_S + 5
    stop_quickly(server)  # a second stop is a no-op
