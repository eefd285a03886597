"""benchmarks/speed_explanations.py keeps its interface (arguments and JSON keys)."""

import json

from tests.test_benchmarks import run_benchmark


def test_speed_explanations_measures_with_and_without_contributions(tmp_path):
    out = tmp_path / "explanations.json"
    argv = ["--detectors", "deep_svdd", "--features", "4", "--rows", "300", "--out", out]
    run = run_benchmark("speed_explanations.py", *argv, timeout=300)
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["detector"] == "deep_svdd" and row["n_features"] == 4
    assert row["rows_per_s_with"] > 0 and row["slowdown"] > 0  # timing: no ratio is promised
