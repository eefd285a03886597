"""Candidates fitted in parallel (`train.parallel.backend: dask`): each candidate, with its
preprocessing variants, is one Prefect task on a Dask cluster of process workers.

Why: the candidates are independent, and most of them train on one thread (small networks,
see normalcy.threads), so one fit at a time leaves the other CPUs idle. Each task gets a CPU
budget (its worker's share of the CPUs): the threads rule and torch's thread count are applied
inside it, so parallel fits do not oversubscribe the CPUs. Each candidate seeds itself, so the
fitted candidates and their metrics are the sequential run's.

Needs the `parallel` extra (prefect-dask, distributed); imported only when the backend is dask."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from normalcy.config import ParallelParams, TrainParams
from normalcy.data.splits import Split
from normalcy.detectors import Detector
from normalcy.evaluation.selection import CandidateResult
from normalcy.pipeline import artifacts
from normalcy.pipeline.worker_start import local_worker_config
from normalcy.threads import available_cpus, cpu_budget, torch_threads

if TYPE_CHECKING:
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner
    from prefect_dask.task_runners import PrefectDaskFuture

log = logging.getLogger(__name__)


class ParallelSetupError(ValueError):
    """`train.parallel` cannot run here (too many workers or threads for the CPUs, or no
    scheduler at the address); raised before any candidate is fitted."""


@dataclass
class FittedCandidate:
    """What a candidate task sends back: the fitted detector, its result, where, when it
    started (epoch seconds) and how long it took."""

    detector: Detector
    result: CandidateResult
    worker: str
    started: float
    seconds: float


def local_cluster_size(params: TrainParams, cpus: int | None = None) -> tuple[int, int]:
    """(worker processes, CPU budget of each) for a local cluster: `train.parallel.workers`
    (default: every available CPU) sharing the available CPUs; ParallelSetupError, naming the
    numbers, when the workers or `train.threads` do not fit."""
    cpus = available_cpus() if cpus is None else cpus
    workers = params.parallel.workers or cpus
    if workers > cpus:
        raise ParallelSetupError(
            f"train.parallel.workers={workers} on {cpus} available CPUs: each worker needs a CPU "
            f"of its own; use at most {cpus} (or null for one per CPU)"
        )
    budget = cpus // workers
    if params.threads is not None and params.threads > budget:
        raise ParallelSetupError(
            f"train.threads={params.threads} per fit x {workers} workers is more threads than "
            f"the {cpus} available CPUs; use train.threads <= {budget} or null (automatic)"
        )
    return workers, budget


def check_parallel(params: TrainParams) -> None:
    """Fail before any training when `train.parallel` cannot run: a local cluster that does not
    fit the CPUs, a missing `parallel` extra, or a scheduler that does not answer."""
    parallel = params.parallel
    if parallel.backend != "dask":
        return
    _require_extra()
    if parallel.scheduler_address is None:
        local_cluster_size(params)
        return
    from distributed import Client

    with _reaching(parallel):
        Client(parallel.scheduler_address, timeout=parallel.connect_timeout_s).close()


def _require_extra() -> None:
    """ParallelSetupError, saying how to install it, when the `parallel` extra is missing."""
    try:
        import distributed  # noqa: F401
        import prefect_dask  # noqa: F401
    except ImportError as missing:
        raise ParallelSetupError(
            f"train.parallel.backend dask needs the `parallel` extra ({missing}); "
            "pip install 'normalcy[parallel]' or set train.parallel.backend: sequential"
        ) from None


@contextmanager
def _reaching(parallel: ParallelParams) -> Iterator[None]:
    """Say which scheduler did not answer, and what to do, instead of distributed's OSError."""
    try:
        yield
    except (OSError, TimeoutError) as failure:
        raise ParallelSetupError(
            f"train.parallel.scheduler_address {parallel.scheduler_address!r}: no Dask scheduler "
            f"answered within {parallel.connect_timeout_s:g} s ({failure}); start one "
            "(`dask scheduler`), correct the address, or set train.parallel.backend: sequential"
        ) from None


class StartingCluster:
    """A local Dask cluster started, and its workers warmed up, in a background thread by the
    train flow before it prepares, validates and cleans the data: the workers' start-up (seconds
    of spawning processes that import torch, the detectors and Prefect) then overlaps those
    steps instead of delaying training. `release` shuts it down in the background as well, so
    evaluation and export do not wait for the workers to exit."""

    def __init__(self, params: TrainParams) -> None:
        workers, self.budget = local_cluster_size(params)
        log.info("starting a local Dask cluster of %d workers in the background", workers)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="normalcy-dask")
        self._requested = time.perf_counter()
        self._cluster = self._thread.submit(
            start_local_cluster, workers, prefect_api_env(), running_flow_modules()
        )
        self._closed: Future | None = None

    def address(self) -> str:
        """The scheduler's address once the cluster is up (waits for it; raises its failure)."""
        waited = time.perf_counter()
        address = self._cluster.result().scheduler_address
        log.info(
            "dask cluster ready in %.1f s (requested %.1f s before training)",
            time.perf_counter() - waited,
            waited - self._requested,
        )
        return address

    @property
    def released(self) -> bool:
        return self._closed is not None

    def release(self) -> None:
        """Start shutting the cluster down in the background (once)."""
        if self._closed is None:
            self._closed = self._thread.submit(close_local_cluster, self._cluster)

    def join(self) -> None:
        """Shut the cluster down and wait until its workers are gone."""
        self.release()
        self._closed.result()
        self._thread.shutdown()


def start_local_cluster(
    workers: int, env: dict[str, str], modules: tuple[str, ...] = ()
) -> LocalCluster:
    """A LocalCluster of `workers` single-threaded process workers (`local_worker_config`: forked
    where the platform allows), no dashboard, each worker warmed up (`warm_up_worker`, importing
    `modules` too)."""
    from distributed import Client, LocalCluster

    with local_worker_config():
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env
        )
    try:
        with Client(cluster) as client:
            client.run(warm_up_worker, modules)
    except BaseException:
        cluster.close()
        raise
    return cluster


def running_flow_modules() -> tuple[str, ...]:
    """The module of the flow this process runs, if any: every task submitted from it carries
    the flow, which a worker unpickles by importing that module (the train flow's imports
    MLflow and Great Expectations: seconds)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    module = context.flow.fn.__module__ if context is not None and context.flow else "__main__"
    return () if module == "__main__" else (module,)


def warm_up_worker(modules: tuple[str, ...] = ()) -> None:
    """Load what a candidate task needs: `normalcy.pipeline.worker_imports` (already there in a
    forked worker), Prefect's task engine and `modules`. Seconds per worker that would otherwise
    delay the first candidates, and that the train flow's early start lets overlap its first
    steps."""
    import importlib

    import prefect.task_engine  # noqa: F401

    import normalcy.pipeline.worker_imports  # noqa: F401
    from normalcy.memory import keep_freed_memory

    keep_freed_memory()  # a worker process fits and scores torch models too
    for module in modules:
        importlib.import_module(module)


def close_local_cluster(starting: Future) -> None:
    """Close the cluster `starting` gives, once it has started (nothing when its start failed)."""
    if starting.exception() is None:
        starting.result().close()


# The cluster a train flow started for its candidates (see `training_cluster`). A context
# variable, not a task parameter: Prefect serializes the calling task's parameters into every
# task it submits to Dask, and a cluster handle (threads, futures) cannot travel.
_flow_cluster: ContextVar[StartingCluster | None] = ContextVar("flow_cluster", default=None)


@contextmanager
def training_cluster(params: TrainParams) -> Iterator[StartingCluster | None]:
    """Around the train flow: `check_parallel` first, before any other work; then, for a local
    Dask cluster, start it now in the background (`StartingCluster`) so that the candidates
    find it up, and shut it down at the latest on exit. Yields the cluster, or None when the
    backend is sequential or the scheduler is remote."""
    check_parallel(params)
    if params.parallel.backend != "dask" or params.parallel.scheduler_address is not None:
        yield None
        return
    cluster = StartingCluster(params)
    token = _flow_cluster.set(cluster)
    try:
        yield cluster
    finally:
        _flow_cluster.reset(token)
        cluster.join()


@contextmanager
def dask_runner(params: TrainParams) -> Iterator[tuple[DaskTaskRunner, int | None]]:
    """(a started DaskTaskRunner whose cluster is up or connected, each task's CPU budget: None
    on a remote cluster, where the worker decides). Runs on the train flow's cluster when it
    started one (`training_cluster`), released (shut down in the background) once the runner
    is done; else on the remote `scheduler_address`; else on a local cluster of its own, shut
    down before this returns.
    Raises the same ParallelSetupErrors as `check_parallel`, on its own connection attempt."""
    _require_extra()
    from prefect_dask import DaskTaskRunner

    parallel = params.parallel
    own = None
    cluster = _flow_cluster.get() if parallel.scheduler_address is None else None
    if cluster is not None and cluster.released:  # a second training in the same flow
        cluster = None
    if cluster is None and parallel.scheduler_address is None:
        cluster = own = StartingCluster(params)
    try:
        if cluster is not None:
            runner, budget = DaskTaskRunner(address=cluster.address()), cluster.budget
        else:
            client = {"timeout": parallel.connect_timeout_s}
            runner, budget = DaskTaskRunner(parallel.scheduler_address, client_kwargs=client), None
        with runner:
            with _reaching(parallel):
                runner.client  # noqa: B018  connects now
            yield runner, budget
    finally:
        if own is not None:
            own.join()
        elif cluster is not None:
            cluster.release()  # the flow's cluster is not needed after training


def prefect_api_env() -> dict[str, str]:
    """PREFECT_API_URL for local workers: the configured API, else this process's temporary one
    (without it each worker would start a temporary API of its own, ~20 s, and record its task
    runs there)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url is None:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the one this process's flow already uses
        server.start()  # a no-op when it is running
        url = server.api_url
    return {"PREFECT_API_URL": str(url)}


@task(name="fit-candidate", task_run_name="fit-{name}", cache_policy=NO_CACHE)
def fit_candidate_task(
    name: str, train: Split, val: Split, params: TrainParams, budget: int | None
) -> FittedCandidate:
    """Fit one candidate and its variants inside its CPU budget, on a Dask worker."""
    from distributed import get_worker

    from normalcy.memory import keep_freed_memory
    from normalcy.pipeline.train import fit_candidate

    keep_freed_memory()  # a worker of a cluster this process did not start was not warmed up
    worker = get_worker()
    budget = budget or max(1, available_cpus() // worker.state.nthreads)
    started, clock = time.time(), time.perf_counter()
    with cpu_budget(budget), torch_threads(budget):
        detector, result = fit_candidate(name, train, val, params)
    return FittedCandidate(detector, result, worker.address, started, time.perf_counter() - clock)


# Mean fit seconds of the built-in candidates over the 15 shared ADBench tables, 3 seeds each
# (benchmarks/results/quality_tabular.json; pca, mahalanobis and iforest from the parallel
# benchmark's runs). Only their order is used: the first run of a project has no history of its
# own, and submitting in the params' order let the longest fit start last (measured: flow, the
# longest on mammography, started 5.7 s into a 27 s training step).
TYPICAL_FIT_SECONDS = {
    "dagmm": 9.0,
    "flow": 5.5,
    "autoencoder": 4.4,
    "vae": 3.9,
    "mahalanobis": 1.5,
    "pca": 1.5,
    "deep_svdd": 1.3,
    "iforest": 0.2,
    "knn": 0.05,
}


def last_fit_seconds(history: Path) -> dict[str, float] | None:
    """Each candidate's fit seconds in the last run that wrote `history` (the candidates table),
    or None when there is no readable one."""
    try:
        rows = json.loads(Path(history).read_text())["candidates"]
        return {row["name"]: float(row["fit_seconds"]) for row in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def longest_first(names: list[str], history: Path = artifacts.CANDIDATES) -> list[str]:
    """The order to submit candidates in: longest fit first, so that a long fit never starts
    last and leaves the other workers idle (LPT scheduling). The cost of a fit is the last run's
    fit seconds (`history`), else, on a project's first run, `TYPICAL_FIT_SECONDS`. Candidates
    without a cost go first, in their own order (theirs is unknown)."""
    seconds = last_fit_seconds(history)
    source = "the last run's fit seconds"
    if seconds is None:
        seconds, source = TYPICAL_FIT_SECONDS, "typical fit seconds (no earlier run here)"
    unknown = [name for name in names if name not in seconds]
    known = sorted((name for name in names if name in seconds), key=lambda n: -seconds[n])
    log.info("candidates submitted longest first, by %s: %s", source, unknown + known)
    return unknown + known


def cluster_threads(runner: DaskTaskRunner) -> int:
    """The threads of the cluster's workers now: how many candidates can run at once."""
    workers = runner.client.scheduler_info()["workers"].values()
    return max(1, sum(worker["nthreads"] for worker in workers))


def fit_in_parallel(
    names: list[str], train: Split, val: Split, params: TrainParams
) -> dict[str, tuple[Detector, CandidateResult]]:
    """Every named candidate fitted as its own task on `dask_runner`'s cluster and returned in
    the order given; the first failure (a `CandidateError` naming the candidate) cancels the
    rest and is raised.
    Candidates are handed out `longest_first`, one per free worker thread, the next as one
    finishes: Dask assigns every submitted task to a worker at once, so submitting all of them
    queued a long fit behind another on one worker while the other worker idled (measured: vae
    waited 24 s behind flow)."""
    from distributed import as_completed

    with dask_runner(params) as (runner, budget):
        waiting = longest_first(names)
        running: dict[str, tuple[str, PrefectDaskFuture]] = {}  # by Dask key
        done = as_completed(loop=runner.client.loop)

        def submit_next() -> None:
            name = waiting.pop(0)
            arguments = {"name": name, "train": train, "val": val, "params": params}
            future = runner.submit(fit_candidate_task, {**arguments, "budget": budget})
            running[future.wrapped_future.key] = (name, future)
            done.add(future.wrapped_future)

        handed_out = time.time()
        while waiting and len(running) < cluster_threads(runner):
            submit_next()
        fitted: dict[str, FittedCandidate] = {}
        try:
            for finished in done:
                name, future = running.pop(finished.key)
                fitted[name] = result = future.result()
                log.info(
                    "candidate %d/%d done: %s on worker %s (started +%.2f s): %s = %.4f (%.2f s)",
                    *(len(fitted), len(names), name, result.worker),
                    result.started - handed_out,
                    *(result.result.metric_name, result.result.metric, result.seconds),
                )
                if waiting:
                    submit_next()
        except BaseException:
            for _, future in running.values():
                future.wrapped_future.cancel()
            raise
    return {name: (fitted[name].detector, fitted[name].result) for name in names}
