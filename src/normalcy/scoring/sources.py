"""Where a model comes from: a local .onnx file, or a registry version or alias in MLflow.

`resolve_model` turns `path/to/model.onnx`, `models:/NAME@ALIAS` or `models:/NAME/VERSION` into
a local file. MLflow is imported lazily, only for `models:/` sources (it needs no torch).
`store_uris` and `tracking_uri_for_source` say which MLflow store a `models:/` source is looked
up in: the one relative sqlite paths in params.yaml mean, resolved without the training side."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SQLITE_PREFIX = "sqlite:///"
LOCAL_SCHEMES = ("", "file", "sqlite")
BARE_REMOTE_URIS = ("databricks", "databricks-uc", "uc")  # tracking URIs without "://"


class ModelSourceError(ValueError):
    """A model path or registry URI that does not lead to a loadable model."""


# --- which MLflow store -----------------------------------------------------------------------


def _has_scheme(uri: str) -> bool:
    """True for `s3://...`, `file:...`; False for plain paths, including `C:\\...` on Windows."""
    return len(urlsplit(uri).scheme) > 1


def _absolute(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def store_uris(
    tracking_uri: str, artifact_location: str, base_dir: str | Path | None = None
) -> tuple[str, str]:
    """(tracking_uri, artifact_location) with relative local paths made absolute against
    `base_dir` (default: cwd), so that every process started from any folder means one store.

    `sqlite:///mlflow.db` becomes `sqlite:////<base>/mlflow.db`; a plain tracking path (file
    store) becomes absolute; an artifact folder without scheme becomes a `file://` URI. Remote
    tracking URIs (http, databricks, ...) and their artifact location are left as written, since
    relative paths there mean the server's folders, not ours.
    """
    base = Path(base_dir or Path.cwd()).expanduser().resolve()
    uri = tracking_uri
    scheme = urlsplit(uri).scheme if _has_scheme(uri) else ""
    if uri.startswith(SQLITE_PREFIX):
        rest = uri[len(SQLITE_PREFIX) :]
        path, sep, query = rest.partition("?")
        if path and path != ":memory:" and not path.startswith("/"):
            uri = f"{SQLITE_PREFIX}{_absolute(path, base).as_posix()}{sep}{query}"
    elif uri in BARE_REMOTE_URIS:
        scheme = uri
    elif not scheme:
        uri = str(_absolute(uri, base))
    artifact = artifact_location
    if scheme in LOCAL_SCHEMES and artifact and not _has_scheme(artifact):
        artifact = _absolute(artifact, base).as_uri()
    return uri, artifact


def tracking_uri_for_source(
    source: str | Path,
    flag: str | None,
    configured: str,
    params_file: str | Path = "params.yaml",
) -> str | None:
    """The MLflow store a model source is looked up in: None for a file; for `models:/...` the
    `flag` (--tracking-uri), else MLFLOW_TRACKING_URI, else `configured` (params.yaml's
    mlflow.tracking_uri) with relative local paths taken against the params file's folder."""
    if not str(source).startswith("models:/"):
        return None
    if flag:
        return flag
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return store_uris(configured, "", Path(params_file).parent)[0]


def check_local_store(tracking_uri: str | None) -> None:
    """Refuse a local sqlite store whose file does not exist: MLflow would quietly create an
    empty one there and then report that the model is not registered."""
    if not tracking_uri or not tracking_uri.startswith(SQLITE_PREFIX):
        return
    path = tracking_uri[len(SQLITE_PREFIX) :].partition("?")[0]
    if path and path != ":memory:" and not Path(path).is_file():
        raise ModelSourceError(
            f"no MLflow store at {path} ({tracking_uri}); train and register a model first, or "
            "point at the store with --tracking-uri, MLFLOW_TRACKING_URI or mlflow.tracking_uri "
            "in params.yaml"
        )


# --- model sources ----------------------------------------------------------------------------

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`, parsed."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}")


def parse_model_source(source: str | Path) -> ModelRef | Path:
    """A registry reference for `models:/...`, else a local path."""
    text = str(source)
    if not text.startswith("models:/"):
        return Path(text)
    match = _REGISTRY_URI.match(text)
    if match is None:
        raise ModelSourceError(
            f"{text}: not a registry model URI; expected models:/NAME@ALIAS (e.g. "
            "models:/normalcy@champion) or models:/NAME/VERSION"
        )
    return ModelRef(match["name"], match["alias"], match["version"])


def _mlflow_client(tracking_uri: str | None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def alias_version(ref: ModelRef, tracking_uri: str | None = None) -> str:
    """The version a registry reference points at now (the alias is looked up; a version is
    itself). Imports MLflow lazily: plain-file scoring never needs it."""
    if ref.alias is None:
        return str(ref.version)
    from mlflow.exceptions import MlflowException

    check_local_store(tracking_uri)
    try:
        return str(
            _mlflow_client(tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version
        )
    except MlflowException as exc:
        raise ModelSourceError(
            f"{ref.uri}: cannot resolve alias {ref.alias!r} of registered model {ref.name!r} "
            f"in the MLflow store {tracking_uri or '(MLflow default)'} ({exc.message}); "
            "check the name, the alias and the store (--tracking-uri, MLFLOW_TRACKING_URI or "
            "mlflow.tracking_uri in params.yaml)"
        ) from None


@dataclass(frozen=True)
class ResolvedModel:
    """A model file on local disk, with its registry version when it came from the registry."""

    path: Path
    source: str
    version: str | None = None


def resolve_model(
    source: str | Path, dst_dir: str | Path, tracking_uri: str | None = None
) -> ResolvedModel:
    """A local .onnx path as it is, or a registry model (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`) downloaded under `dst_dir/v<version>/`."""
    ref = parse_model_source(source)
    if isinstance(ref, Path):
        if not ref.is_file():
            raise ModelSourceError(
                f"{ref}: no such model file; expected an .onnx file or models:/NAME@ALIAS"
            )
        return ResolvedModel(ref, str(source))
    version = alias_version(ref, tracking_uri)
    return ResolvedModel(
        download_version(ref.name, version, dst_dir, tracking_uri), ref.uri, version
    )


def download_version(
    name: str, version: str, dst_dir: str | Path, tracking_uri: str | None = None
) -> Path:
    """Download registered model `name` version `version` into `dst_dir/v<version>/` and return
    its .onnx file (the one the MLmodel's onnx flavor names)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_local_store(tracking_uri)
    dst = Path(dst_dir) / f"v{version}"
    dst.mkdir(parents=True, exist_ok=True)
    try:
        # The version's storage location is asked of this store's client: MLflow's
        # download_artifacts("models:/...") looks the version up in the process-wide registry
        # URI whatever registry_uri it is given (MLflow 3.17), i.e. in the wrong store here.
        location = _mlflow_client(tracking_uri).get_model_version_download_uri(name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location,
                dst_path=str(dst),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
    except MlflowException as exc:
        raise ModelSourceError(
            f"models:/{name}/{version}: cannot download it from {tracking_uri} ({exc.message})"
        ) from None
    flavor = {}
    if (local / "MLmodel").is_file():
        flavor = mlflow.models.Model.load(str(local / "MLmodel")).flavors.get("onnx", {})
    onnx_file = local / flavor["data"] if "data" in flavor else None
    if onnx_file is None or not onnx_file.is_file():
        found = sorted(local.rglob("*.onnx"))
        if not found:
            raise ModelSourceError(f"models:/{name}/{version}: no .onnx file in it ({local})")
        onnx_file = found[0]
    return onnx_file
