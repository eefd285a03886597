"""The model a service holds: one loaded version, and the thread that follows a registry alias.

Zero-downtime reloads: when the model source is a registry alias (`models:/NAME@ALIAS`), a
background thread looks the alias up every `reload_interval` seconds. When it has moved, the new
version is downloaded, its session built and warmed up completely, and only then is the one
reference `ModelStore.current` replaced. A request reads that reference once when it starts, so a
request in flight finishes on the session it started with, and no request ever waits for a load.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from normalcy.scoring import (
    InputSpec,
    ModelRef,
    ModelSourceError,
    SessionSettings,
    alias_version,
    download_version,
    file_digest,
    input_spec,
    load_session,
    output_names,
    parse_model_source,
    read_metadata,
    score_outputs,
)

log = logging.getLogger(__name__)

VERSION_KEY = "model_version"  # beside the outputs in every /score response


@dataclass(frozen=True)
class LoadedModel:
    """Everything a request needs from one model version, built before it is served."""

    session: ort.InferenceSession
    metadata: dict[str, Any]
    spec: InputSpec
    outputs: list[str]
    version: str
    source: str
    loaded_at: str


def load_model(
    path: Path, source: str, version: str | None, settings: SessionSettings
) -> LoadedModel:
    """Session, metadata and input spec for the file at `path`, warmed up with one row so the
    first request does not pay for onnxruntime's lazy initialisation. Without a registry
    `version`, the model is named by the registry version written into its metadata at
    registration, else by its content hash."""
    session = load_session(path, settings=settings)
    if VERSION_KEY in output_names(session):
        raise ModelSourceError(
            f"{path}: the model has an output named {VERSION_KEY!r}, which the service's "
            "responses use for the model version; rename that output"
        )
    metadata = read_metadata(session)
    spec = input_spec(session, metadata)
    score_outputs(session, np.zeros((1, *spec.shape), dtype=spec.dtype))
    return LoadedModel(
        session=session,
        metadata=metadata,
        spec=spec,
        outputs=output_names(session),
        version=str(version or metadata.get("model_version") or f"sha256:{file_digest(path)[:12]}"),
        source=source,
        loaded_at=_now(),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelStore:
    """The model being served (`current`), and the thread that follows a registry alias."""

    def __init__(
        self,
        model_source: str | Path,
        tracking_uri: str | None = None,
        settings: SessionSettings | None = None,
        reload_interval: float = 30.0,
    ) -> None:
        if reload_interval <= 0:
            raise ValueError(f"reload_interval must be > 0 seconds, got {reload_interval}")
        self.ref = parse_model_source(model_source)
        self.tracking_uri = tracking_uri
        self.settings = settings or SessionSettings()
        self.reload_interval = reload_interval
        self.alias_checked_at: str | None = None
        self.alias_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache = Path(tempfile.mkdtemp(prefix="normalcy-serve-"))
        try:
            if isinstance(self.ref, Path):
                if not self.ref.is_file():
                    raise FileNotFoundError(
                        f"{self.ref}: no such model file; expected an .onnx file or "
                        "models:/NAME@ALIAS"
                    )
                self.current = load_model(self.ref, str(self.ref), None, self.settings)
            else:
                self.current = self._load_version(alias_version(self.ref, tracking_uri))
        except BaseException:
            shutil.rmtree(self._cache, ignore_errors=True)
            raise

    @property
    def follows_alias(self) -> bool:
        return isinstance(self.ref, ModelRef) and self.ref.alias is not None

    def _load_version(self, version: str) -> LoadedModel:
        assert isinstance(self.ref, ModelRef)
        path = download_version(self.ref.name, version, self._cache, self.tracking_uri)
        return load_model(path, self.ref.uri, version, self.settings)

    def check_alias(self) -> bool:
        """Load and swap in the alias's version if it moved; True when it swapped.

        The new model is complete (downloaded, session built, warmed up) before the single
        assignment that publishes it; the old version's files are then removed (its session,
        still used by requests in flight, lives in memory)."""
        if not self.follows_alias:
            return False
        version = alias_version(self.ref, self.tracking_uri)  # type: ignore[arg-type]
        self.alias_checked_at = _now()
        old = self.current
        if version == old.version:
            return False
        new = self._load_version(version)
        self.current = new
        shutil.rmtree(self._cache / f"v{old.version}", ignore_errors=True)
        log.info("%s moved: now serving version %s (was %s)", new.source, version, old.version)
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.check_alias()
                self.alias_error = None
            except Exception as exc:  # keep serving the current model; say why in /health
                self.alias_error = str(exc)
                log.warning("alias check failed, still serving %s: %s", self.current.version, exc)

    def start(self) -> None:
        """Start following the alias (a no-op for a file or a pinned version)."""
        if self.follows_alias and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="alias-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the poll thread and remove downloaded files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        shutil.rmtree(self._cache, ignore_errors=True)
