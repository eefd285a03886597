"""MLflow 3 tracking and model registry for the ONNX scorers.

Models are registered under one name; the alias `challenger` marks the newest trained version and
`champion` the one that scoring serves. Aliases replace the deprecated stages: moving `champion`
is a single atomic update, and `models:/<name>@champion` always resolves to one version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import onnx
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo

from normalcy.artifact.metadata import read_onnx_metadata, update_metadata
from normalcy.config import MlflowParams
from normalcy.jsonio import json_default
from normalcy.retry import RetryPolicy, apply_mlflow_http_settings, call_with_retry
from normalcy.scoring import download_version
from normalcy.scoring.sources import SQLITE_PREFIX, store_uris

try:  # the limits MLflow enforces server-side; the values below are MLflow 3's
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - only if MLflow moves them
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 6000, 100

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"
INT8_ARTIFACT_DIR = "model_int8"
INT8_TAG = "int8_artifact"  # version tag: runs:/ URI of the version's INT8 twin, when it has one
REGISTER_ATTEMPTS = 3
# Version tag: "registering" from registration until the version has its card ("ready");
# "failed" when a run died in between (normalcy.recovery marks it).
STATUS_TAG = "normalcy_status"
REGISTERING, READY, FAILED = "registering", "ready", "failed"

_retry_policy = RetryPolicy()  # of this process's MLflow calls; setup_tracking sets it


def with_retry(action: Callable[[], T], what: str) -> T:
    """`action()` under the MLflow retry policy of `setup_tracking` (transient faults only)."""
    return call_with_retry(action, _retry_policy, what)


# --- tracking setup ---------------------------------------------------------------------------


def resolve_tracking_uri(params: MlflowParams, base_dir: Path | None = None) -> tuple[str, str]:
    """(tracking_uri, artifact_location) of the `mlflow` section with relative local paths made
    absolute against base_dir (default: cwd); the rule lives in `scoring.sources.store_uris`,
    so the torch-free scoring commands find the same store."""
    return store_uris(params.tracking_uri, params.artifact_location, base_dir)


def setup_tracking(params: MlflowParams, base_dir: Path | None = None) -> str:
    """Point MLflow (tracking and registry) at the configured store, create the experiment with
    its artifact location if missing, make it the active one and return its id.

    The artifact location can only be chosen when the experiment is created; without it a sqlite
    store puts artifacts in `./mlruns` of whatever folder the process runs in.
    """
    global _retry_policy
    _retry_policy = params.retry.policy()
    apply_mlflow_http_settings(_retry_policy)
    uri, artifact = resolve_tracking_uri(params, base_dir)
    if uri.startswith(SQLITE_PREFIX):
        db_path = uri[len(SQLITE_PREFIX) :].partition("?")[0]
        if db_path.startswith("/"):  # sqlite creates the file, not its folder
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()

    exp = with_retry(
        lambda: client.get_experiment_by_name(params.experiment), f"reaching MLflow at {uri}"
    )
    if exp is None:
        try:
            client.create_experiment(params.experiment, artifact_location=artifact or None)
        except MlflowException as e:  # another process created it between our two calls
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        exp = client.get_experiment_by_name(params.experiment)
        if exp is None:  # pragma: no cover - only if it was deleted again meanwhile
            raise RuntimeError(f"MLflow experiment {params.experiment!r} could not be created")
    elif exp.lifecycle_stage == "deleted":
        log.warning("experiment %r was deleted; restoring it", params.experiment)
        client.restore_experiment(exp.experiment_id)
    elif artifact and exp.artifact_location.rstrip("/") != artifact.rstrip("/"):
        log.warning(
            "experiment %r keeps its artifact location %s (config asks for %s; MLflow cannot "
            "move an existing experiment)",
            params.experiment,
            exp.artifact_location,
            artifact,
        )
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


# --- logging into the active run --------------------------------------------------------------


def _active_run_id() -> str:
    """The active run's id. Fails instead of letting MLflow start a run nobody will end."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: call this inside `with mlflow.start_run():`")
    return run.info.run_id


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VAL_LENGTH:
        text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return text


def log_params_flat(params: dict[str, Any]) -> None:
    """Log a flat dict as run params: values stringified and cut to MLflow's length limit (which
    otherwise rejects the whole batch), sent in batches of MLflow's per-request maximum."""
    _active_run_id()
    items = [(key, _param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))


def log_json(obj: Any, artifact_file: str) -> None:
    """Log `obj` as a JSON artifact of the active run (`mlflow.log_dict`), accepting numpy
    values, which plain json rejects."""
    _active_run_id()
    mlflow.log_dict(json.loads(json.dumps(obj, default=json_default)), artifact_file)


def _log_onnx(
    onnx_path: str | Path, model_name: str | None, metadata: dict | None = None
) -> ModelInfo:
    _active_run_id()
    # save_as_external_data=False: with MLflow's default, logging the same proto twice left the
    # second version's weights file missing. Loading here pulls external data into the proto.
    # Explicit pip requirements: the model needs only onnx/onnxruntime, and MLflow's inference of
    # them re-imports the model in a subprocess (~4 s per log).
    return mlflow.onnx.log_model(
        onnx.load(str(onnx_path)),
        name=MODEL_ARTIFACT_NAME,
        save_as_external_data=False,
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        registered_model_name=model_name,
        metadata=metadata,
    )


def log_onnx_model(onnx_path: str | Path, model_name: str | None = None) -> str:
    """Log the ONNX file as an MLflow model in the active run and return a URI that loads it.

    With `model_name` the model is also registered and the URI names the new version,
    `models:/<name>/<version>` (the version is its last segment). Without it the URI is MLflow
    3's logged-model URI `models:/<model_id>`; note that MLflow 3 stores logged models outside
    the run's artifacts, so `runs:/<run_id>/model` does not exist.
    """
    info = _log_onnx(onnx_path, model_name)
    if model_name is not None and info.registered_model_version is not None:
        return f"models:/{model_name}/{info.registered_model_version}"
    return info.model_uri


def download_run_artifact(run_id: str, artifact_path: str, dst_dir: str | Path) -> Path:
    """Download one artifact (file or folder) of a run into dst_dir; returns its local path."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
    )
    return Path(local)


# --- registry: challenger / champion ----------------------------------------------------------


@dataclass
class Registered:
    """A model version just registered from a run."""

    name: str
    version: str
    run_id: str
    metadata: dict = field(default_factory=dict)  # the 'normalcy' metadata of the registered file


def _last_version(client: MlflowClient, model_name: str) -> int:
    """Highest version number the registry shows for the model; 0 when it has none."""
    versions = client.search_model_versions(
        f"name = '{model_name}'", max_results=1, order_by=["version_number DESC"]
    )
    return max((int(v.version) for v in versions), default=0)


def register_challenger(
    onnx_path: str | Path,
    model_name: str,
    tags: dict[str, str],
    attempts: int = REGISTER_ATTEMPTS,
) -> Registered:
    """Log and register the ONNX model from the active run with its version number written into
    its metadata, tag the new version and point the `challenger` alias at it.

    MLflow assigns the version number only at registration, and a logged file cannot change
    afterwards. So: predict the number (last shown + 1), write it (with the model name and this
    run's id) into the metadata of a copy, log that copy, register it, and check the number
    MLflow gave. On a mismatch (another process registered meanwhile, or deleted versions hold
    numbers) the version is deleted before anything points at it and the next number is tried.
    Every registered version therefore points at a complete file whose metadata names it; a
    failure leaves no version behind. On success `onnx_path` itself gets the same metadata, so
    the local file and the registered one are the same model.
    """
    run_id = _active_run_id()
    onnx_path = Path(onnx_path)
    client = MlflowClient()
    expected = _last_version(client, model_name) + 1
    for _ in range(attempts):
        stamp = {"model_name": model_name, "model_version": expected, "mlflow_run_id": run_id}
        with tempfile.TemporaryDirectory() as tmp:
            stamped = update_metadata(onnx_path, stamp, Path(tmp) / onnx_path.name)
            metadata = read_onnx_metadata(stamped)
            info = with_retry(
                partial(_log_onnx, stamped, None, {"normalcy": metadata}),
                f"logging the ONNX model of {model_name}",
            )
        version = str(
            with_retry(
                partial(mlflow.register_model, info.model_uri, model_name),
                f"registering {model_name}",
            ).version
        )
        if version == str(expected):
            break
        log.warning(
            "%s: expected version %s, MLflow assigned %s; deleting it and retrying",
            model_name,
            expected,
            version,
        )
        client.delete_model_version(model_name, version)
        with contextlib.suppress(MlflowException):  # an orphan logged model is harmless
            client.delete_logged_model(info.model_id)
        expected = int(version) + 1
    else:
        raise RuntimeError(
            f"could not register {model_name!r} with the version number written in its "
            f"metadata after {attempts} attempts (concurrent registrations?); nothing registered"
        )
    tag_version(model_name, version, {STATUS_TAG: REGISTERING})  # first: recovery finds it
    update_metadata(onnx_path, stamp, onnx_path)
    tag_version(model_name, version, tags)
    with_retry(
        lambda: client.set_registered_model_alias(model_name, CHALLENGER, version),
        f"setting {model_name}@{CHALLENGER}",
    )
    log.info("registered %s version %s as %s (run %s)", model_name, version, CHALLENGER, run_id)
    return Registered(name=model_name, version=version, run_id=run_id, metadata=metadata)


def log_int8_twin(int8_path: str | Path, registered: Registered) -> str:
    """Log the INT8 twin of a just-registered version as an artifact of its run and tag the
    version with its URI (`int8_artifact`).

    The twin gets the float version's name, version and run id in its metadata first (it is the
    same model, quantized); the tag is set only once the file is stored, so it never points at
    nothing. `int8_path` itself gets the same metadata. Returns the `runs:/` URI."""
    if _active_run_id() != registered.run_id:
        raise RuntimeError(
            f"log the INT8 twin in the run that registered version {registered.version} "
            f"({registered.run_id})"
        )
    int8_path = Path(int8_path)
    stamp = {
        "model_name": registered.name,
        "model_version": int(registered.version),
        "mlflow_run_id": registered.run_id,
    }
    with tempfile.TemporaryDirectory() as tmp:
        stamped = update_metadata(int8_path, stamp, Path(tmp) / int8_path.name)
        mlflow.log_artifact(str(stamped), INT8_ARTIFACT_DIR)
    update_metadata(int8_path, stamp, int8_path)
    uri = f"runs:/{registered.run_id}/{INT8_ARTIFACT_DIR}/{int8_path.name}"
    tag_version(registered.name, registered.version, {INT8_TAG: uri})
    return uri


def tag_version(model_name: str, version: str, tags: dict) -> None:
    """Set a version's tags (each an idempotent call, retried on transient faults)."""
    client = MlflowClient()
    for key, value in tags.items():
        with_retry(
            lambda key=key, value=value: client.set_model_version_tag(
                model_name, str(version), key, str(value)
            ),
            f"tagging {model_name} v{version}",
        )


def describe_version(model_name: str, version: str, description: str) -> None:
    """Set a version's description (the MLflow UI renders it as markdown: the model card)."""
    with_retry(
        lambda: MlflowClient().update_model_version(
            model_name, str(version), description=description
        ),
        f"describing {model_name} v{version}",
    )


@dataclass
class Champion:
    """The served model version and its ONNX file on local disk."""

    name: str
    version: str
    run_id: str
    onnx_path: Path
    tags: dict[str, str]


def _alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """Version under `alias`, or None when the model or the alias does not exist yet."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def load_champion(model_name: str, dst_dir: str | Path) -> Champion | None:
    """Download the champion's MLflow model folder to `dst_dir/<name>/v<version>/` and return
    its ONNX file; None when there is no such model or no champion yet (a first training run).

    The whole folder is downloaded, not only the .onnx file, so that a model saved with external
    data (by other tools) still loads.
    """
    client = MlflowClient()
    version = _alias_version(client, model_name, CHAMPION)
    if version is None:
        return None
    mv = client.get_model_version(model_name, version)
    onnx_file = download_version(model_name, version, Path(dst_dir) / _safe_dirname(model_name))
    stored = read_onnx_metadata(onnx_file).get("model_version")
    if stored is not None and str(stored) != version:
        log.warning("%s v%s: the file's metadata says version %s", model_name, version, stored)
    return Champion(
        name=model_name,
        version=version,
        run_id=mv.run_id or "",
        onnx_path=onnx_file,
        tags=dict(mv.tags),
    )


def set_champion(model_name: str, version: str) -> None:
    """Point `champion` at a given version (recalibration, rollback)."""
    with_retry(
        lambda: MlflowClient().set_registered_model_alias(model_name, CHAMPION, str(version)),
        f"setting {model_name}@{CHAMPION}",
    )
