"""Wall time of `make run` on an idle machine and while busy loops hold every core.

Runs alternate (idle, loaded, idle, loaded, ...) so that both conditions see the same machine
state; the table gives each run's wall time, the loaded/idle ratio of the medians, and each
candidate's fit time as the training log reports it ("candidate NAME: ... (S s)").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# "candidate knn: val_auprc = 0.92 (0.1 s)", or one line per preprocessing variant of a candidate
FIT_LINE = re.compile(r"candidate (\w+)(?: \(preprocessing \w+\))?: \S+ = \S+ \(([\d.]+) s\)")
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def start_busy_loops(cpus: list[int]) -> list[subprocess.Popen]:
    """One pure-Python spinning process pinned to each CPU: a neighbour that never yields."""
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cpu)]) for cpu in cpus]


def timed_run(command: list[str]) -> dict:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    fits: dict[str, float] = {}
    for name, seconds in FIT_LINE.findall(result.stderr):  # a candidate's variants add up
        fits[name] = fits.get(name, 0.0) + float(seconds)
    return {"wall_s": wall, "fit_s": fits}


def run_both(command: list[str], repeats: int, cpus: list[int]) -> dict:
    runs: dict[str, list[dict]] = {"idle": [], "loaded": []}
    for repeat in range(repeats):
        runs["idle"].append(timed_run(command))
        print(f"run {repeat + 1}/{repeats} idle: {runs['idle'][-1]['wall_s']:.1f} s", flush=True)
        loops = start_busy_loops(cpus)
        try:
            runs["loaded"].append(timed_run(command))
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
        print(
            f"run {repeat + 1}/{repeats} loaded: {runs['loaded'][-1]['wall_s']:.1f} s", flush=True
        )
    return runs


def print_table(runs: dict, cpus: list[int]) -> None:
    idle = statistics.median(run["wall_s"] for run in runs["idle"])
    loaded = statistics.median(run["wall_s"] for run in runs["loaded"])
    names = list(runs["idle"][0]["fit_s"])
    print(f"\n{len(cpus)} busy loops pinned to CPUs {cpus}; medians over {len(runs['idle'])} runs")
    print(
        "| condition | wall s (each run) | median | "
        + " | ".join(f"{n} fit s" for n in names)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(names))
    for condition in ("idle", "loaded"):
        walls = ", ".join(f"{run['wall_s']:.1f}" for run in runs[condition])
        median = statistics.median(run["wall_s"] for run in runs[condition])
        fits = [
            statistics.median(run["fit_s"].get(n, float("nan")) for run in runs[condition])
            for n in names
        ]
        print(
            f"| {condition} | {walls} | {median:.1f} | "
            + " | ".join(f"{f:.1f}" for f in fits)
            + " |"
        )
    print(f"\nloaded / idle (medians): {loaded / idle:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--command", default="make run", help="what to time (run in the repo root)")
    parser.add_argument("--out", type=Path, help="write every run as JSON")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    timed_run(args.command.split())  # warm-up: page cache, .venv, first MLflow/DVC setup
    runs = run_both(args.command.split(), args.repeats, cpus)
    print_table(runs, cpus)
    if args.out:
        args.out.write_text(json.dumps({"cpus": cpus, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
