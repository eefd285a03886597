"""Which process is this, and is a process named that way still running? Used to tell the
leftovers of a killed run (an MLflow run left RUNNING, a model's lock left held) from the work
of a live one. Standard library only: imported by the lock before MLflow or Prefect load."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a pid reused
    by another process from the one that started the run; None where /proc has no answer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def pid_namespace() -> str:
    """The pid namespace of this process ("pid:[4026531836]"), or "" where /proc cannot say:
    containers that share a host name (host networking) still see different pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_process() -> tuple[str, int, str]:
    """(host name, pid, start time or "") of the calling process."""
    pid = os.getpid()
    return socket.gethostname(), pid, process_start(pid) or ""


def is_gone(host: str, pid: str, start: str) -> bool:
    """True only when the process is provably gone: it ran on this host, and its pid is no
    longer alive or now belongs to a process started at another time (a reused pid). Another
    host, a malformed pid, or a process this user may not signal count as alive."""
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return bool(start) and process_start(int(pid)) not in (None, start)
