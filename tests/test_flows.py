"""Integration: the real flows on small data, with a real Prefect API (test harness), a temp
MLflow sqlite store, a temp git+DVC repo with a local remote, real GX and real onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from normalcy.artifact.calibration_head import graph_calibration
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.scoring import load_session, read_metadata, score_onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
# One cheap candidate: these tests are about the flows, not about selection (test_pipeline.py).
FAST = {
    "train": {"epochs": 4, "patience": 3, "candidates": ["autoencoder"]},
    "clean": {"epochs": 3, "max_iter": 2},
}
LOOSE_INT8 = [
    "export.quantize=true",
    "export.quantized_max_rel=100",
    "export.quantized_min_spearman=-1",
    "export.quantized_min_agreement=0.01",
]


def write_params(root: Path, updates: dict) -> Path:
    """params.yaml = the repo's defaults merged with `updates`, with MLflow in the temp repo."""
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for section, values in updates.items():
        base.setdefault(section, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for command in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@example.com"],
        ["git", "config", "user.name", "test"],
    ):
        subprocess.run(command, cwd=path, check=True)
    return path


HEAD_OUTPUTS = ["score", "is_anomaly", "p_value"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_harness):
    """One real training run in a temp git repo; yields (repo, summary). Tests that use it only
    read it: a test that trains again or recalibrates makes its own project (`train_project`)."""
    from normalcy.flows.train import train_flow

    root = git_repo(tmp_path_factory.mktemp("project"))
    write_params(root, FAST)
    with pytest.MonkeyPatch.context() as patch:  # in the project only while it trains
        patch.chdir(root)
        summary = train_flow("params.yaml")
    return root, summary


def train_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str] | None = None
) -> tuple[Path, dict]:
    """A project of this test's own (temp git repo, MLflow store, DVC remote) with one training
    run done in it; the current folder is the project."""
    from normalcy.flows.train import train_flow

    root = _fresh_project(tmp_path, {"versioning": {"enabled": False}}, monkeypatch)
    return root, train_flow("params.yaml", overrides)


def first_threshold(root: Path, summary: dict) -> float:
    """The threshold the module's first flow run logged to MLflow."""
    return client_for(root).get_run(summary["mlflow_run_id"]).data.metrics["threshold"]


def client_for(root: Path) -> MlflowClient:
    """A client of this project's store. The registry URI is set too: MLflow keeps the one an
    earlier flow set process-wide, and a client would otherwise read another test's registry."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


@pytest.mark.slow
@pytest.mark.integration
def test_training_flow_registers_champion_with_dvc_tag_and_parity(trained, monkeypatch):
    root, summary = trained
    for key in (
        "winner",
        "test_auroc",
        "test_auprc",
        "threshold",
        "target_fpr",
        "data_version",
        "mlflow_run_id",
        "model_name",
        "model_version",
        "onnx_path",
    ):
        assert key in summary, key
    assert (root / "artifacts" / "summary.json").exists()
    # the registered alias: the first model becomes champion
    client = client_for(root)
    champion = client.get_model_version_by_alias(summary["model_name"], "champion")
    assert str(champion.version) == str(summary["model_version"]) == "1"
    assert summary["promoted"] is True
    # the DVC tag is the md5 DVC recorded, and the data reached the local remote
    dvc_file = yaml.safe_load((root / "data" / "prepared.dvc").read_text())
    md5 = dvc_file["outs"][0]["md5"]
    assert md5.endswith(".dir") and summary["data_version"] == md5
    assert client.get_run(summary["mlflow_run_id"]).data.tags["data_version"] == md5
    assert any((root / ".dvc-remote").rglob("*")), "nothing was pushed to the DVC remote"
    # ONNX alone reproduces the summary's AUROC on the test split
    with np.load(root / "data" / "prepared" / "test.npz") as test:
        scores, flags = score_onnx(root / summary["onnx_path"], test["X"])
        assert ranking_metrics(test["y"], scores)["auroc"] == pytest.approx(
            summary["test_auroc"], abs=1e-6
        )
    assert np.array_equal(flags, scores > np.float32(summary["threshold"]))
    metadata = read_metadata(str(root / summary["onnx_path"]))
    assert metadata["data_version"] == md5 and metadata["mlflow_run_id"] == summary["mlflow_run_id"]
    assert metadata["input"]["feature_names"][0] == "pixel_0_0"
    # the metadata an ops team reads: every field, with the registry version written in
    assert metadata["model_name"] == "normalcy" and metadata["model_version"] == 1
    assert metadata["detector"] == summary["winner"] and metadata["detector_params"]
    assert metadata["input"] == {
        "name": "input",
        "dtype": "float32",
        "shape": ["N", 64],
        "feature_names": [f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
    }
    # the autoencoder explains each score with its per-feature reconstruction errors
    assert [o["name"] for o in metadata["outputs"]] == [*HEAD_OUTPUTS, "feature_contributions"]
    assert metadata["outputs"][-1]["shape"] == ["N", 64]
    assert metadata["threshold"] == pytest.approx(summary["threshold"])
    assert metadata["target_fpr"] == summary["target_fpr"] == 0.01
    threshold, calibration = graph_calibration(root / summary["onnx_path"])
    assert threshold == np.float32(summary["threshold"])
    assert metadata["n_calibration_scores"] == metadata["n_p_value_scores"] == len(calibration)
    assert metadata["opset"] == 18 and metadata["normalcy_version"]
    assert metadata["decision_rule"] == "is_anomaly = score > threshold"
    # the registered file is the local one, metadata and all
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri="models:/normalcy/1", dst_path=tmp)
        (registered_file,) = Path(local).glob("*.onnx")
        assert read_metadata(str(registered_file)) == metadata
    # p_value from the graph is the conformal formula over the stored calibration scores
    with np.load(root / "data" / "prepared" / "test.npz") as test:
        session = load_session(root / summary["onnx_path"])
        score, p_value = session.run(["score", "p_value"], {"input": test["X"].astype(np.float32)})
    expected = (1 + (calibration[None, :] >= score[:, None]).sum(axis=1)) / (len(calibration) + 1)
    np.testing.assert_allclose(p_value, expected, rtol=1e-6)
    # what the run logged
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    assert {"plots", "validation", "cleaning", "reference", "parity", "model_card"} <= artifacts
    run_id = summary["mlflow_run_id"]
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/model_card/metadata.json") == metadata
    card = mlflow.artifacts.load_text(f"runs:/{run_id}/model_card/model_card.md")
    assert card.startswith("# Model card: normalcy v1") and "## How to score it" in card
    assert client.get_model_version("normalcy", "1").description == card
    parity = mlflow.artifacts.load_dict(f"runs:/{run_id}/parity/parity.json")
    assert parity["passed"]
    assert parity["outputs_compared"] == [*HEAD_OUTPUTS, "feature_contributions"]
    assert summary["int8_onnx_path"] is None and summary["int8_passed"] is None  # quantize: false
    plots = {Path(a.path).name for a in client.list_artifacts(summary["mlflow_run_id"], "plots")}
    assert {"roc_pr_test.png", "scores_test.png"} <= plots


@pytest.mark.slow
@pytest.mark.integration
def test_second_run_goes_through_the_promotion_gate(tmp_path, prefect_harness, monkeypatch):
    from normalcy.flows.train import train_flow

    root, first = train_project(tmp_path, monkeypatch)
    assert first["model_version"] == "1"
    summary = train_flow("params.yaml", ["train.epochs=1", "clean.enabled=false", *LOOSE_INT8])
    client = client_for(root)
    version = client.get_model_version(summary["model_name"], summary["model_version"])
    assert summary["model_version"] == "2"
    # the INT8 twin passed its (loose) gate: logged beside version 2, with version 2's metadata
    assert summary["int8_passed"] is True
    int8_file = root / summary["int8_onnx_path"]
    assert int8_file.name == "model.int8.onnx" and int8_file.is_file()
    run_id = summary["mlflow_run_id"]
    assert version.tags["int8_artifact"] == f"runs:/{run_id}/model_int8/model.int8.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        twin = mlflow.artifacts.download_artifacts(version.tags["int8_artifact"], dst_path=tmp)
        twin_meta = read_metadata(twin)
    float_meta = read_metadata(str(root / summary["onnx_path"]))
    assert twin_meta == {**float_meta, "quantized": "int8"} and twin_meta["model_version"] == 2
    int8_parity = mlflow.artifacts.load_dict(f"runs:/{run_id}/parity/parity_int8.json")
    assert int8_parity["passed"] and int8_parity["tolerances"]["quantized_max_rel"] == 100
    print(
        "INT8 parity (flow, second run):",
        {
            k: int8_parity[k]
            for k in ("spearman", "is_anomaly_agreement", "max_rel_diff", "max_p_value_diff")
        },
    )
    assert "challenger" in version.aliases
    champion = client.get_model_version_by_alias(summary["model_name"], "champion")
    expected_champion = "2" if summary["promoted"] else "1"
    assert str(champion.version) == expected_champion
    assert version.tags["promotion_reason"] == summary["promotion_reason"]
    # decided on the holdout against version 1, with the evidence on the version and in its card
    assert version.tags["promotion_champion_version"] == "1"
    assert version.tags["promotion_metric_name"].startswith("holdout_")
    assert ".." in version.tags["promotion_metric_delta_interval"]
    assert "## Promotion" in version.description
    assert version.tags["promotion_metric_delta_interval"] in version.description


@pytest.mark.slow
@pytest.mark.integration
def test_feature_drift_folds_the_batch_into_the_window_and_retrains_once(
    tmp_path, prefect_harness, monkeypatch
):
    from normalcy.flows.monitor import monitor_flow

    root, _ = train_project(tmp_path, monkeypatch)
    rows_before = prepared_rows(root)
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    rows = [np.load(root / "data" / "prepared" / f"{split}.npz") for split in ("val", "test")]
    normal = np.concatenate([r["X"][r["y"] == 0] for r in rows])
    pd.DataFrame(normal * 0.8, columns=names).to_csv(root / "dimmed.csv", index=False)
    retrain = ["monitor.retrain_on_drift=true", "data.window_dir=data/window"]
    result = monitor_flow("dimmed.csv", "params.yaml", retrain)
    assert result["features_drifted"] > 0 and result["recalibration"] is None
    retraining = result["retraining"]
    assert retraining["model_version"] == "2" and retraining["folded"].startswith("data/window")
    (folded,) = (root / "data" / "window").glob("batch-*.npz")
    with np.load(folded) as window:
        n_folded = len(window["X"])
    assert 0 < n_folded <= len(normal)  # the vetted rows only
    assert prepared_rows(root) == rows_before + n_folded  # the retraining learnt from them
    again = monitor_flow("dimmed.csv", "params.yaml", retrain)
    assert "already in the training window" in again["retraining"]["skipped"]
    client = client_for(root)
    assert len(client.search_model_versions("name='normalcy'")) == 2  # one retraining, not two


def prepared_rows(root: Path) -> int:
    """Rows in the prepared data of the project's last run, every split, before capping."""
    meta = json.loads((root / "data" / "prepared" / "meta.json").read_text())
    return sum(meta["rows"].values()) + meta["dropped_train_anomalies"] + meta["dropped_duplicates"]


@pytest.mark.slow
@pytest.mark.integration
def test_monitor_detects_drift_and_recalibrates(tmp_path, prefect_harness, monkeypatch):
    from normalcy.flows.monitor import monitor_flow

    # a champion with an INT8 twin, so recalibration must hand a recalibrated twin on
    root, _ = train_project(tmp_path, monkeypatch, LOOSE_INT8)
    client = client_for(root)
    before = client.get_model_version_by_alias("normalcy", "champion")
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    with np.load(root / "data" / "prepared" / "test.npz") as test:
        garbage = pd.DataFrame(np.clip(test["X"] * 1.6 + 2.0, 0, 40), columns=names)
    garbage.to_csv(root / "garbage.csv", index=False)
    # values far beyond the training range: drift, but the batch must not become the new normal
    refused = monitor_flow("garbage.csv", "params.yaml")
    assert refused["drifted"] and refused["validation_passed"] is False
    assert "Great Expectations suite" in refused["recalibration"]["refused"]
    assert client.get_model_version_by_alias("normalcy", "champion").version == before.version
    assert len(client.search_model_versions("name='normalcy'")) == 1  # nothing registered
    # normal rows whose intensities dimmed by 20%: in range, drifted, a moved score scale
    rows = [np.load(root / "data" / "prepared" / f"{split}.npz") for split in ("val", "test")]
    normal = np.concatenate([r["X"][r["y"] == 0] for r in rows])
    pd.DataFrame(normal * 0.8, columns=names).to_csv(root / "shifted.csv", index=False)
    result = monitor_flow("shifted.csv", "params.yaml", ["recalibrate.min_rows=100"])
    assert result["drifted"] and result["features_drifted"] > 0
    recalibration = result["recalibration"]
    assert recalibration["promoted"] is True and recalibration["estimated_contamination"] < 0.05
    assert recalibration["threshold"] != pytest.approx(recalibration["old_threshold"])
    after = client.get_model_version_by_alias("normalcy", "champion")
    assert int(after.version) > int(before.version)
    assert after.tags["recalibrated_from_version"] == str(before.version)
    recalibrated = root / "artifacts" / "model.recalibrated.onnx"
    meta = read_metadata(str(recalibrated))
    assert meta["threshold"] == pytest.approx(recalibration["threshold"])
    # the new version's file names itself, and carries the batch's kept scores for p_value
    assert meta["model_version"] == int(after.version)
    assert meta["recalibrated_from_version"] == str(before.version)
    _, calibration = graph_calibration(recalibrated)
    assert len(calibration) == meta["n_p_value_scores"] == meta["n_calibration_scores"]
    assert [o["name"] for o in meta["outputs"]] == [*HEAD_OUTPUTS, "feature_contributions"]
    card = client.get_model_version("normalcy", after.version).description
    assert card.startswith(f"# Model card: normalcy v{after.version}")
    assert f"Recalibrated from version {before.version}" in card
    # a champion with an INT8 twin hands a recalibrated twin to its successor
    assert ("int8_artifact" in after.tags) == ("int8_artifact" in before.tags)
    assert "int8_artifact" in before.tags
    twin_uri = after.tags["int8_artifact"]
    with tempfile.TemporaryDirectory() as tmp:
        twin_meta = read_metadata(mlflow.artifacts.download_artifacts(twin_uri, dst_path=tmp))
    assert twin_meta["threshold"] == pytest.approx(recalibration["threshold"])
    assert twin_meta["model_version"] == int(after.version)
    assert (root / "artifacts" / "drift_report.json").exists()
    assert (root / "artifacts" / "drift_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["validation_passed"] is True
    # the recalibrated champion carries the batch as its new reference: the same batch is normal now
    again = monitor_flow("shifted.csv", "params.yaml", ["monitor.recalibrate_on_drift=false"])
    assert again["champion_version"] == str(after.version)
    assert again["features_drifted"] == 0 and not again["score_shifted"]
    assert again["recalibration"] is None
    # only the alert rate may still fire: it counts the anomalies the batch holds (the test
    # split's ~10%, flagged by the new threshold), whatever the reference
    assert set(again["families_fired"]) <= {"alert_rate"}


@pytest.mark.slow
@pytest.mark.integration
def test_monitor_rejects_batch_with_other_columns(trained, monkeypatch):
    from normalcy.data.sources import DataError
    from normalcy.flows.monitor import monitor_flow

    root, _ = trained
    monkeypatch.chdir(root)
    versions_before = len(client_for(root).search_model_versions("name='normalcy'"))
    pd.DataFrame({"pixel_0_0": [1.0], "temperature": [3.0]}).to_csv(root / "wrong.csv", index=False)
    with pytest.raises(DataError, match="columns differ from the model's"):
        monitor_flow("wrong.csv", "params.yaml")
    assert len(client_for(root).search_model_versions("name='normalcy'")) == versions_before


def _fresh_project(tmp_path: Path, updates: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = git_repo(tmp_path / "project")
    write_params(root, {**FAST, **updates})
    monkeypatch.chdir(root)
    return root


def _registered_versions(root: Path) -> int:
    if not (root / "mlflow.db").exists():
        return 0
    return len(client_for(root).search_model_versions("name='normalcy'"))


@pytest.mark.slow
@pytest.mark.integration
def test_nan_in_features_fails_before_training_and_registers_nothing(
    tmp_path, prefect_harness, monkeypatch
):
    from normalcy.data.sources import DataError
    from normalcy.flows.train import train_flow

    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(60, 3)), columns=["a", "b", "c"])
    frame.loc[7, "b"] = np.nan
    frame.to_csv(tmp_path / "data.csv", index=False)
    root = _fresh_project(
        tmp_path, {"data": {"source": "csv", "path": str(tmp_path / "data.csv")}}, monkeypatch
    )
    with pytest.raises(DataError, match=r"NaN/inf values in 1 feature\(s\) \(first: \['b'\]"):
        train_flow("params.yaml")
    assert _registered_versions(root) == 0
    assert not (root / "artifacts" / "model.onnx").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_failed_validation_stops_the_flow_and_saves_the_report(
    tmp_path, prefect_harness, monkeypatch
):
    """Anomalies far outside the training range land only in val/test: GX must stop the flow."""
    from normalcy.flows.train import train_flow
    from normalcy.pipeline.validate import DataValidationFailed

    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 3))
    y = np.zeros(150, dtype=int)
    X[:30, 0], y[:30] = 1e6, 1
    np.savez(tmp_path / "data.npz", X=X, y=y)
    root = _fresh_project(
        tmp_path,
        {
            "data": {"source": "npz", "path": str(tmp_path / "data.npz")},
            "prepare": {"train_contamination": 0.0},
        },
        monkeypatch,
    )
    with pytest.raises(DataValidationFailed, match="x0"):
        train_flow("params.yaml")
    assert (root / "artifacts" / "validation_report.json").exists()
    assert _registered_versions(root) == 0
    assert not (root / "artifacts" / "winner.pt").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_parity_failure_registers_nothing_and_says_why(tmp_path, prefect_harness, monkeypatch):
    from normalcy.export import ParityError
    from normalcy.flows.train import train_flow

    root = _fresh_project(
        tmp_path,
        {
            "export": {"parity_max_abs": 1e-30, "parity_max_rel": 1e-30},
            "versioning": {"enabled": False},
        },
        monkeypatch,
    )
    with pytest.raises(ParityError, match="exceeds parity_max_abs"):
        train_flow("params.yaml")
    assert _registered_versions(root) == 0
    assert not (root / "artifacts" / "model.onnx").exists()
    assert (root / "artifacts" / "model.rejected.onnx").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_unlabelled_data_uses_the_label_free_criterion(tmp_path, prefect_harness, monkeypatch):
    """No labels anywhere: selection, promotion and the summary still work, without test AUROC."""
    from sklearn.datasets import load_digits

    from normalcy.flows.train import train_flow

    digits = load_digits()
    np.savez(tmp_path / "unlabelled.npz", X=digits.data[digits.target < 5])
    root = _fresh_project(
        tmp_path,
        {
            "data": {"source": "npz", "path": str(tmp_path / "unlabelled.npz")},
            "versioning": {"enabled": False},
            "train": {**FAST["train"], "candidates": ["knn", "autoencoder"]},
        },
        monkeypatch,
    )
    impossible_int8 = [
        "export.quantize=true",
        "export.quantized_max_rel=1e-12",
        "export.quantized_min_spearman=1.0",
        "export.quantized_min_agreement=1.0",
    ]
    summary = train_flow("params.yaml", impossible_int8)
    # the INT8 twin is refused; the float model is registered regardless
    assert summary["int8_passed"] is False and summary["int8_onnx_path"] is None
    assert (root / "artifacts" / "model.int8.rejected.onnx").exists()
    assert not (root / "artifacts" / "model.int8.onnx").exists()
    client = client_for(root)
    assert "int8_artifact" not in client.get_model_version("normalcy", "1").tags
    refused = mlflow.artifacts.load_dict(
        f"runs:/{summary['mlflow_run_id']}/parity/parity_int8.json"
    )
    assert refused["passed"] is False
    assert summary["selection_metric"] == "val_synthetic_auroc"
    assert 0.5 < summary["selection_value"] <= 1.0
    assert summary["test_auroc"] is None and summary["promoted"] is True
    assert "holdout_synthetic_auroc" in summary["promotion_reason"]
    assert (root / "artifacts" / "model.onnx").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_images_train_export_and_monitor(tmp_path, prefect_harness, monkeypatch):
    """Digits as (n, 1, 8, 8) images through the whole flow, then a monitor check."""
    from normalcy.flows.monitor import monitor_flow
    from normalcy.flows.train import train_flow

    root = _fresh_project(
        tmp_path, {"data": {"as_images": True}, "versioning": {"enabled": False}}, monkeypatch
    )
    summary = train_flow("params.yaml")
    metadata = read_metadata(str(root / summary["onnx_path"]))
    assert metadata["input"]["shape"] == ["N", 1, 8, 8]
    with np.load(root / "data" / "prepared" / "test.npz") as test:
        assert test["X"].shape[1:] == (1, 8, 8)
        scores, _ = score_onnx(root / summary["onnx_path"], test["X"])
        assert ranking_metrics(test["y"], scores)["auroc"] == pytest.approx(
            summary["test_auroc"], abs=1e-6
        )
        np.savez(root / "batch.npz", X=test["X"][test["y"] == 0])
    result = monitor_flow("batch.npz", "params.yaml", ["monitor.recalibrate_on_drift=false"])
    assert result["recalibration"] is None
    assert result["features_drifted"] == 0  # held-out normal images: same distribution


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_reproduces_the_flow(trained, tmp_path):
    """`dvc repro` in a copy of the project runs the same stage functions as the flow, so with
    the same params it reaches the same threshold and test metrics."""
    import json
    import shutil

    root, summary = trained
    repo = REPO_ROOT
    clone = git_repo(tmp_path / "clone")
    for name in ("src", "flows"):
        shutil.copytree(repo / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(repo / name, clone / name)
    shutil.copy(root / "params.yaml", clone / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=clone, check=True, env=env)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (clone / "artifacts" / "model.onnx").exists() and (clone / "dvc.lock").exists()
    metrics = json.loads((clone / "artifacts" / "metrics.json").read_text())
    flow_metrics = json.loads((root / "artifacts" / "metrics.json").read_text())
    # the flow's run logged the same threshold as the stages reached
    assert metrics["threshold"] == pytest.approx(first_threshold(root, summary), rel=1e-5)
    assert set(metrics) == set(flow_metrics)


@pytest.mark.slow
@pytest.mark.integration
def test_deployments_exist_with_their_cron_schedules(prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client

    from normalcy.config import load_params
    from normalcy.flows.deploy import build_deployments

    params = load_params(
        Path(__file__).resolve().parents[1] / "params.yaml",
        ["schedule.monitor_cron=*/15 * * * *", "schedule.timezone=Europe/Paris"],
    )
    for deployment in build_deployments(params):
        deployment.apply()

    async def read() -> dict[str, list[str]]:
        async with get_client() as client:
            found, limits = {}, {}
            for name in ("normalcy-monitor/monitor", "normalcy-train/train"):
                deployment = await client.read_deployment_by_name(name)
                found[name] = [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules]
                limits[name] = deployment.global_concurrency_limit.limit
            return found, limits

    found, limits = asyncio.run(read())
    assert limits == {"normalcy-monitor/monitor": 1, "normalcy-train/train": 1}
    assert found["normalcy-monitor/monitor"] == [("*/15 * * * *", "Europe/Paris")]
    assert found["normalcy-train/train"] == [(params.schedule.train_cron, "Europe/Paris")]


def this_checkout_env() -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's normalcy from any
    folder (a relative PYTHONPATH=src would not follow it there)."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_cli_reports_bad_params_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "normalcy.cli", "train", "--set", "train.candidates=[nope]"],
        cwd=tmp_path,
        env=this_checkout_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "unknown detector 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_monitor_without_champion_says_to_train_first(tmp_path, prefect_harness, monkeypatch):
    from normalcy.errors import NoChampionError
    from normalcy.flows.monitor import monitor_flow

    _fresh_project(tmp_path, {}, monkeypatch)
    pd.DataFrame({"pixel_0_0": [0.0]}).to_csv(tmp_path / "project" / "batch.csv", index=False)
    with pytest.raises(NoChampionError, match="run `normalcy train` first"):
        monitor_flow("batch.csv", "params.yaml")


def test_two_recalibrations_never_run_at_once(tmp_path):
    from normalcy.errors import RecalibrationBusy
    from normalcy.recalibration import exclusive

    lock = tmp_path / "recalibrate.lock"
    with exclusive(lock):
        with pytest.raises(RecalibrationBusy, match="another recalibration holds"):
            with exclusive(lock):
                pass
    with exclusive(lock):  # released after the first one ended
        assert lock.exists()


def test_monitor_and_recalibrate_flows_import_no_torch_and_src_imports_no_flows():
    """Monitor and recalibrate only read ONNX graphs: an ops host without torch can run them.
    And layers point one way: nothing in src/normalcy imports the flows (cli starts them)."""
    code = (
        "import sys\n"
        "import normalcy.flows.monitor, normalcy.flows.recalibrate\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('normalcy.detectors')]\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=this_checkout_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stdout
    src = REPO_ROOT / "src" / "normalcy"
    importers = [
        path.relative_to(src).as_posix()
        for path in src.rglob("*.py")
        if "flows" not in path.relative_to(src).parts[:1]
        and path.name != "cli.py"
        and "normalcy.flows" in path.read_text()
    ]
    assert importers == []
