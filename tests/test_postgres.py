"""normalcy against real servers on PostgreSQL (127.0.0.1:5432): the MLflow registry on a
PostgreSQL backend store, and a Prefect server on PostgreSQL shared by two processes. Each test
makes its own database and drops it at the end; without a reachable server they skip."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from normalcy.config import MlflowParams, PromotionParams
from normalcy.promotion import apply_promotion, decide_promotion, gather_evidence
from normalcy.registry import CHAMPION, load_champion, register_challenger, setup_tracking
from tests.test_registry import holdout_rows, weighted_scorer

pytestmark = pytest.mark.integration
SERVER = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def _admin():
    """A connection to the server's maintenance database, or a skip saying why not."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the postgres extra) is not installed")
    try:  # CREATE/DROP DATABASE cannot run in a transaction: autocommit
        return psycopg.connect(dbname="postgres", connect_timeout=3, autocommit=True, **SERVER)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL reachable at 127.0.0.1:5432 ({str(error).strip()})")


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh database's name, dropped (with its connections) at the end."""
    with fresh_database() as name:
        yield name


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create a uniquely named database; drop it (with its connections) on the way out."""
    admin = _admin()
    name = f"normalcy_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def test_registry_and_promotion_on_a_postgresql_store(database, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"postgresql://postgres@127.0.0.1:5432/{database}"
    previous = mlflow.get_tracking_uri()
    try:
        setup_tracking(MlflowParams(tracking_uri=uri, artifact_location=str(tmp_path / "art")))
        name, holdout = "normalcy-pg", holdout_rows()
        params = PromotionParams(n_bootstrap=200)
        for weights in ([1.0, 1.0, 1.0], [1.0, 0.0, 0.0]):  # mediocre, then better
            path = weighted_scorer(tmp_path / f"{uuid.uuid4().hex[:6]}.onnx", weights, 2.5)
            evidence = gather_evidence(path, holdout, name, 0.01, params, seed=0)
            with mlflow.start_run():
                registered = register_challenger(path, name, {"detector": "autoencoder"})
                decision = apply_promotion(registered, decide_promotion(evidence, params))
            assert decision.promoted, decision.reason
        client = MlflowClient()
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
        champion = load_champion(name, tmp_path / "serve")
        assert champion is not None and champion.version == "2"
        assert client.get_model_version(name, "2").tags["promotion_champion_version"] == "1"
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


def wait_until_healthy(
    server: subprocess.Popen, url: str, what: str, timeout_s: float = 120
) -> None:
    """Return once `url` answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"{what} exited with code {server.returncode}"
        assert time.monotonic() < deadline, f"{what} did not answer {url} in {timeout_s:.0f} s"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HOLD = """
import sys, time
from normalcy.flow_locks import champion_changes
with champion_changes("shared-model"):
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.mark.slow
def test_two_processes_never_change_one_champion_at_once(database, tmp_path) -> None:
    """A Prefect server on PostgreSQL, shared by two processes: while one holds the model's
    concurrency limit, the other is refused (what keeps two machines apart)."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": (
            f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
        ),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(server, f"{api}/health", "the Prefect server")
        client_env = {**env, "PREFECT_API_URL": api}
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD, "20"], env=client_env, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [sys.executable, "-c", HOLD, "0"],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0 and "ModelBusy" in second.stderr
        assert "normalcy-champion-shared-model" in second.stderr
        holder.wait(timeout=120)
        assert holder.returncode == 0
        after = subprocess.run(  # released: the next one gets it
            [sys.executable, "-c", HOLD, "0"],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert after.returncode == 0 and after.stdout.strip() == "held", after.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
