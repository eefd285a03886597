"""DVC data versioning against real git and real DVC in temp repos (each DVC call takes ~1 s)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from normalcy.config import VersioningParams
from normalcy.data.versioning import (
    DataVersion,
    VersioningError,
    checkout_data,
    data_version_of,
    find_repo_root,
    snapshot_data,
)


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run(["git", "config", "user.email", "test@example.com"], cwd=path, check=True)
    subprocess.run(["git", "config", "user.name", "Test"], cwd=path, check=True)
    return path


def _write_data(data_dir: Path, seed: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        np.savez(data_dir / f"{split}.npz", X=rng.normal(size=(5, 3)), y=np.zeros(5))


def _remote_files(remote: Path) -> list[Path]:
    return [p for p in remote.rglob("*") if p.is_file()]


def test_find_repo_root(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    (repo / "data" / "prepared").mkdir(parents=True)
    assert find_repo_root(repo / "data" / "prepared") == repo.resolve()
    loose = tmp_path / "loose"
    loose.mkdir()
    assert find_repo_root(loose) == loose.resolve()


@pytest.mark.slow
def test_add_snapshot_pushes_and_hashes_by_content(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    data = repo / "data" / "prepared"
    _write_data(data, seed=0)
    remote = tmp_path / "remote"
    params = VersioningParams(enabled=True, remote_name="local", remote_url=str(remote))

    v1 = snapshot_data("data/prepared", params, repo_root=repo)
    assert (repo / ".dvc").is_dir()  # dvc init ran on its own
    assert v1.method == "add" and v1.path == "data/prepared"
    assert v1.md5.endswith(".dir")
    assert v1.remote_url == str(remote.resolve())
    assert (repo / "data" / "prepared.dvc").is_file()
    assert _remote_files(remote)
    assert data_version_of(data, repo) == v1.md5
    assert DataVersion(**v1.to_dict()) == v1

    assert snapshot_data(data, params, repo_root=repo).md5 == v1.md5  # same bytes, same md5
    old_train = (data / "train.npz").read_bytes()
    _write_data(data, seed=1)
    v2 = snapshot_data(data, params, repo_root=repo)
    assert v2.md5 != v1.md5 and v2.md5.endswith(".dir")
    assert data_version_of(data, repo) == v2.md5

    checkout_data(v1, repo)  # an older version: rebuilt from the cache
    assert (data / "train.npz").read_bytes() == old_train
    checkout_data(v2, repo)  # the recorded version: dvc checkout
    assert (data / "train.npz").read_bytes() != old_train


def test_stage_output_is_committed_not_added(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    (repo / "prepare.py").write_text("pass\n")
    (repo / "params.yaml").write_text("prepare:\n  output_dir: data/prepared\n  seed: 0\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  prepare:\n"
        "    cmd: python prepare.py\n"
        "    deps: [prepare.py]\n"
        "    params: [prepare.seed]\n"
        "    outs: ['${prepare.output_dir}']\n"
    )
    _write_data(repo / "data" / "prepared", seed=0)
    remote = tmp_path / "remote"
    params = VersioningParams(enabled=True, remote_url=str(remote))

    version = snapshot_data("data/prepared", params, repo_root=repo)
    assert version.method == "commit"
    assert version.md5.endswith(".dir")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = lock["stages"]["prepare"]["outs"]
    assert outs[0]["path"] == "data/prepared" and outs[0]["md5"] == version.md5
    assert not (repo / "data" / "prepared.dvc").exists()
    assert _remote_files(remote)
    assert data_version_of(repo / "data" / "prepared", repo) == version.md5


def test_plain_folder_gets_no_scm_init_and_repo_relative_remote(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _write_data(root / "data", seed=0)
    params = VersioningParams(enabled=True, remote_url=".dvc-remote")

    version = snapshot_data(root / "data", params, repo_root=root)
    assert (root / ".dvc").is_dir() and not (root / ".git").exists()
    assert version.remote_url == str((root / ".dvc-remote").resolve())
    assert _remote_files(root / ".dvc-remote")


def test_unwritable_remote_names_the_command(tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "repo")
    _write_data(repo / "data", seed=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    params = VersioningParams(enabled=True, remote_url=str(blocker / "remote"))

    with pytest.raises(VersioningError, match="dvc push"):
        snapshot_data("data", params, repo_root=repo)
