"""The benchmark harnesses keep the interface other tools call (arguments and JSON keys)."""

import json
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
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "quality_tabular.py"),
            "--data-dir",
            str(data),
            "--seeds",
            "0,1",
            "--detectors",
            "autoencoder,deep_svdd",
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
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
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "quality_tabular.py"),
            "--data-dir",
            str(tmp_path),
            "--datasets",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
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
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run_under_load.py"),
            "--repeats",
            "1",
            "--command",
            f"{sys.executable} {fake_run}",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "loaded / idle (medians):" in run.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["fit_s"] for r in runs["idle"] + runs["loaded"]] == [{"vae": 1.5}, {"vae": 1.5}]
    assert all(r["wall_s"] > 0 for r in runs["idle"] + runs["loaded"])
