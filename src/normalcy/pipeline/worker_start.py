"""How the train flow's local Dask workers start: forked from a forkserver that has already
imported what a candidate needs (`normalcy.pipeline.worker_imports`), in the environment Dask
gives the workers it spawns, less its malloc trim threshold.

Why, measured on 2 CPUs (23_mammography, the parallel benchmark's table):
- Spawned, each worker imported torch, scikit-learn, the detectors, Prefect and the flow module
  on its own: 12.3 s of CPU for two, beside the flow's first steps, and training still waited
  1.6 s for the cluster. Forked, that import happens once, and the workers share its pages.
- `normalcy train` starts the forkserver before it imports the flow (`prestart_worker_forkserver`),
  so the imports overlap the CLI's own and Prefect's temporary API starting. A flow started
  another way (a deployment) starts it with its cluster.
- Dask sets MALLOC_TRIM_THRESHOLD_=65536 in its workers (`distributed.nanny.pre-spawn-environ`),
  and `keep_freed_memory` yields to any MALLOC_* variable as to a user's own: the workers ran
  with glibc's 64 KB trim threshold, unlike a sequential run. A user's own MALLOC_* variables
  still reach the workers through the environment.

Outside Linux (`has_forkserver`), workers are spawned, as Dask does by default."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from normalcy.config import TrainParams

FORKSERVER_IMPORTS = ["distributed", "normalcy.pipeline.worker_imports"]
TRIM_THRESHOLD = "MALLOC_TRIM_THRESHOLD_"


def trim_threshold_config() -> dict[str, str | None]:
    """Dask's config for the trim threshold it sets in workers: the user's own (this process's
    environment), else none."""
    return {f"distributed.nanny.pre-spawn-environ.{TRIM_THRESHOLD}": os.environ.get(TRIM_THRESHOLD)}


def has_forkserver() -> bool:
    """Whether workers are forked from a forkserver here: on Linux only. Windows has none, and on
    macOS a process that loaded system frameworks (torch's and numpy's BLAS among them) is not
    safe to fork without exec, which is why Python spawns there by default."""
    return (
        sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()
    )


def worker_environment() -> dict[str, str]:
    """The variables Dask sets in a worker before it starts (one thread for OpenMP, MKL and
    OpenBLAS), less its malloc trim threshold; a value this process already has wins, as in
    Dask."""
    import dask

    with dask.config.set(trim_threshold_config()):  # get() returns the live dict: read it inside
        configured = dask.config.get("distributed.nanny.pre-spawn-environ")
        return {
            name: os.environ.get(name, str(v)) for name, v in configured.items() if v is not None
        }


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with `variables` set inside the block, restored after."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_worker_forkserver() -> bool:
    """Start this process's forkserver, importing FORKSERVER_IMPORTS in the workers'
    environment, unless it runs already; returns at once (it imports in the background).
    False where the platform has no forkserver."""
    if not has_forkserver():
        return False
    import multiprocessing.forkserver

    import dask
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context()  # distributed sets its own preload list on first use: before ours
    multiprocessing.forkserver.set_forkserver_preload(FORKSERVER_IMPORTS)
    with environment(worker_environment()):
        multiprocessing.forkserver.ensure_running()
    return True


def prestart_worker_forkserver(params: TrainParams) -> None:
    """Start the forkserver now when training will start a local Dask cluster (and the
    `parallel` extra is installed; when it is not, the flow says so before any work)."""
    parallel = params.parallel
    if parallel.backend != "dask" or parallel.scheduler_address is not None:
        return
    try:
        start_worker_forkserver()
    except ImportError:
        return


@contextmanager
def local_worker_config() -> Iterator[None]:
    """Dask's config for starting local workers in the block: forked from the forkserver (started
    here if it is not yet) where there is one, spawned otherwise; no malloc trim threshold but
    the user's."""
    import dask

    method = "forkserver" if start_worker_forkserver() else "spawn"
    config = {**trim_threshold_config(), "distributed.worker.multiprocessing-method": method}
    with dask.config.set(config):
        yield
