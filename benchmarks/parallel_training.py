"""Candidates fitted one after another vs on a local Dask cluster (`train.parallel.backend:
dask`), inside the real train flow, on a table of >= 10k rows and on a small one (digits).

    python benchmarks/parallel_training.py [--data PATH.npz] [--workers 2] [--repeats 2]
        [--epochs N] [--candidates A,B] [--same-project]
        [--out benchmarks/results/parallel_training.json]

Each run is `normalcy train` in a fresh temporary project (a git repo with params.yaml's
settings, its own MLflow store and DVC remote), so it pays what a user's first run pays; with
`--same-project` every run of a table is in one project, as a scheduled retraining is, so a
run submits its candidates longest first by the previous run's fit seconds. The large
table is ADBench's 23_mammography (11183 x 6, from ../shared/data/tabular) when it is there,
otherwise a generated Gaussian table of the same size with 2.3% shifted rows (the output says
which). Sequential and parallel runs alternate, so load on a shared machine hits both alike.

Measured per run, from the flow's own log: the training step ("N candidates fitted in S s":
every candidate with its preprocessing variants, and with dask the wait for the cluster, which
the flow starts in the background before it prepares the data), the cluster's start-up (how
long training still waited for it, and how early it was requested), each candidate's fit
seconds; and the whole command's wall time. `--epochs` lowers the epoch cap to keep runs short;
`--candidates` replaces params.yaml's list (both for quick checks, not for the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from run_under_load import FIT_LINE

REPO = Path(__file__).resolve().parents[1]
MAMMOGRAPHY = REPO.parent / "shared" / "data" / "tabular" / "23_mammography.npz"
ROWS, COLUMNS, ANOMALY_SHARE = 11183, 6, 0.023
MODES = ("sequential", "dask")
MODEL_NAME = "normalcy-parallel-benchmark"
TRAINED = re.compile(r"(\d+) candidates fitted in ([\d.]+) s")
# "candidate 3/9 done: vae on worker tcp://127.0.0.1:41803 (started +4.12 s): val_auprc = 0.36
# (0.41 s)", all variants
DONE = re.compile(
    r"candidate \d+/\d+ done: (\w+) on worker \S+ \(started \+[\d.]+ s\): \S+ = \S+ \(([\d.]+) s\)"
)
READY = re.compile(r"dask cluster ready in ([\d.]+) s \(requested ([\d.]+) s before training\)")


def generated_table(path: Path, seed: int = 0) -> Path:
    """A Gaussian table the size of mammography, with a shifted 2.3%, as an npz at `path`."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(ROWS, COLUMNS)).astype(np.float32)
    y = (rng.random(ROWS) < ANOMALY_SHARE).astype(int)
    X[y == 1] += 3.0
    np.savez(path, X=X, y=y)
    return path


def new_project(folder: Path, overrides: dict) -> Path:
    """A git repo at `folder` (made once) holding params.yaml: the repo's, with `overrides` per
    section."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    if not (folder / ".git").exists():
        folder.mkdir(parents=True)
        for command in (["git", "init", "-q"], ["git", "config", "user.email", "b@example.com"]):
            subprocess.run(command, cwd=folder, check=True)
        subprocess.run(["git", "config", "user.name", "benchmark"], cwd=folder, check=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def timed_flow(project: Path) -> dict:
    """One `normalcy train` in `project`: wall seconds and what its log says."""
    load_before = os.getloadavg()[0]  # other work on the machine shows here
    started = time.perf_counter()
    command = [str(Path(sys.executable).parent / "normalcy"), "train", "--params", "params.yaml"]
    result = subprocess.run(command, cwd=project, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"normalcy train failed in {project}:\n{result.stderr[-3000:]}")
    log = result.stdout + result.stderr
    _, training = TRAINED.search(log).groups()
    ready = READY.search(log)
    fits: dict[str, float] = {}
    for name, seconds in FIT_LINE.findall(log):  # a candidate's variants add up
        fits[name] = fits.get(name, 0.0) + float(seconds)
    fits.update({name: float(seconds) for name, seconds in DONE.findall(log)})  # from workers
    return {
        "wall_s": wall,
        "training_s": float(training),
        "load_before": load_before,
        "cluster_wait_s": float(ready.group(1)) if ready else None,
        "cluster_requested_before_s": float(ready.group(2)) if ready else None,
        "fits": fits,
    }


def timed_runs(
    data: dict, train: dict, workers: int, repeats: int, folder: Path, same_project: bool
) -> dict:
    """Alternating sequential and dask flows on the same data and candidates, each in a fresh
    project, or all in one (`same_project`: a retraining reads the last run's fit seconds)."""
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        for mode in MODES:
            parallel = {"backend": mode, "workers": workers if mode == "dask" else None}
            overrides = {
                "data": data,
                "train": {**train, "parallel": parallel},
                "mlflow": {"model_name": MODEL_NAME},  # not the lock of a real 'normalcy' run
            }
            name = "project" if same_project else f"{mode}-{repeat}"
            project = new_project(folder / name, overrides)
            runs[mode].append(timed_flow(project))
            print(f"run {repeat + 1}/{repeats} {mode}: {runs[mode][-1]}", flush=True)
    keys = ("wall_s", "training_s")
    medians = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in MODES}
    # On a shared machine other work only ever adds time: the fastest runs show the cost of
    # each mode itself (as timeit's minimum does); the medians are printed beside them.
    fastest = {m: {k: min(r[k] for r in runs[m]) for k in keys} for m in MODES}
    return {
        "runs": runs,
        "medians": medians,
        "fastest": fastest,
        "fastest_training_ratio": ratio(
            fastest["dask"]["training_s"], fastest["sequential"]["training_s"]
        ),
        "training_ratio": ratio(medians["dask"]["training_s"], medians["sequential"]["training_s"]),
        "flow_ratio": ratio(medians["dask"]["wall_s"], medians["sequential"]["wall_s"]),
    }


def ratio(dask: float, sequential: float) -> float:
    """dask / sequential, NaN when the sequential step took no measurable time."""
    return dask / sequential if sequential > 0 else float("nan")


def print_table(name: str, measured: dict) -> None:
    print(f"\n{name}")
    print("| mode | training step s (median; runs) | flow s (median; runs) | cluster wait s |")
    print("|---|---|---|---|")
    for mode in MODES:
        runs, median = measured["runs"][mode], measured["medians"][mode]
        training = ", ".join(f"{r['training_s']:.1f}" for r in runs)
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        waits = ", ".join(
            f"{r['cluster_wait_s']:.1f} (requested {r['cluster_requested_before_s']:.1f} s early)"
            for r in runs
            if r["cluster_wait_s"] is not None
        )
        print(
            f"| {mode} | {median['training_s']:.1f}; {training} | {median['wall_s']:.1f}; "
            f"{walls} | {waits or '-'} |"
        )
    loads = {m: ", ".join(f"{r['load_before']:.1f}" for r in measured["runs"][m]) for m in MODES}
    print(f"load average before each run: {loads}")
    print(
        f"ratio dask / sequential: training step {measured['training_ratio']:.2f} (medians), "
        f"{measured['fastest_training_ratio']:.2f} (fastest runs); "
        f"whole flow {measured['flow_ratio']:.2f} (medians)"
    )
    print("| candidate | sequential fit s | dask fit s |")
    print("|---|---|---|")
    for candidate in measured["runs"]["sequential"][0]["fits"]:
        seconds = [
            statistics.median(r["fits"].get(candidate, float("nan")) for r in measured["runs"][m])
            for m in MODES
        ]
        print(f"| {candidate} | {seconds[0]:.1f} | {seconds[1]:.1f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=MAMMOGRAPHY, help="npz with X, y")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode (alternating)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap (params.yaml's)")
    parser.add_argument("--candidates", default=None, help="comma-separated (params.yaml's)")
    parser.add_argument(
        "--same-project",
        action="store_true",
        help="every run of a table in one project, as scheduled retraining runs (each run then "
        "submits candidates longest first by the previous run's fit seconds)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/parallel_training.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train = {} if args.epochs is None else {"epochs": args.epochs}
    if args.candidates is not None:
        train["candidates"] = args.candidates.split(",")
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    candidates = train.get("candidates", defaults["candidates"])
    epochs = args.epochs or defaults["epochs"]
    print(f"candidates: {candidates}, epoch cap {epochs}, {args.workers} workers")
    print("timings on a shared 2-core machine: noisy; compare the ratios, not the seconds")
    with tempfile.TemporaryDirectory() as folder:
        if args.data.exists():
            large, source = args.data, args.data.name
        else:
            large = generated_table(Path(folder) / "generated.npz")
            source = f"generated Gaussian table {ROWS} x {COLUMNS} ({args.data} is absent)"
        tables = {source: {"source": "npz", "path": str(large)}, "digits (small)": {}}
        measured = {
            name: timed_runs(
                data, train, args.workers, args.repeats, Path(folder) / str(i), args.same_project
            )
            for i, (name, data) in enumerate(tables.items())
        }
    for name, table in measured.items():
        print_table(name, table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"epochs": args.epochs, "same_project": args.same_project, "tables": measured}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
