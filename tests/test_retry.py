"""normalcy.retry against real faults: a server that starts late, a dead MLflow server, a DVC
remote that cannot be written until the fault is removed."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from normalcy.config import RetryParams, VersioningParams
from normalcy.data.versioning import snapshot_data
from normalcy.retry import RetryPolicy, call_with_retry, is_transient, mlflow_http_settings


def test_delays_double_up_to_the_cap() -> None:
    assert list(RetryPolicy(5, 1.0, 3.0).delays()) == [1.0, 2.0, 3.0, 3.0]
    assert list(RetryPolicy(1, 1.0, 3.0).delays()) == []


@pytest.mark.parametrize(
    ("attempts", "base", "cap", "message"),
    [(0, 1.0, 1.0, "attempts must be >= 1"), (2, -1.0, 1.0, "delays must be >= 0")],
)
def test_a_bad_policy_is_refused(attempts, base, cap, message) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(attempts, base, cap)


def test_params_give_the_policy_and_refuse_zero_attempts() -> None:
    assert RetryParams(attempts=2, base_delay_s=0.5).policy() == RetryPolicy(2, 0.5, 30.0)
    with pytest.raises(ValueError, match="attempts"):
        RetryParams(attempts=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"up")

    def log_message(self, *args) -> None:
        pass


def test_a_server_that_starts_late_is_reached_by_the_retry() -> None:
    """The first request is refused (nothing listens); the server starts during the backoff."""
    port = _free_port()
    servers, waits = [], []

    def start_server_during_backoff(delay: float) -> None:
        waits.append(delay)
        server = http.server.HTTPServer(("127.0.0.1", port), _Ok)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

    def fetch() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return response.read()

    try:
        late = start_server_during_backoff
        body = call_with_retry(fetch, RetryPolicy(3, 0.25), "GET", sleep=late)
    finally:
        for server in servers:
            server.shutdown()
    assert body == b"up" and waits == [0.25]


def test_a_permanent_error_is_not_retried_and_exhaustion_says_how_often() -> None:
    calls = []

    def bad_request() -> None:
        calls.append(1)
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        call_with_retry(bad_request, RetryPolicy(4, 0.0), "lookup")
    assert len(calls) == 1

    def refused() -> None:
        calls.append(1)
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(ConnectionRefusedError) as raised:
        call_with_retry(refused, RetryPolicy(3, 0.0), "push")
    assert len(calls) == 4 and "push: gave up after 3 attempts" in raised.value.__notes__


def test_a_dead_mlflow_server_is_transient_a_missing_model_is_not(monkeypatch, tmp_path) -> None:
    for key, value in mlflow_http_settings(RetryPolicy(1, 0.0)).items():
        monkeypatch.setenv(key, value)
    dead = MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(MlflowException) as refused:
        dead.search_experiments()
    assert is_transient(refused.value)
    local = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(MlflowException) as missing:
        local.get_registered_model("absent")
    assert not is_transient(missing.value)


class _UnblockOnRetry(logging.Handler):
    """Removes the fault when normalcy.retry announces a retry: the first push fails for real,
    the second finds the remote writable."""

    def __init__(self, blocker: Path) -> None:
        super().__init__()
        self.blocker, self.retries = blocker, 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.retries += 1
            self.blocker.unlink(missing_ok=True)


@pytest.mark.slow
def test_dvc_push_is_retried_until_the_remote_can_be_written(tmp_path) -> None:
    import numpy as np

    from tests.test_versioning import _git_repo

    repo = _git_repo(tmp_path / "repo")
    data = repo / "data" / "prepared"
    data.mkdir(parents=True)
    np.savez(data / "train.npz", X=np.arange(6.0).reshape(2, 3))
    blocker = tmp_path / "blocker"  # a file where the remote's parent folder must go
    blocker.write_text("not a folder")
    remote = blocker / "remote"
    policy = RetryParams(attempts=3, base_delay_s=0.1)
    params = VersioningParams(remote_name="flaky", remote_url=str(remote), retry=policy)
    handler = _UnblockOnRetry(blocker)
    logging.getLogger("normalcy.retry").addHandler(handler)
    try:
        version = snapshot_data("data/prepared", params, repo_root=repo)
    finally:
        logging.getLogger("normalcy.retry").removeHandler(handler)
    assert handler.retries == 1
    assert any(path.is_file() for path in remote.rglob("*")), "nothing reached the remote"
    assert len(version.md5) >= 32
