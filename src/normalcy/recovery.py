"""Clean up after a run that died half-way, before the next one changes the same model.

A `kill -9` during registration used to leave a version without tags, its MLflow run RUNNING
forever, and `artifacts/model.onnx` naming a version the registry never finished. Three rules
undo that, run by whoever takes the model's lock next (`model_lock`), and at once when a run
fails with an exception while holding it:

- a version still tagged `normalcy_status: registering` (or with no tag at all) belongs to a run
  that died: it is tagged `failed`, and every alias on it is removed;
- an MLflow run that is RUNNING but whose process is gone is marked FAILED: a process on this host
  that no longer exists, or (since the lock is held now) a run that held the lock before;
- the local export (params `export.path`) and `artifacts/summary.json` are removed when they name
  a version the registry does not show as ready.

The lock makes this safe: while it is held no other run of the model is registering."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from normalcy import registry
from normalcy.artifact.metadata import read_onnx_metadata
from normalcy.config import Params
from normalcy.flow_locks import champion_changes
from normalcy.pipeline import artifacts
from normalcy.processes import is_gone, process_start, this_process  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, START_TAG = "normalcy.host", "normalcy.pid", "normalcy.process_start"
HOLDS_LOCK_TAG = "normalcy.holds_model_lock"  # the model whose lock the run holds


def run_tags(locked_model: str | None) -> dict[str, str]:
    """Tags of an MLflow run that say which process runs it and which model's lock it holds
    (None: none), read by `fail_dead_runs`."""
    host, pid, start = this_process()
    return {
        HOST_TAG: host,
        PID_TAG: str(pid),
        START_TAG: start,
        HOLDS_LOCK_TAG: locked_model or "",
    }


def process_is_gone(tags: dict[str, str]) -> bool:
    """True when the run's tags name a process of this host that no longer runs."""
    return is_gone(tags.get(HOST_TAG, ""), tags.get(PID_TAG, ""), tags.get(START_TAG, ""))


def fail_dead_runs(experiment_id: str, locked_model: str | None) -> list[str]:
    """Mark FAILED every RUNNING run whose process is gone, or that held the lock of
    `locked_model` (whose lock the caller holds now); the ids marked."""
    client = MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    failed = []
    for run in running:
        tags = run.data.tags
        held_lock_before = bool(locked_model) and tags.get(HOLDS_LOCK_TAG) == locked_model
        if run.info.run_id == _active_run_id() or not (held_lock_before or process_is_gone(tags)):
            continue
        client.set_tag(run.info.run_id, "normalcy.failure", "its process died; found at restart")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        log.warning("MLflow run %s was left RUNNING by a dead process: FAILED", run.info.run_id)
        failed.append(run.info.run_id)
    return failed


def _active_run_id() -> str | None:
    import mlflow

    run = mlflow.active_run()
    return None if run is None else run.info.run_id


def is_incomplete(tags: dict[str, str]) -> bool:
    """Registered but never finished: still `registering`, or killed before its first tag."""
    return tags.get(registry.STATUS_TAG) == registry.REGISTERING or not tags


def fail_incomplete_versions(model_name: str) -> list[str]:
    """Tag `failed` every unfinished version of the model and remove its aliases."""
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{model_name}'")
    failed = [v for v in versions if is_incomplete(dict(v.tags))]
    if not failed:
        return []
    aliases = client.get_registered_model(model_name).aliases
    for version in failed:
        number = str(version.version)
        for alias in [a for a, v in aliases.items() if str(v) == number]:
            client.delete_registered_model_alias(model_name, alias)
            log.warning("%s@%s pointed at unfinished v%s: removed", model_name, alias, number)
        registry.tag_version(
            model_name,
            number,
            {
                registry.STATUS_TAG: registry.FAILED,
                "normalcy_failure": "registration never "
                "finished (its run died); found by the next run",
            },
        )
        log.warning("%s v%s was left half-registered: tagged failed", model_name, number)
    return [str(v.version) for v in failed]


def ready_versions(model_name: str) -> set[str]:
    """The versions of the model that are not failed or unfinished."""
    versions = MlflowClient().search_model_versions(f"name = '{model_name}'")
    bad = (registry.FAILED, registry.REGISTERING)
    return {
        str(v.version) for v in versions if v.tags and v.tags.get(registry.STATUS_TAG) not in bad
    }


def remove_stale_local_outputs(model_name: str, export_path: str | Path) -> list[Path]:
    """Remove the local export and summary when either names a version of this model that the
    registry does not show as ready; the paths removed."""
    ready = ready_versions(model_name)
    named = {}
    export_path = Path(export_path)
    if export_path.exists():
        meta = read_onnx_metadata(export_path)
        if meta.get("model_name") == model_name and meta.get("model_version") is not None:
            named[export_path] = str(meta["model_version"])
    if artifacts.SUMMARY.exists():
        summary = json.loads(artifacts.SUMMARY.read_text())
        if summary.get("model_name") == model_name and summary.get("model_version"):
            named[artifacts.SUMMARY] = str(summary["model_version"])
    stale = [path for path, version in named.items() if version not in ready]
    if stale:
        for path in (export_path, artifacts.SUMMARY):  # the pair, so neither contradicts
            path.unlink(missing_ok=True)
        log.warning("removed %s: they named a version that never finished", stale)
    return stale


def recover_interrupted(params: Params) -> None:
    """All three rules for the model of `params` (call with its lock held, tracking set up)."""
    name = params.mlflow.model_name
    experiment = registry.with_retry(
        lambda: MlflowClient().get_experiment_by_name(params.mlflow.experiment),
        "reading the MLflow experiment",
    )
    if experiment is not None:
        fail_dead_runs(experiment.experiment_id, locked_model=name)
    fail_incomplete_versions(name)
    remove_stale_local_outputs(name, params.export.path)


@contextmanager
def model_lock(params: Params) -> Iterator[None]:
    """The model's champion lock (flow_locks), with the recovery rules run on taking it and,
    when the block raises, once more before the error goes on (best effort: the server that
    failed the run may fail this too; the next run then recovers)."""
    with champion_changes(params.mlflow.model_name):
        recover_interrupted(params)
        try:
            yield
        except BaseException:
            started = time.monotonic()
            try:
                fail_incomplete_versions(params.mlflow.model_name)
                remove_stale_local_outputs(params.mlflow.model_name, params.export.path)
            except Exception as error:  # the original error matters more
                log.warning(
                    "could not clean up after the failed run (%.0f s): %s; the next run will",
                    time.monotonic() - started,
                    error,
                )
            raise
