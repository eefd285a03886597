"""Candidates fitted one after another vs as Prefect tasks on a local Dask cluster
(`train.parallel.backend: dask`), on a table of >= 10k rows and on a small one (digits).

    python benchmarks/parallel_training.py [--data PATH.npz] [--workers 2] [--repeats 2]
        [--epochs N] [--out benchmarks/results/parallel_training.json]

The large table is ADBench's 23_mammography (11183 x 6, from ../shared/data/tabular) when it is
there, otherwise a generated Gaussian table of the same size with 2.3% shifted rows (the output
says which). Both go through normalcy's prepare step (the same splits as `normalcy train`), and
fit params.yaml's candidates with its train settings (`--epochs` lowers the epoch cap to keep
the run short). Sequential and parallel runs alternate, inside one Prefect flow, so load on a
shared machine hits both alike. A parallel run's wall time includes starting its cluster (the
real cost of a run); the start-up time is also shown on its own. Per-candidate fit times are
each candidate's `fit_seconds` (all its preprocessing variants)."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from normalcy.config import DataParams, PrepareParams, TrainParams, load_params
from normalcy.data.sources import load_dataset
from normalcy.data.splits import Splits, split_dataset
from normalcy.pipeline import parallel, train

REPO = Path(__file__).resolve().parents[1]
MAMMOGRAPHY = REPO.parent / "shared" / "data" / "tabular" / "23_mammography.npz"
ROWS, COLUMNS, ANOMALY_SHARE = 11183, 6, 0.023


class ClusterStartups(logging.Handler):
    """Collects the seconds of each 'dask cluster ready' log line of normalcy.pipeline.parallel."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("dask cluster ready"):
            self.seconds.append(float(record.args[0]))


def generated_table(path: Path, seed: int = 0) -> Path:
    """A Gaussian table the size of mammography, with a shifted 2.3%, as an npz at `path`."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(ROWS, COLUMNS)).astype(np.float32)
    y = (rng.random(ROWS) < ANOMALY_SHARE).astype(int)
    X[y == 1] += 3.0
    np.savez(path, X=X, y=y)
    return path


def table_splits(data: DataParams) -> Splits:
    return split_dataset(load_dataset(data), PrepareParams())


def timed_runs(splits: Splits, params: TrainParams, workers: int, repeats: int) -> dict:
    """Alternating sequential and parallel fits of the same candidates: wall times, cluster
    start-ups and per-candidate fit seconds of each mode."""
    dask = params.model_copy(
        update={
            "parallel": params.parallel.model_copy(update={"backend": "dask", "workers": workers})
        }
    )
    dask = TrainParams.model_validate(dask.model_dump())
    startups = ClusterStartups()
    logging.getLogger(parallel.__name__).setLevel(logging.INFO)  # the start-up line is INFO
    logging.getLogger(parallel.__name__).addHandler(startups)
    runs: dict[str, dict[str, list]] = {
        mode: {"wall_s": [], "fits": []} for mode in ("sequential", "dask")
    }
    for _ in range(repeats):
        for mode, mode_params in (("sequential", params), ("dask", dask)):
            started = time.perf_counter()
            _, results, _ = train.fit_candidates(splits.train, splits.val, mode_params)
            runs[mode]["wall_s"].append(time.perf_counter() - started)
            runs[mode]["fits"].append({r.name: r.fit_seconds for r in results})
    logging.getLogger(parallel.__name__).removeHandler(startups)
    sequential = statistics.median(runs["sequential"]["wall_s"])
    in_parallel = statistics.median(runs["dask"]["wall_s"])
    return {
        "train_rows": len(splits.train.X),
        "columns": int(splits.train.X.shape[1]),
        "runs": runs,
        "cluster_startup_s": startups.seconds,
        "sequential_wall_s": sequential,
        "dask_wall_s": in_parallel,
        "ratio": in_parallel / sequential,
    }


def print_table(name: str, measured: dict) -> None:
    print(f"\n{name}: {measured['train_rows']} training rows x {measured['columns']} columns")
    print("| mode | wall s (median) | runs | cluster start-up s |")
    print("|---|---|---|---|")
    startups = ", ".join(f"{s:.1f}" for s in measured["cluster_startup_s"])
    for mode in ("sequential", "dask"):
        walls = ", ".join(f"{s:.1f}" for s in measured["runs"][mode]["wall_s"])
        startup = startups if mode == "dask" else "-"
        print(f"| {mode} | {measured[f'{mode}_wall_s']:.1f} | {walls} | {startup} |")
    print(f"ratio dask / sequential: {measured['ratio']:.2f}")
    print("| candidate | sequential fit s | dask fit s |")
    print("|---|---|---|")
    for candidate in measured["runs"]["sequential"]["fits"][0]:
        seconds = [
            statistics.median(fits[candidate] for fits in measured["runs"][mode]["fits"])
            for mode in ("sequential", "dask")
        ]
        print(f"| {candidate} | {seconds[0]:.1f} | {seconds[1]:.1f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MAMMOGRAPHY, help="npz with X, y")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode (alternating)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap (params.yaml's)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/parallel_training.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from prefect import flow

    args = parse_args(argv)
    params = load_params(REPO / "params.yaml").train
    if args.epochs is not None:
        params = params.model_copy(update={"epochs": args.epochs})
    print(f"candidates: {params.candidates}, epochs cap {params.epochs}, workers {args.workers}")
    print("timings on a shared 2-core machine: noisy; compare the ratios, not the seconds")
    with tempfile.TemporaryDirectory() as folder:
        if args.data.exists():
            large, source = args.data, f"{args.data.name}"
        else:
            large = generated_table(Path(folder) / "generated.npz")
            source = f"generated Gaussian table {ROWS} x {COLUMNS} ({args.data} is absent)"
        tables = {
            source: DataParams(source="npz", path=str(large)),
            "digits (small)": DataParams(),
        }

        @flow(name="parallel-training-benchmark")
        def measure_all() -> dict:
            return {
                name: timed_runs(table_splits(data), params, args.workers, args.repeats)
                for name, data in tables.items()
            }

        measured = measure_all()
    for name, table in measured.items():
        print_table(name, table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": params.epochs, "tables": measured}, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":  # the Dask workers are spawned processes that import this module
    main()
