"""normalcy.memory: user malloc settings win, other C libraries are left alone. (The page-fault
effect itself is measured by the image flow in benchmarks/README.md: a small-process check of it
depended on the thread setup.)"""

from __future__ import annotations

import pytest

from normalcy import memory


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
