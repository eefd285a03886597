"""Snapshot the prepared data set with real DVC, so every training run is tagged with the exact
content hash of the data it saw, and that content can be pulled back from the remote later.

A data dir that ``dvc.yaml`` declares as a stage output cannot be ``dvc add``-ed (DVC refuses
overlapping outputs), so such a dir is recorded with ``dvc commit --force <stage>`` (hashes go to
dvc.lock, ``dvc repro`` stays the way to rebuild it); any other dir is ``dvc add``-ed. DVC runs
as a subprocess of this interpreter: its CLI is its stable interface, and importing it here
would attach its log handlers to this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from normalcy.config import VersioningParams
from normalcy.retry import call_with_retry

log = logging.getLogger(__name__)

# Resolves dvc.yaml with DVC's own loader (templating such as ${prepare.output_dir}, wdir,
# foreach) and prints the stages whose output is the given path, as JSON on the last line.
_FIND_STAGE_SCRIPT = """
import json, os, sys
from dvc.dvcfile import load_file
from dvc.repo import Repo

root, target = sys.argv[1], os.path.realpath(sys.argv[2])
found = []
with Repo(root) as repo:
    for stage in load_file(repo, os.path.join(root, "dvc.yaml")).stages.values():
        for out in stage.outs:
            if os.path.realpath(out.fs_path) == target:
                found.append({"stage": stage.addressing, "def_path": str(out.def_path)})
print(json.dumps(found))
"""


class VersioningError(RuntimeError):
    """A DVC step failed; the message names the command and carries DVC's own error text."""


@dataclass
class DataVersion:
    """What was snapshotted: enough to tag a run and to restore the data later."""

    md5: str  # DVC md5 of the data dir ("<hash>.dir" for a directory)
    path: str  # data dir relative to the repo root (POSIX form)
    remote_url: str  # absolute remote location pushed to
    method: str  # "commit" (stage output in dvc.yaml) or "add"

    def to_dict(self) -> dict:
        return asdict(self)


def find_repo_root(start: str | Path = ".") -> Path:
    """Nearest parent (or start itself) holding .git or .dvc, so DVC runs where it expects."""
    start = Path(start).resolve()
    for candidate in (start, *start.parents):
        if (candidate / ".git").exists() or (candidate / ".dvc").is_dir():
            return candidate
    return start


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def _run_dvc(args: list[str], root: Path) -> str:
    """Run ``python -m dvc <args>`` in root; a bare ``dvc`` may not be on PATH."""
    cmd = [sys.executable, "-m", "dvc", *args]
    log.debug("running %s in %s", " ".join(cmd), root)
    proc = subprocess.run(
        cmd,
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        text = proc.stderr.strip() or proc.stdout.strip()
        lines = [ln for ln in text.splitlines() if ln.strip() and "dvc.org/support" not in ln]
        detail = "\n".join(lines) or "(no output)"
        raise VersioningError(
            f"`dvc {' '.join(args)}` failed (exit {proc.returncode}) in {root}:\n{detail}"
        )
    return proc.stdout


def _inside_git_worktree(root: Path) -> bool:
    if shutil.which("git") is None:
        return False
    proc = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def _ensure_dvc_repo(root: Path) -> None:
    """``dvc init`` once; --subdir / --no-scm because plain init fails outside a git root."""
    if (root / ".dvc").is_dir():
        return
    if (root / ".git").exists():
        args = ["init"]
    elif _inside_git_worktree(root):
        args = ["init", "--subdir"]
    else:
        args = ["init", "--no-scm"]
    _run_dvc(args, root)
    log.info("initialised DVC in %s", root)


def _resolve_paths(data_dir: str | Path, repo_root: str | Path | None) -> tuple[Path, Path, str]:
    """(root, absolute data path, data path relative to root). A relative data_dir is taken
    relative to repo_root when one is given (params paths are repo-relative), else to the cwd."""
    data = Path(data_dir).expanduser()
    if repo_root is not None:
        root = Path(repo_root).expanduser().resolve()
        data = (root / data if not data.is_absolute() else data).resolve()
    else:
        data = data.resolve()
        root = find_repo_root(data.parent)
    try:
        rel = data.relative_to(root).as_posix()
    except ValueError:
        raise VersioningError(f"data dir {data} is outside the repo root {root}") from None
    if rel == ".":
        raise VersioningError(f"data dir {data} is the repo root itself; DVC cannot track it")
    return root, data, rel


def _stage_for(root: Path, data: Path) -> tuple[str, str] | None:
    """(stage name, output path as written) if root's dvc.yaml declares data as an output."""
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return None
    cmd = [sys.executable, "-c", _FIND_STAGE_SCRIPT, str(root), str(data)]
    proc = subprocess.run(
        cmd, cwd=root, env=_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        detail = proc.stderr.strip() or proc.stdout.strip() or "(no output)"
        raise VersioningError(f"cannot read the stages of {root / 'dvc.yaml'}:\n{detail}")
    found = json.loads(lines[-1])
    if len(found) > 1:
        names = ", ".join(f["stage"] for f in found)
        raise VersioningError(f"{data} is an output of several stages ({names})")
    return (found[0]["stage"], found[0]["def_path"]) if found else None


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise VersioningError(f"cannot read {path}: {exc}") from exc


def _lock_md5(root: Path, stage: str, def_path: str) -> str | None:
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        return None
    entry = (_read_yaml(lock_file).get("stages") or {}).get(stage) or {}
    for out in entry.get("outs") or []:
        if os.path.normpath(str(out.get("path"))) == os.path.normpath(def_path):
            return out.get("md5")
    return None


def _dvcfile_md5(data: Path) -> str | None:
    dvcfile = data.with_name(data.name + ".dvc")
    if not dvcfile.is_file():
        return None
    outs = _read_yaml(dvcfile).get("outs") or []
    return outs[0].get("md5") if outs else None


def _absolute_remote(url: str, root: Path) -> str:
    """params give the remote relative to the repo root; the run tag needs an absolute path."""
    if "://" in url:
        return url
    path = Path(url).expanduser()
    return str((path if path.is_absolute() else root / path).resolve())


def snapshot_data(
    data_dir: str | Path, params: VersioningParams, repo_root: str | Path | None = None
) -> DataVersion:
    """Record data_dir in the DVC cache, push it to the default remote, and return its md5."""
    root, data, rel = _resolve_paths(data_dir, repo_root)
    if not data.exists():
        raise VersioningError(f"data dir {data} does not exist; nothing to snapshot")
    _ensure_dvc_repo(root)

    stage = _stage_for(root, data)
    if stage is not None:
        name, def_path = stage
        # The stage's deps (params.yaml, sources) must exist; the command is not run.
        _run_dvc(["commit", "--force", name], root)
        md5, method = _lock_md5(root, name, def_path), "commit"
    else:
        _run_dvc(["add", rel], root)
        md5, method = _dvcfile_md5(data), "add"
    if not md5:
        raise VersioningError(f"DVC recorded no md5 for {rel} (method {method})")

    remote_url = _absolute_remote(params.remote_url, root)
    _run_dvc(
        ["remote", "add", "--local", "--default", "--force", params.remote_name, remote_url], root
    )
    # Push the path, not the stage: a stage's other outputs may not be cached. A push is
    # content-addressed, so retrying any failure of it is safe (a remote that blinks).
    call_with_retry(
        lambda: _run_dvc(["push", "-r", params.remote_name, rel], root),
        params.retry.policy(),
        f"dvc push of {rel} to {remote_url}",
        transient=lambda error: isinstance(error, VersioningError),
    )
    log.info("data %s versioned as %s (%s), pushed to %s", rel, md5, method, remote_url)
    return DataVersion(md5=md5, path=rel, remote_url=remote_url, method=method)


def data_version_of(data_dir: str | Path, repo_root: str | Path | None = None) -> str | None:
    """The md5 DVC currently records for data_dir (dvc.lock or its .dvc file), None if untracked."""
    root, data, _ = _resolve_paths(data_dir, repo_root)
    stage = _stage_for(root, data)
    if stage is not None:
        return _lock_md5(root, *stage)
    return _dvcfile_md5(data)


def _object_path(base: Path, md5: str) -> list[Path]:
    """Where DVC 3 (files/md5/xx/…) and DVC 2 (xx/…) caches and local remotes keep an object."""
    return [base / "files" / "md5" / md5[:2] / md5[2:], base / md5[:2] / md5[2:]]


def _find_object(bases: list[Path], md5: str) -> Path:
    for base in bases:
        for candidate in _object_path(base, md5):
            if candidate.is_file():
                return candidate
    raise VersioningError(f"object {md5} is in neither the cache nor the remote ({bases})")


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkout_data(
    version: DataVersion | str, repo_root: str | Path, data_dir: str | Path | None = None
) -> None:
    """Restore the data dir to a snapshotted version.

    The version DVC currently records is restored with ``dvc checkout`` (``dvc pull`` from the
    default remote if the cache lacks it). An older md5 is rebuilt from the cache or a local
    remote folder, checking each file's md5; dvc.lock / the .dvc file are left as they are, so
    ``dvc status`` then reports the dir as modified. A bare md5 string needs data_dir.
    """
    if isinstance(version, DataVersion):
        md5, path, remote = version.md5, data_dir or version.path, version.remote_url
    else:
        if data_dir is None:
            raise VersioningError("checkout_data with a bare md5 needs data_dir")
        md5, path, remote = version, data_dir, None
    root, data, rel = _resolve_paths(path, repo_root)

    if data_version_of(data, root) == md5:
        try:
            _run_dvc(["checkout", "--force", rel], root)
        except VersioningError:
            _run_dvc(["pull", "--force", rel], root)
        return

    cache = Path(_run_dvc(["cache", "dir"], root).strip())
    bases = [cache] + ([Path(remote)] if remote and "://" not in remote else [])
    if not md5.endswith(".dir"):
        raise VersioningError(f"{md5} is not a directory version; only dirs are rebuilt here")
    entries = json.loads(_find_object(bases, md5).read_text())
    staging = Path(tempfile.mkdtemp(prefix=f".{data.name}-", dir=data.parent))
    try:
        for entry in entries:
            src = _find_object(bases, entry["md5"])
            dst = staging / entry["relpath"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            if _file_md5(dst) != entry["md5"]:
                raise VersioningError(f"{src} does not match its md5 {entry['md5']}")
        if data.exists():
            shutil.rmtree(data) if data.is_dir() else data.unlink()
        staging.rename(data)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("restored %s to %s", rel, md5)
