"""The production stack end to end on loopback: `mlflow server` (PostgreSQL backend store, local
artifacts destination) and `prefect server` (PostgreSQL), a `prefect worker` on a process work
pool, `normalcy deploy --pool`, training runs triggered through Prefect's REST API, the registry
checked through MLflow's REST API, `normalcy serve` following the champion across a promotion
without a failed request, and the MLflow server stopped in the middle of a run. Every server is
a subprocess on a free port; both databases are dropped at the end. Without PostgreSQL: skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from tests.conftest import REPO_ROOT
from tests.test_postgres import _free_port, fresh_database, wait_until_healthy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POOL = "normalcy-it"
MODEL = "normalcy"
CHEAP_TRAINING = [  # one fast candidate on the small built-in digits table
    "train.candidates=[knn]",
    "clean.enabled=false",
    "promotion.n_bootstrap=200",
    "export.quantize=false",
]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@contextmanager
def _process(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> Iterator:
    """A subprocess with its output in `log`; terminated (then killed) on the way out."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=out)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


class Stack:
    """URLs, environment and logs of the running stack."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.work = tmp / "work"
        self.work.mkdir()
        self.mlflow_port, self.prefect_port = _free_port(), _free_port()
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        self.prefect = f"http://127.0.0.1:{self.prefect_port}/api"
        src = str(REPO_ROOT / "src")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": self.prefect,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "DO_NOT_TRACK": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.overrides = [
            f"mlflow.tracking_uri={self.mlflow}",
            'mlflow.artifact_location=""',  # the server's proxied artifact store
            f"mlflow.model_name={MODEL}",
            *CHEAP_TRAINING,
        ]

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def mlflow_server(self, database: str) -> AbstractContextManager[subprocess.Popen]:
        command = [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
            "--artifacts-destination",
            (self.tmp / "mlflow-artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mlflow_port),
            "--workers",
            "1",
        ]
        return _process(command, self.env, self.log("mlflow"))

    def get_mlflow(self, path: str, **params) -> dict:
        response = httpx.get(f"{self.mlflow}/api/2.0/mlflow/{path}", params=params, timeout=30)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        return response.json()

    def run_training(self, extra: list[str], timeout_s: float = 300) -> dict:
        """Trigger normalcy-train/train through the Prefect API and wait for its final state."""
        return self.wait(self.trigger(extra), timeout_s)

    def trigger(self, extra: list[str]) -> str:
        deployment = httpx.get(
            f"{self.prefect}/deployments/name/normalcy-train/train", timeout=60
        ).json()
        parameters = {"overrides": [*deployment["parameters"]["overrides"], *extra]}
        response = httpx.post(
            f"{self.prefect}/deployments/{deployment['id']}/create_flow_run",
            json={"parameters": parameters},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def wait(self, flow_run_id: str, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:  # a slow answer on a loaded machine is not the run's fault
                run = httpx.get(f"{self.prefect}/flow_runs/{flow_run_id}", timeout=30).json()
            except httpx.TimeoutException:
                continue
            if run["state"]["type"] in FINAL_STATES:
                return run
            time.sleep(1)
        raise AssertionError(
            f"flow run {flow_run_id} unfinished after {timeout_s:.0f} s\n"
            + _tail(self.log("worker"))
        )


@pytest.fixture
def stack(tmp_path) -> Iterator[Stack]:
    """Databases, both servers, the work pool, the deployments and a worker."""
    stack = Stack(tmp_path)
    with ExitStack() as running:
        mlflow_db = running.enter_context(fresh_database())
        prefect_db = running.enter_context(fresh_database())
        stack.mlflow_db = mlflow_db
        mlflow = running.enter_context(stack.mlflow_server(mlflow_db))
        stack.mlflow_process = mlflow
        prefect_env = {
            **stack.env,
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}"
            ),
        }
        command = [_bin("prefect"), "server", "start", "--host", "127.0.0.1"]
        prefect = running.enter_context(
            _process(
                [*command, "--port", str(stack.prefect_port)], prefect_env, stack.log("prefect")
            )
        )
        wait_until_healthy(prefect, f"{stack.prefect}/health", "the Prefect server")
        subprocess.run(
            [_bin("prefect"), "work-pool", "create", POOL, "--type", "process"],
            env=stack.env,
            check=True,
            capture_output=True,
        )
        running.enter_context(  # polls while the deployments are made
            _process(
                [_bin("prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
                stack.env,
                stack.log("worker"),
            )
        )
        deploy = subprocess.run(
            [
                _bin("normalcy"),
                "deploy",
                "--pool",
                POOL,
                "--working-dir",
                str(stack.work),
                "--params",
                str(REPO_ROOT / "params.yaml"),
            ]
            + [arg for override in stack.overrides for arg in ("--set", override)],
            env=stack.env,
            capture_output=True,
            text=True,
            cwd=stack.work,
        )
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        wait_until_healthy(mlflow, f"{stack.mlflow}/health", "the MLflow server")
        yield stack


def champion(stack: Stack) -> dict:
    return stack.get_mlflow("registered-models/alias", name=MODEL, alias="champion")[
        "model_version"
    ]


def onnx_artifact(stack: Stack, version: str) -> onnx.ModelProto:
    """The version's ONNX file, listed and downloaded through the server's artifact proxy."""
    uri = stack.get_mlflow("model-versions/get-download-uri", name=MODEL, version=version)[
        "artifact_uri"
    ]
    assert uri.startswith("mlflow-artifacts:/"), uri
    path = uri.removeprefix("mlflow-artifacts:").lstrip("/")
    base = f"{stack.mlflow}/api/2.0/mlflow-artifacts/artifacts"
    files = httpx.get(base, params={"path": path}, timeout=30).json().get("files", [])
    onnx_files = [f["path"] for f in files if f["path"].endswith(".onnx")]
    assert onnx_files, f"no .onnx among {files}"
    content = httpx.get(f"{base}/{path}/{onnx_files[0]}", timeout=30).content
    return onnx.load_model_from_string(content)


class Scorer(threading.Thread):
    """Single-row requests in a loop: every status and every version that answered."""

    def __init__(self, url: str, row: list[float]) -> None:
        super().__init__(daemon=True)
        self.url, self.row = url, row
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.halt.is_set():
                try:
                    response = client.post("/score", json={"instances": [self.row]})
                    self.statuses.append(response.status_code)
                    self.versions.add(str(client.get("/metadata").json()["model_version"]))
                except httpx.HTTPError as error:  # counted as a failed request
                    self.statuses.append(-1)
                    self.errors.append(repr(error))
                time.sleep(0.05)


def running_mlflow_run(stack: Stack, timeout_s: float = 120) -> str:
    """The id of the first RUNNING MLflow run of the experiment, once there is one."""
    experiment = stack.get_mlflow("experiments/get-by-name", experiment_name="normalcy")
    search = {
        "experiment_ids": [experiment["experiment"]["experiment_id"]],
        "filter": "attributes.status = 'RUNNING'",
    }
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.post(f"{stack.mlflow}/api/2.0/mlflow/runs/search", json=search, timeout=30)
        runs = response.json().get("runs", [])
        if runs:
            return runs[0]["info"]["run_id"]
        time.sleep(0.2)
    raise AssertionError("the run never started its MLflow run")


def version_status(version: dict) -> str:
    return {t["key"]: t["value"] for t in version.get("tags", [])}.get("normalcy_status", "")


def test_the_stack_trains_registers_serves_and_survives_a_dead_tracking_server(stack) -> None:
    # 1-3: a training run through the work pool; the registry as MLflow's REST API shows it.
    first = stack.run_training([])
    assert first["state"]["type"] == "COMPLETED", (
        first["state"]["message"] + "\n" + _tail(stack.log("worker"))
    )
    served = champion(stack)
    assert served["version"] == "1"
    tags = {tag["key"]: tag["value"] for tag in served.get("tags", [])}
    assert re.fullmatch(r"[0-9a-f]{32}(\.dir)?", tags["data_version"]), tags
    assert version_status(served) == "ready"
    assert "# " in served["description"], "no model card as the version's description"
    graph = onnx_artifact(stack, "1")
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert '"model_version": 1' in metadata["normalcy"]

    port = _free_port()
    serve_command = [
        _bin("normalcy"),
        "serve",
        "--model",
        f"models:/{MODEL}@champion",
        "--tracking-uri",
        stack.mlflow,
        "--port",
        str(port),
        "--params",
        str(REPO_ROOT / "params.yaml"),
        "--set",
        "scoring.reload_interval_s=1",
    ]
    with _process(serve_command, stack.env, stack.log("serve")) as server:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(server, f"{url}/health", "normalcy serve")
        from sklearn.datasets import load_digits

        scorer = Scorer(url, load_digits().data[0].astype(np.float32).tolist())
        scorer.start()

        # 5: the MLflow server stops while a run is under way: it fails, naming the server.
        flow_run = stack.trigger(["mlflow.retry.attempts=2", "mlflow.retry.base_delay_s=0.2"])
        stale = running_mlflow_run(stack)
        stop(stack.mlflow_process)
        failed = stack.wait(flow_run)
        assert failed["state"]["type"] in {"FAILED", "CRASHED"}
        assert f"127.0.0.1:{stack.mlflow_port}" in failed["state"]["message"], failed["state"]

        # The tracking server comes back. 4: a second run is promoted (a tie is enough); it
        # also cleans up what the failed one left; the service switches without a failed request.
        with stack.mlflow_server(stack.mlflow_db) as restarted:
            wait_until_healthy(restarted, f"{stack.mlflow}/health", "the restarted MLflow")
            assert champion(stack)["version"] == "1"
            assert stack.get_mlflow("runs/get", run_id=stale)["run"]["info"]["status"] == (
                "RUNNING"
            )
            second = stack.run_training(["promotion.min_gain=-0.5"])
            assert second["state"]["type"] == "COMPLETED", second["state"]["message"]
            promoted = champion(stack)
            deadline = time.monotonic() + 30
            while promoted["version"] not in scorer.versions and time.monotonic() < deadline:
                time.sleep(0.5)
            scorer.halt.set()
            scorer.join(timeout=30)
            assert stack.get_mlflow("runs/get", run_id=stale)["run"]["info"]["status"] == ("FAILED")
            versions = stack.get_mlflow("model-versions/search", filter=f"name='{MODEL}'")
            for version in versions["model_versions"]:
                assert version_status(version) in {"ready", "failed"}, version
                if version_status(version) == "failed":
                    assert not version.get("aliases"), version
    assert version_status(promoted) == "ready" and promoted["version"] != "1"
    assert scorer.versions == {"1", promoted["version"]}, scorer.versions
    assert scorer.statuses and set(scorer.statuses) == {200}, (scorer.errors[:3], scorer.statuses)
