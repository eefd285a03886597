"""How many threads training and scoring use: chosen from the CPUs this process may actually
use and the size of the work, never from the machine's core count alone.

Why: torch and onnxruntime default to one thread per core of the machine. In a container with a
CPU quota, or beside other busy processes, those threads outnumber the CPU time the process gets;
they then wait on each other at every operator and a small model trains up to ~10x slower
(measured here: 137.7 s with 2 threads against 12.7 s with 1 for the same fit while another
process held one core).

The rule (params override it: `train.threads`, `clean.threads`, `scoring.intra_op_threads`;
null = this rule):
- CPUs available = the process's CPU affinity, capped by the cgroup CPU quota (v2 `cpu.max`,
  v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded down, at least 1; inside `cpu_budget(n)`
  (a candidate fitted beside others, see normalcy.pipeline.parallel) at most n.
- Training: one thread for a network under `SMALL_MODEL_PARAMETERS` parameters (its operators
  are too small for threads to pay off), otherwise every available CPU.
- Scoring with onnxruntime: every available CPU (batches are large and the graph is fixed).

No torch import here: scoring hosts have no torch."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

# Below this many parameters a network's matrix products take microseconds per batch: thread
# hand-offs cost more than they save, and under contention they cost far more.
SMALL_MODEL_PARAMETERS = 1_000_000

CGROUP_ROOT = Path("/sys/fs/cgroup")

# CPUs the code running in this context may use when it shares the process's CPUs with other
# work (None: all of them). A context variable, so one task's budget does not leak to another.
_CPU_BUDGET: ContextVar[int | None] = ContextVar("cpu_budget", default=None)


def _cgroup_v2_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v2's `cpu.max` ("max 100000" = no limit)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _cgroup_v1_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v1's CFS quota (-1 = no limit)."""
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota grants this process (fractional), or None without a quota."""
    quota = _cgroup_v2_quota(root)
    return quota if quota is not None else _cgroup_v1_quota(root)


def affinity_cpus() -> int:
    """CPUs the scheduler may run this process on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process may use: affinity capped by the cgroup quota and by the
    `cpu_budget` in force, at least 1."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    budget = _CPU_BUDGET.get()
    if budget is not None:
        cpus = min(cpus, budget)
    return max(1, cpus)


@contextmanager
def cpu_budget(cpus: int) -> Iterator[None]:
    """Run the block as if only `cpus` CPUs were available (every thread count chosen inside
    follows), then restore the previous budget."""
    if cpus < 1:
        raise ValueError(f"a CPU budget must be >= 1, got {cpus}")
    token = _CPU_BUDGET.set(cpus)
    try:
        yield
    finally:
        _CPU_BUDGET.reset(token)


def checked_threads(owner: str, threads: int | None) -> int | None:
    """A detector's `threads` param as given, or a ValueError naming the detector: a whole
    number >= 1, or None for this module's rule."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise ValueError(f"{owner}: threads must be a whole number >= 1 or null, got {threads!r}")
    if threads < 1:
        raise ValueError(f"{owner}: threads must be >= 1 or null (automatic), got {threads}")
    return int(threads)  # numpy integers too


def training_threads(
    n_parameters: int, override: int | None = None, cpus: int | None = None
) -> int:
    """Threads for fitting a network of `n_parameters` (see the module docstring's rule)."""
    if override is not None:
        if override < 1:
            raise ValueError(f"threads must be >= 1 or null (automatic), got {override}")
        return override
    cpus = available_cpus() if cpus is None else cpus
    return 1 if n_parameters < SMALL_MODEL_PARAMETERS else cpus


def scoring_threads(override: int | None = None, cpus: int | None = None) -> int:
    """onnxruntime intra-op threads: the override, else every available CPU."""
    if override is not None:
        if override < 1:
            raise ValueError(f"intra_op_threads must be >= 1 or null (automatic), got {override}")
        return override
    return available_cpus() if cpus is None else cpus


@contextmanager
def torch_threads(n_threads: int) -> Iterator[None]:
    """Run the block with torch using `n_threads` intra-op threads, then restore the previous
    count (a library must not leave the process's setting changed)."""
    import torch  # only training calls this; scoring hosts have no torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def count_parameters(module: Any) -> int:
    """Trainable and frozen parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())


def worker_threads(workers: int, override: int | None = None, cpus: int | None = None) -> int:
    """onnxruntime intra-op threads for each of `workers` serving processes on one host. One
    worker: `scoring_threads` (an override is taken as given, like everywhere else). Several:
    workers x threads <= available CPUs, the override when it fits, else the CPUs shared out;
    ValueError, naming the numbers, when they cannot fit."""
    cpus = available_cpus() if cpus is None else cpus
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return scoring_threads(override, cpus=cpus)
    if workers > cpus:
        raise ValueError(
            f"{workers} workers on {cpus} available CPUs: each worker needs a CPU of its own; "
            f"use at most {cpus}"
        )
    threads = scoring_threads(override, cpus=cpus // workers)
    if workers * threads > cpus:
        raise ValueError(
            f"{workers} workers x {threads} intra-op threads = {workers * threads} threads on "
            f"{cpus} available CPUs; use at most {cpus // workers} threads per worker"
        )
    return threads
