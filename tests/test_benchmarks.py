"""The benchmark harnesses keep the interface other tools call (arguments and JSON keys)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def blob_dataset(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(180, 5))
    anomalies = rng.normal(0, 1, size=(20, 5)) + 6.0
    np.savez(path, X=np.vstack([normal, anomalies]), y=np.r_[np.zeros(180), np.ones(20)])


# The checkout's own source and one torch thread, whatever is installed and however many cores.
BENCHMARK_ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def run_benchmark(script: str, *args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT ARGS...` with `BENCHMARK_ENV`, its output captured."""
    command = [sys.executable, str(REPO / "benchmarks" / script), *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=BENCHMARK_ENV
    )


@pytest.mark.integration
def test_quality_tabular_runs_the_pipeline_and_writes_the_documented_json(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    blob_dataset(data / "1_blobs.npz", 0)
    blob_dataset(data / "2_more.npz", 1)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["clean"]["epochs"] = 3
    params["train"]["epochs"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "results.json"
    run = run_benchmark(
        "quality_tabular.py",
        *("--data-dir", data, "--seeds", "0,1", "--detectors", "autoencoder,deep_svdd"),
        *("--params", tmp_path / "params.yaml", "--out", out),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| 1_blobs |" in run.stdout and "**mean**" in run.stdout
    payload = json.loads(out.read_text())
    for column in ("autoencoder", "deep_svdd", "selected", "oracle", "iforest"):
        entry = payload["results"]["1_blobs"][column]
        assert len(entry["auroc"]) == len(entry["auprc"]) == len(entry["fit_seconds"]) == 2
    summary = payload["summary"]
    assert set(summary) == {
        "selected_mean_auroc",
        "iforest_mean_auroc",
        "oracle_mean_auroc",
        "selection_regret",
    }
    assert summary["selected_mean_auroc"] > 0.9  # blobs 6 sd away are easy for every method
    assert summary["selection_regret"] >= 0


@pytest.mark.integration
def test_quality_tabular_refuses_unknown_datasets(tmp_path):
    blob_dataset(tmp_path / "1_blobs.npz", 0)
    run = run_benchmark(
        "quality_tabular.py", "--data-dir", tmp_path, "--datasets", "nope", timeout=120
    )
    assert run.returncode != 0 and "['nope'] not found" in run.stderr


def test_run_under_load_times_both_conditions_and_parses_fit_times(tmp_path):
    fake_run = tmp_path / "fake_run.py"
    fake_run.write_text(
        "import sys\n"
        "print('INFO normalcy.pipeline.train: candidate vae: val_auprc = 0.5 (1.5 s)', "
        "file=sys.stderr)\n"
    )
    out = tmp_path / "load.json"
    run = run_benchmark(
        "run_under_load.py",
        *("--repeats", "1", "--command", f"{sys.executable} {fake_run}", "--out", out),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "loaded / idle (medians):" in run.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["fit_s"] for r in runs["idle"] + runs["loaded"]] == [{"vae": 1.5}, {"vae": 1.5}]
    assert all(r["wall_s"] > 0 for r in runs["idle"] + runs["loaded"])


def test_drift_benchmark_writes_the_issue_s_json_on_tiny_data(tmp_path):
    """Stationary and drifted streams on one tiny table and the generated data; no deep model."""
    data = tmp_path / "tables"
    data.mkdir()
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(1200, 5)), rng.normal(6.0, size=(30, 5))])
    np.savez(data / "1_tiny.npz", X=X, y=np.r_[np.zeros(1200), np.ones(30)])
    out = tmp_path / "drift.json"
    common = ["--stationary-batches", "12", "--drift-streams", "2", "--max-batches", "8"]
    common += ["--batch-rows", "100", "--reference-rows", "250", "--generated-rows", "1500"]
    run = run_benchmark("drift.py", "--data-dir", data, *common, "--out", out, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert {"false_alarm_rate", "n_stationary_batches", "alpha", "detection_delay"} <= set(payload)
    recalibration = payload["recalibration"]
    assert recalibration["target"] == 0.01 and recalibration["score_scale"] == 1.5
    assert 0 <= recalibration["alert_rate_after"] <= 1
    assert payload["invalid_batch_promoted"] is False  # both invalid batches refused, each table
    for table in payload["datasets"].values():
        assert table["recalibration"]["invalid_refused"] == {
            "out_of_range": True,
            "half_anomalies": True,
        }
    assert set(payload["datasets"]) == {"1_tiny", "generated_gaussian", "generated_skewed"}
    assert payload["n_stationary_batches"] == 36 and payload["alpha"] == 0.01
    low, high = payload["false_alarm_interval"]
    assert 0 <= low <= payload["false_alarm_rate"] <= high <= 1
    assert set(payload["detection_delay"]) == {"gradual", "abrupt", "slow", "scale"}
    assert payload["detection_delay"]["abrupt"] is not None  # 0.5 sd shifts are seen
    assert "| 1_tiny | 5 | 12 |" in run.stdout and "overall:" in run.stdout
    assert "1_tiny: 1200 normal rows x 5 features" in run.stderr  # progress on stderr


def test_drift_benchmark_skips_absent_real_data_and_refuses_unknown_tables(tmp_path):
    tiny = ["--stationary-batches", "4", "--drift-streams", "1", "--max-batches", "2"]
    tiny += ["--batch-rows", "50", "--reference-rows", "100", "--generated-rows", "600"]
    run = run_benchmark("drift.py", "--data-dir", tmp_path / "absent", *tiny, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "absent not found: real tables skipped" in run.stderr
    assert "| generated_gaussian |" in run.stdout
    refused = run_benchmark(
        "drift.py", "--data-dir", tmp_path, "--datasets", "nope", *tiny, timeout=300
    )
    assert refused.returncode != 0 and "['nope'] not found" in refused.stderr


def test_cleaning_quality_reports_what_cleaning_removed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    blob_dataset(data / "1_blobs.npz", 0)
    out = tmp_path / "cleaning.json"
    configs = "iforest_mad3.5,iforest+knn_top10"
    run = run_benchmark("cleaning_quality.py", "--data-dir", data, "--seeds", "0", "--out", out,
                        "--configs", configs)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "### recall" in run.stdout and "| 1_blobs |" in run.stdout
    results = json.loads(out.read_text())["results"]["1_blobs"]
    assert set(results) == {"none", "iforest", *configs.split(",")}
    # The blobs' anomalies sit 6 standard deviations away: any sound cleaning finds them all.
    for config in configs.split(","):
        figures = results[config]
        assert figures["recall"] == 1.0 and figures["rate_after"] == 0.0
        assert figures["rate_before"] > 0.05
    assert results["iforest+knn_top10"]["removed"] >= 0.09  # the top 10% of rows, at least


def test_trimming_quality_fits_each_fraction_and_scores_validation_and_test(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    blob_dataset(data / "1_blobs.npz", 0)
    out = tmp_path / "trimming.json"
    run = run_benchmark("trimming_quality.py", "--data-dir", data, "--seeds", "0", "--out", out,
                        "--detectors", "autoencoder", "--fractions", "0,0.1")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| autoencoder |" in run.stdout and "val_auroc" in run.stdout
    payload = json.loads(out.read_text())
    cells = payload["results"]["1_blobs"]["autoencoder"]
    assert set(cells) == {"0.0", "0.1"} and payload["fractions"] == [0.0, 0.1]
    for cell in cells.values():
        # anomalies 6 standard deviations out; params.yaml's autoencoder (a latent of 8 for 5
        # features) can nearly copy its input, yet still ranks them well above chance
        assert cell["val_auroc"][0] > 0.8 and cell["test_auroc"][0] > 0.8


@pytest.mark.slow
@pytest.mark.integration
def test_parallel_training_times_the_real_flow_both_ways(tmp_path):
    """Four real `normalcy train` runs (a small table and digits, sequential and dask): the
    training step, the flow, the cluster's early start and every candidate's fit are read."""
    rng = np.random.default_rng(0)
    table = tmp_path / "small.npz"
    np.savez(table, X=rng.normal(size=(800, 4)).astype(np.float32), y=rng.random(800) < 0.05)
    out = tmp_path / "parallel.json"
    run = run_benchmark(
        "parallel_training.py",
        *("--data", table, "--repeats", "1", "--epochs", "1", "--candidates", "iforest,pca"),
        *("--out", out),
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ratio dask / sequential: training step" in run.stdout
    tables = json.loads(out.read_text())["tables"]
    assert list(tables) == ["small.npz", "digits (small)"]
    for measured in tables.values():
        for mode in ("sequential", "dask"):
            (only,) = measured["runs"][mode]
            assert 0 < only["training_s"] < only["wall_s"]
            assert set(only["fits"]) == {"iforest", "pca"}
            assert only["load_before"] >= 0
            assert measured["fastest"][mode]["training_s"] == only["training_s"]
        assert measured["runs"]["dask"][0]["cluster_requested_before_s"] > 0
        assert measured["runs"]["sequential"][0]["cluster_wait_s"] is None


def test_cleaning_headroom_fits_on_contaminated_cleaned_and_normal_rows(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    blob_dataset(data / "1_blobs.npz", 0)
    params = tmp_path / "params.yaml"
    wide = {"k_fraction": 0.2, "preprocessing": "minmax"}  # k above the 10% contamination
    clean = {"detector": "knn", "detector_params": wide, "mad_threshold": 2.5}
    params.write_text(yaml.safe_dump({"clean": clean}))
    out = tmp_path / "headroom.json"
    run = run_benchmark("cleaning_headroom.py", "--data-dir", data, "--seeds", "0",
                        "--params", params, "--out", out)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| 1_blobs |" in run.stdout
    (row,) = json.loads(out.read_text())
    for member in ("iforest", "knn", "consensus"):
        for training_set in ("contaminated", "cleaned", "normal"):
            assert 0.0 <= row[f"{member}/{training_set}"] <= 1.0
    # anomalies 6 standard deviations away: cleaning removes them all, the normal rows are clean
    assert row["rate_before"] > 0.05 and row["rate_after"] == 0.0 and row["recall"] == 1.0
    assert row["knn/cleaned"] == row["knn/normal"] == 1.0
