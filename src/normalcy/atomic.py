"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path`, on failure it is removed.

    Same folder, so `os.replace` is an atomic rename (never a cross-device copy). The temp file is
    created with the process umask, unlike `mkstemp`'s 0600, so the result is readable as usual.
    Standard library only: the torch-free scorer uses it too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb"):
            pass
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
