"""Candidates fitted as Prefect tasks on a real Dask LocalCluster (train.parallel)."""

import json
import logging
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from normalcy.config import ConfigError, DataParams, PrepareParams, TrainParams, load_params
from normalcy.data.sources import load_dataset
from normalcy.data.splits import split_dataset
from normalcy.pipeline import parallel, train
from normalcy.pipeline.parallel import ParallelSetupError, local_cluster_size
from normalcy.pipeline.worker_start import has_forkserver, worker_environment
from normalcy.threads import available_cpus, cpu_budget, training_threads

# cheap candidates, one with preprocessing variants, one torch network
CHEAP = {
    "candidates": ["knn", "pca", "iforest", "autoencoder"],
    "epochs": 2,
    "detectors": {"knn": {"preprocessing": ["standardize", "none"]}},
}
LOCAL_DASK = {"backend": "dask", "workers": 2}


@pytest.fixture(scope="module")
def splits():
    return split_dataset(load_dataset(DataParams()), PrepareParams())


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_a_flow(function, *args):
    """Run `function(*args)` inside a real Prefect flow, as the train flow does."""
    from prefect import flow

    return flow(name="parallel-training-test")(function)(*args)


def open_local_clusters() -> list:
    from distributed.core import Status
    from distributed.deploy.spec import SpecCluster

    return [c for c in list(SpecCluster._instances) if c.status != Status.closed]


@pytest.mark.slow
@pytest.mark.integration
def test_parallel_candidates_are_the_sequential_ones(splits, prefect_harness):
    """Same seeds, same data: the same metrics, choices, winner and scores, bit for bit."""
    sequential = train.fit_candidates(splits.train, splits.val, TrainParams(**CHEAP))
    parallel_params = TrainParams(**CHEAP, parallel=LOCAL_DASK)
    parallel = in_a_flow(train.fit_candidates, splits.train, splits.val, parallel_params)
    (seq_detectors, seq_results, seq_winner), (par_detectors, par_results, par_winner) = (
        sequential,
        parallel,
    )
    assert [r.name for r in par_results] == [r.name for r in seq_results]
    assert [r.metric for r in par_results] == [r.metric for r in seq_results]
    assert (
        par_results[0].extra["preprocessing_trials"] == seq_results[0].extra["preprocessing_trials"]
    )
    assert par_winner.name == seq_winner.name
    for name, detector in seq_detectors.items():
        assert np.array_equal(par_detectors[name].score(splits.val.X), detector.score(splits.val.X))
    assert open_local_clusters() == []


def test_a_failing_candidate_is_named_sequentially(splits):
    params = TrainParams(candidates=["pca", "knn"], detectors={"knn": {"k": 1000}})
    with pytest.raises(
        train.CandidateError, match="candidate 'knn' failed: ValueError: knn: k=1000 needs"
    ):
        train.fit_candidates(splits.train, splits.val, params)


@pytest.mark.slow
@pytest.mark.integration
def test_a_failing_candidate_fails_the_same_way_in_a_worker(splits, prefect_harness):
    params = TrainParams(
        candidates=["pca", "knn"], detectors={"knn": {"k": 1000}}, parallel=LOCAL_DASK
    )
    with pytest.raises(
        train.CandidateError, match="candidate 'knn' failed: ValueError: knn: k=1000 needs"
    ):
        in_a_flow(train.fit_candidates, splits.train, splits.val, params)
    assert open_local_clusters() == []  # shut down on failure too


def test_an_unreachable_scheduler_fails_before_any_training(splits):
    address = f"tcp://127.0.0.1:{closed_port()}"
    parallel = {"backend": "dask", "scheduler_address": address, "connect_timeout_s": 1}
    params = TrainParams(candidates=["knn", "pca"], parallel=parallel)
    with pytest.raises(ParallelSetupError, match=f"scheduler_address '{address}': no Dask"):
        train.fit_candidates(splits.train, splits.val, params)


@pytest.mark.integration
def test_the_train_flow_checks_the_scheduler_before_any_work(
    tmp_path, prefect_harness, monkeypatch
):
    from normalcy.flows.train import train_flow

    monkeypatch.chdir(tmp_path)
    address = f"tcp://127.0.0.1:{closed_port()}"
    overrides = [
        "train.parallel.backend=dask",
        f"train.parallel.scheduler_address={address}",
        "train.parallel.connect_timeout_s=1",
    ]
    with pytest.raises(ParallelSetupError, match="no Dask scheduler answered within 1 s"):
        train_flow(str(tmp_path / "absent.yaml"), overrides)
    assert list(tmp_path.iterdir()) == []  # no data prepared, no MLflow store, no artifact


@pytest.mark.slow
@pytest.mark.integration
def test_the_train_flow_starts_its_cluster_before_it_prepares_the_data(
    tmp_path, prefect_harness, monkeypatch, caplog
):
    """The workers' start-up overlaps prepare, validate and clean: one cluster, requested well
    before training, used by the candidates, and gone when the flow returns."""
    from normalcy.flows.train import train_flow
    from tests.test_flows import git_repo, write_params

    root = git_repo(tmp_path / "project")
    write_params(root, {"train": CHEAP, "versioning": {"enabled": False}})
    monkeypatch.chdir(root)
    caplog.set_level(logging.INFO, logger=parallel.__name__)
    summary = train_flow("params.yaml", ["train.parallel.backend=dask", "train.parallel.workers=2"])
    assert summary["winner"] in CHEAP["candidates"] + ["consensus"]
    starts = [r for r in caplog.records if r.getMessage().startswith("starting a local Dask")]
    ready = [r for r in caplog.records if r.getMessage().startswith("dask cluster ready")]
    assert len(starts) == 1 and len(ready) == 1
    waited, requested_before = ready[0].args
    assert requested_before > 1.0  # prepare, validate and clean ran meanwhile
    assert open_local_clusters() == []


@pytest.mark.integration
def test_the_flow_cluster_workers_are_warmed_up_before_any_candidate(prefect_harness):
    """Every worker has loaded torch's optimizer machinery, the detectors, Prefect's task
    engine and the running flow's module before a candidate is submitted."""
    from distributed import Client
    from prefect import flow

    wanted = ("torch._dynamo", "normalcy.detectors.dagmm", "prefect.task_engine", __name__)

    def loaded() -> dict[str, bool]:
        import sys

        return {module: module in sys.modules for module in wanted}

    @flow(name="warm-up-test")
    def start_a_cluster() -> dict:
        with parallel.training_cluster(TrainParams(**CHEAP, parallel=LOCAL_DASK)) as cluster:
            with Client(cluster.address()) as client:
                return client.run(loaded)

    by_worker = start_a_cluster()
    assert len(by_worker) == 2
    for modules in by_worker.values():
        assert all(modules.values()), modules
    assert open_local_clusters() == []


@pytest.mark.integration
def test_the_flow_cluster_is_shut_down_when_the_flow_fails_before_training(prefect_harness):
    with pytest.raises(RuntimeError, match="validation failed"):
        with parallel.training_cluster(TrainParams(**CHEAP, parallel=LOCAL_DASK)) as cluster:
            assert isinstance(cluster, parallel.StartingCluster)
            raise RuntimeError("validation failed")
    assert open_local_clusters() == []


def test_sequential_training_starts_no_cluster():
    with parallel.training_cluster(TrainParams(**CHEAP)) as cluster:
        assert cluster is None
    assert open_local_clusters() == []


def test_a_local_cluster_must_fit_the_cpus():
    assert local_cluster_size(TrainParams(parallel=LOCAL_DASK), cpus=2) == (2, 1)
    assert local_cluster_size(TrainParams(parallel={"backend": "dask"}), cpus=4) == (4, 1)
    assert local_cluster_size(TrainParams(parallel={"backend": "dask", "workers": 2}), cpus=5) == (
        2,
        2,
    )
    with pytest.raises(ParallelSetupError, match="workers=3 on 2 available CPUs"):
        local_cluster_size(TrainParams(parallel={"backend": "dask", "workers": 3}), cpus=2)
    with pytest.raises(ParallelSetupError, match=r"train.threads=2 per fit x 2 workers"):
        local_cluster_size(TrainParams(threads=2, parallel=LOCAL_DASK), cpus=2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.parallel.workers=2", "train.parallel.workers applies to backend dask only"),
        (
            "train.parallel.scheduler_address=tcp://10.0.0.5:8786",
            "train.parallel.scheduler_address applies to backend dask only",
        ),
        ("train.parallel.backend=ray", "train.parallel.backend"),
        ("train.parallel.workers=0", "train.parallel.workers"),
    ],
)
def test_bad_parallel_params_fail_on_loading(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "absent.yaml", [override])


def test_a_scheduler_address_is_host_and_port_and_excludes_workers(tmp_path):
    dask = "train.parallel.backend=dask"
    with pytest.raises(ConfigError, match="train.parallel.scheduler_address.*got 'localhost'"):
        load_params(tmp_path / "absent.yaml", [dask, "train.parallel.scheduler_address=localhost"])
    both = [dask, "train.parallel.workers=2", "train.parallel.scheduler_address=h:8786"]
    with pytest.raises(ConfigError, match="give one of them"):
        load_params(tmp_path / "absent.yaml", both)


def test_a_cpu_budget_caps_the_threads_rule_inside_it_only():
    outside = available_cpus()
    with cpu_budget(1):
        assert available_cpus() == 1
        assert training_threads(5_000_000) == 1  # a large network too
    assert available_cpus() == outside
    with pytest.raises(ValueError, match="a CPU budget must be >= 1, got 0"):
        with cpu_budget(0):
            pass


def test_candidates_are_submitted_longest_first_by_the_last_runs_or_typical_fit_seconds(tmp_path):
    from normalcy.pipeline.parallel import longest_first

    table = tmp_path / "candidates.json"
    names = ["autoencoder", "vae", "dagmm", "knn", "flow", "my_plugin"]
    # no history (a project's first run): typical costs; a plugin's cost is unknown: first
    first_run = ["my_plugin", "dagmm", "flow", "autoencoder", "vae", "knn"]
    assert longest_first(names, table) == first_run
    rows = [
        {"name": "autoencoder", "fit_seconds": 4.0},
        {"name": "vae", "fit_seconds": 10.0},
        {"name": "dagmm", "fit_seconds": 24.0},
        {"name": "knn", "fit_seconds": 0.1},
        {"name": "ensemble", "fit_seconds": 0.0},
    ]
    table.write_text(json.dumps({"winner": "knn", "candidates": rows}))
    # the last run's seconds win over the typical ones; flow and the plugin were not in it:
    # their cost here is unknown, so they go first
    last_run = ["flow", "my_plugin", "dagmm", "vae", "autoencoder", "knn"]
    assert longest_first(names, table) == last_run
    for unreadable in ("{not json", json.dumps({"candidates": [{"name": "vae"}]}), "[]"):
        table.write_text(unreadable)
        assert longest_first(names, table) == first_run


DONE_LINE = re.compile(
    r"done: (\w+) on worker \S+ \(started \+([\d.]+) s\): \S+ = \S+ \(([\d.]+) s\)"
)


@pytest.mark.slow
@pytest.mark.integration
def test_candidates_are_handed_out_one_per_worker_longest_first(
    splits, prefect_harness, caplog, tmp_path, monkeypatch
):
    """Dask assigns a submitted task to a worker at once: had all been submitted together, a
    long fit could queue behind another while a worker idles. Here a candidate starts only when
    one ends, at most one per worker runs at a time, in the typical longest-first order."""
    monkeypatch.chdir(tmp_path)  # no candidates table: the first run of a project
    params = TrainParams(**CHEAP, parallel=LOCAL_DASK)
    with caplog.at_level(logging.INFO, logger="normalcy.pipeline.parallel"):
        in_a_flow(train.fit_candidates, splits.train, splits.val, params)
    spans = {
        name: (float(start), float(start) + float(seconds))
        for name, start, seconds in DONE_LINE.findall(caplog.text)
    }
    assert sorted(spans) == sorted(CHEAP["candidates"])
    order = parallel.longest_first(CHEAP["candidates"])
    assert order == ["autoencoder", "pca", "iforest", "knn"]
    ends = sorted(end for _, end in spans.values())
    # the third and fourth candidates were handed out only after one, then two, had ended
    assert spans[order[2]][0] >= ends[0] and spans[order[3]][0] >= ends[1]
    for name, (start, _) in spans.items():  # never more fits at once than the 2 workers
        assert sum(s <= start < e for s, e in spans.values()) <= 2, name


def worker_memory_setup() -> dict:
    """In a worker: its parent's command line, its trim threshold and keep_freed_memory's state."""
    import os
    from pathlib import Path

    from normalcy import memory

    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return {
        "parent": parent,
        "trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "keeps_freed_memory": memory._applied,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def local_workers_setup() -> list[dict]:
    from distributed import Client

    cluster = parallel.start_local_cluster(2, {})
    try:
        with Client(cluster) as client:
            return list(client.run(worker_memory_setup).values())
    finally:
        cluster.close()


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")
def test_local_workers_fork_from_the_forkserver_and_keep_freed_memory(monkeypatch):
    """Workers are forked from the forkserver (which imported torch and the detectors once), and
    keep freed memory as the sequential run does: Dask's own MALLOC_TRIM_THRESHOLD_=65536 no
    longer reaches them, while a user's does (and then wins)."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    workers = local_workers_setup()
    assert len(workers) == 2
    for worker in workers:
        assert "multiprocessing.forkserver" in worker["parent"], worker
        assert worker["trim_threshold"] is None and worker["keeps_freed_memory"] is True, worker
        assert worker["omp_threads"] == "1"  # Dask's other variables still apply
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    for worker in local_workers_setup():
        assert worker["trim_threshold"] == "131072" and worker["keeps_freed_memory"] is False


PRESTART = """
import sys, psutil
from normalcy.config import TrainParams
from normalcy.pipeline.worker_start import prestart_worker_forkserver
prestart_worker_forkserver(TrainParams(parallel={"backend": sys.argv[1]}))
children = [" ".join(child.cmdline()) for child in psutil.Process().children()]
print(sum("multiprocessing.forkserver" in child for child in children))
"""


@pytest.mark.parametrize(
    ("backend", "forkservers"), [("dask", "1" if has_forkserver() else "0"), ("sequential", "0")]
)
def test_normalcy_train_starts_the_forkserver_early_only_for_a_local_cluster(backend, forkservers):
    """`normalcy train` starts the workers' forkserver (on Linux) before it imports the flow, so
    that its imports overlap the CLI's; a sequential run starts none."""
    ran = subprocess.run(
        [sys.executable, "-c", PRESTART, backend], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == forkservers


def test_the_workers_environment_is_dasks_without_its_trim_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    environment = worker_environment()
    assert "MALLOC_TRIM_THRESHOLD_" not in environment
    assert environment["OMP_NUM_THREADS"] == "1" and environment["MKL_NUM_THREADS"] == "3"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert worker_environment()["MALLOC_TRIM_THRESHOLD_"] == "131072"
