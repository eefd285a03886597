"""normalcy.memory: large freed blocks stay in the process on glibc, user settings win."""

from __future__ import annotations

import subprocess
import sys

import pytest

from normalcy import memory

# A fresh process allocates and frees a 256 MB tensor, then allocates it again: the minor page
# faults of the second allocation (its pages were given back to the OS when they are many).
SECOND_ALLOCATION_FAULTS = """
import resource, sys
from normalcy.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 * 2**20)  # 256 MB, filled then freed
before = faults()
torch.ones(64 * 2**20)
print(applied, faults() - before)
"""


def _second_allocation(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", SECOND_ALLOCATION_FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's mallopt only")
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    applied, kept_faults = _second_allocation("keep")
    _, default_faults = _second_allocation("default")
    assert applied == "True"
    assert default_faults > 50_000  # 65,536 pages mapped afresh
    assert kept_faults < 1_000


def test_user_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert memory.keep_freed_memory() is False  # decided once per process


def test_another_c_library_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert memory.keep_freed_memory() is False
