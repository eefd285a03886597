"""After a run killed half-way (a real kill -9 during registration), the next run leaves no
unfinished version with an alias, no run RUNNING, no local export naming an unfinished version;
a run that fails with an exception while holding the lock cleans up at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from normalcy import registry
from normalcy.artifact.metadata import read_onnx_metadata
from normalcy.config import load_params
from normalcy.recovery import (
    fail_dead_runs,
    is_incomplete,
    model_lock,
    process_is_gone,
    recover_interrupted,
    run_tags,
)
from tests.conftest import REPO_ROOT
from tests.test_registry import weighted_scorer

# Registers a version the way release.publish_version starts (challenger alias, tags), then
# waits to be killed before the version is marked ready.
KILLED_DURING_REGISTRATION = """
import sys, time, mlflow
from pathlib import Path
from normalcy import registry
from normalcy.config import load_params
from normalcy.recovery import run_tags
from tests.test_registry import weighted_scorer

params = load_params(sys.argv[1], sys.argv[2:])
registry.setup_tracking(params.mlflow)
onnx_path = weighted_scorer(Path(params.export.path), [1.0, 0.0, 0.0], 2.5)
with mlflow.start_run(tags=run_tags(holds_lock=True)) as run:
    registry.register_challenger(onnx_path, params.mlflow.model_name, {"detector": "x"})
    print(run.info.run_id, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store and model in tmp_path (the working folder), and its overrides."""
    monkeypatch.chdir(tmp_path)
    name = f"model-{uuid.uuid4().hex[:8]}"
    overrides = [
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={tmp_path / 'mlartifacts'}",
        f"mlflow.model_name={name}",
        f"export.path={tmp_path / 'artifacts' / 'model.onnx'}",
    ]
    (tmp_path / "artifacts").mkdir()
    previous = mlflow.get_tracking_uri()
    yield load_params(REPO_ROOT / "params.yaml", overrides), overrides
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)


def _kill_during_registration(params_overrides: list[str], tmp_path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_DURING_REGISTRATION, str(REPO_ROOT / "params.yaml")]
        + params_overrides,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    run_id = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert run_id, "the child died before registering"
    return run_id


@pytest.mark.slow
def test_the_next_run_cleans_up_after_a_kill_during_registration(store, tmp_path) -> None:
    params, overrides = store
    name = params.mlflow.model_name
    run_id = _kill_during_registration(overrides, tmp_path)
    registry.setup_tracking(params.mlflow)
    client = MlflowClient()
    # What the kill left: a version still registering, under challenger; the run RUNNING; the
    # local export naming that version.
    left = client.get_model_version(name, "1")
    assert left.tags[registry.STATUS_TAG] == registry.REGISTERING
    assert client.get_registered_model(name).aliases == {registry.CHALLENGER: 1}
    assert client.get_run(run_id).info.status == "RUNNING"
    assert process_is_gone(client.get_run(run_id).data.tags)
    export = tmp_path / "artifacts" / "model.onnx"
    assert read_onnx_metadata(export)["model_version"] == 1
    (tmp_path / "artifacts" / "summary.json").write_text(
        json.dumps({"model_name": name, "model_version": "1"})
    )

    recover_interrupted(params)

    after = client.get_model_version(name, "1")
    assert after.tags[registry.STATUS_TAG] == registry.FAILED
    assert client.get_registered_model(name).aliases == {}
    assert client.get_run(run_id).info.status == "FAILED"
    assert not export.exists() and not (tmp_path / "artifacts" / "summary.json").exists()
    with pytest.raises(ValueError, match="never finished registering"):
        from normalcy.promotion import promote_version

        promote_version(name, "1", "by hand")
    recover_interrupted(params)  # a second pass finds nothing more to do
    assert client.get_model_version(name, "1").tags[registry.STATUS_TAG] == registry.FAILED


def test_a_live_run_and_a_finished_version_are_left_alone(store, tmp_path) -> None:
    params, _ = store
    name = params.mlflow.model_name
    experiment = registry.setup_tracking(params.mlflow)
    path = weighted_scorer(tmp_path / "artifacts" / "model.onnx", [1.0, 0.0, 0.0], 2.5)
    with mlflow.start_run(tags=run_tags(holds_lock=False)) as live:
        registered = registry.register_challenger(path, name, {"detector": "x"})
        registry.tag_version(name, registered.version, {registry.STATUS_TAG: registry.READY})
        assert fail_dead_runs(experiment, lock_held=True) == []  # this very process: alive
    client = MlflowClient()
    recover_interrupted(params)
    assert client.get_run(live.info.run_id).info.status == "FINISHED"
    assert client.get_model_version(name, "1").tags[registry.STATUS_TAG] == registry.READY
    assert client.get_registered_model(name).aliases == {registry.CHALLENGER: 1}
    assert path.exists()


def test_versions_from_before_the_status_tag_count_as_finished() -> None:
    assert not is_incomplete({"data_version": "abc", "detector": "knn"})
    assert is_incomplete({}) and is_incomplete({registry.STATUS_TAG: registry.REGISTERING})


class _Interrupted(RuntimeError):
    pass


@pytest.mark.integration
def test_a_run_that_raises_under_the_lock_fails_its_version_at_once(
    prefect_harness, store, tmp_path
) -> None:
    params, _ = store
    name = params.mlflow.model_name
    registry.setup_tracking(params.mlflow)
    path = weighted_scorer(tmp_path / "artifacts" / "model.onnx", [1.0, 0.0, 0.0], 2.5)
    with pytest.raises(_Interrupted):
        with model_lock(params), mlflow.start_run(tags=run_tags(holds_lock=True)) as run:
            registry.register_challenger(path, name, {"detector": "x"})
            raise _Interrupted("the server went away after registration")
    client = MlflowClient()
    assert client.get_model_version(name, "1").tags[registry.STATUS_TAG] == registry.FAILED
    assert client.get_registered_model(name).aliases == {}
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert not path.exists()  # it named the failed version
