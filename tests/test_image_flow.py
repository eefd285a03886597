"""Integration: the real train flow with examples/images.yaml on a tiny synthetic MVTec-layout
folder, with a real Prefect API, DVC, GX, MLflow and onnxruntime; the candidate is a small
map-emitting test detector. Then `normalcy score` on image folders, with maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from normalcy.cli import main
from normalcy.data.mvtec import load_mvtec
from normalcy.scoring import load_session, score_outputs
from tests.conftest import REPO_ROOT
from tests.image_folders import make_mvtec_folder
from tests.pixel_detector import NAME
from tests.test_flows import client_for, git_repo
from tests.test_scoring_outputs import run_without_torch

EXAMPLE = REPO_ROOT / "examples" / "images.yaml"


def write_example_params(root: Path, folder: Path) -> None:
    """The documented example params, on the tiny folder at 32 px with the map-emitting test
    detector as the one candidate (the example's own runs in test_image_pipeline)."""
    params = yaml.safe_load(EXAMPLE.read_text())
    params["data"].update({"path": str(folder), "image_size": 32})
    params["train"] = {"candidates": [NAME]}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, prefect_harness):
    from normalcy.flows.train import train_flow

    root = git_repo(tmp_path_factory.mktemp("image_project"))
    folder = make_mvtec_folder(
        tmp_path_factory.mktemp("images") / "tile",
        n_train=40,
        n_test_good=12,
        defects={"cut": 8, "hole": 8},
        sizes=((32, 32), (36, 40)),
    )
    write_example_params(root, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        summary = train_flow("params.yaml")
    return root, summary


@pytest.mark.slow
@pytest.mark.integration
def test_image_flow_registers_a_model_with_pixel_metrics(image_run):
    root, summary = image_run
    assert summary["winner"] == NAME and summary["model_version"] == "1"
    assert 0.5 < summary["test_pixel_auroc"] <= 1 and 0 < summary["test_aupro"] <= 1
    run = client_for(root).get_run(summary["mlflow_run_id"])
    for key in ("test_pixel_auroc", "test_aupro", "test_cut_image_auroc", "test_hole_image_auroc"):
        assert key in run.data.metrics, key
    assert run.data.metrics["test_pixel_auroc"] == pytest.approx(summary["test_pixel_auroc"])
    client = client_for(root)
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    assert any("cut_highest_1" in path for path in overlays)
    assert any("good_lowest_1" in path for path in overlays)
    evaluation = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert "evaluation/per_defect.json" in evaluation


@pytest.mark.slow
@pytest.mark.integration
def test_image_flow_versions_masks_and_exports_the_map(image_run):
    root, summary = image_run
    with np.load(root / "data" / "prepared" / "test.npz") as test:
        assert test["masks"].shape[1:] == (32, 32) and set(test["defects"]) >= {"cut", "hole"}
        assert test["X"].dtype == np.uint8  # pixels stored as bytes
        X = test["X"].astype(np.float32)
    assert (root / "data" / "prepared.dvc").exists()
    session = load_session(str(root / summary["onnx_path"]))
    names = [output.name for output in session.get_outputs()]
    assert "anomaly_map" in names
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: X}), strict=True))
    assert outputs["anomaly_map"].shape == (len(X), 32, 32)
    cleaning = (root / "artifacts" / "cleaning_log.json").read_text()
    assert "defect-free by construction" in cleaning


@pytest.fixture(scope="module")
def image_model(image_run):
    """(model path, the folder of the run's defect images, their raw sizes differ)."""
    root, summary = image_run
    folder = Path(yaml.safe_load((root / "params.yaml").read_text())["data"]["path"])
    return root / summary["onnx_path"], folder


@pytest.mark.slow
@pytest.mark.integration
def test_score_resizes_an_image_folder_and_writes_heatmaps(image_model, tmp_path, capsys):
    model, folder = image_model
    images = folder / "test" / "cut"
    out, maps = tmp_path / "scores.csv", tmp_path / "maps"
    argv = ["score", "--model", str(model), "--input", str(images), "--output", str(out)]
    assert main([*argv, "--maps", str(maps), "--quiet"]) == 0
    assert "resized to 32x32" in capsys.readouterr().err
    result = pd.read_csv(out)
    names = sorted(p.name for p in images.iterdir())
    assert result["file"].tolist() == names
    # the same scores as the training-side loader's pixels give the graph
    loaded = load_mvtec(folder, "test", image_size=32)
    rows = [list(loaded.ids).index(f"test/cut/{name}") for name in names]
    expected = score_outputs(str(model), loaded.X[rows])
    np.testing.assert_allclose(result["score"], expected["score"], rtol=1e-6)
    pngs = sorted(p.name for p in maps.glob("*.png"))
    assert pngs == [Path(name).with_suffix(".png").name for name in names]
    assert Image.open(maps / pngs[0]).size == (32, 32)
    scale = json.loads((maps / "scale.json").read_text())
    assert scale["low"] == pytest.approx(expected["anomaly_map"].min(), rel=1e-5)
    assert scale["high"] == pytest.approx(expected["anomaly_map"].max(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_score_writes_raw_maps_to_npz(image_model, tmp_path):
    model, folder = image_model
    images = folder / "test" / "hole"
    out, maps = tmp_path / "scores.parquet", tmp_path / "maps.npz"
    argv = ["score", "--model", str(model), "--input", str(images), "--output", str(out)]
    assert main([*argv, "--maps", str(maps), "--quiet"]) == 0
    with np.load(maps) as archive:
        assert archive["maps"].shape == (len(list(images.iterdir())), 32, 32)
        assert archive["ids"].tolist() == pd.read_parquet(out)["file"].tolist()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "other.txt").write_text("keep me")
    assert main([*argv, "--maps", str(taken), "--quiet"]) == 2
    assert (taken / "other.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.integration
def test_image_folder_scores_with_maps_without_torch(image_model, tmp_path):
    model, folder = image_model
    argv = ["score", "--model", str(model), "--input", str(folder / "test" / "good")]
    maps = tmp_path / "maps"
    done = run_without_torch([*argv, "--output", "s.csv", "--maps", str(maps)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "torch loaded: False" in done.stdout
    assert len(list(maps.glob("*.png"))) == len(list((folder / "test" / "good").iterdir()))
