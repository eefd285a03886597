"""benchmarks/speed_explanations.py keeps its interface (arguments and JSON keys)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_speed_explanations_measures_with_and_without_contributions(tmp_path):
    out = tmp_path / "explanations.json"
    script = REPO / "benchmarks" / "speed_explanations.py"
    argv = ["--detectors", "deep_svdd", "--features", "4", "--rows", "300", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["detector"] == "deep_svdd" and row["n_features"] == 4
    assert row["rows_per_s_with"] > 0 and row["slowdown"] > 0  # timing: no ratio is promised
