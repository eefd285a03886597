"""Integration: the real train flow on a tiny synthetic MVTec-layout folder, with a real Prefect
API, DVC, GX, MLflow and onnxruntime; the candidate is a small map-emitting test detector."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.scoring import load_session
from tests.image_folders import make_mvtec_folder
from tests.pixel_detector import NAME
from tests.test_flows import client_for, git_repo, write_params

IMAGE_PARAMS = {
    "train": {"candidates": [NAME]},
    "data": {"source": "mvtec", "image_size": 32},
}


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
    params = {**IMAGE_PARAMS, "data": {**IMAGE_PARAMS["data"], "path": str(folder)}}
    write_params(root, params)
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
        X = test["X"]
    assert (root / "data" / "prepared.dvc").exists()
    session = load_session(str(root / summary["onnx_path"]))
    names = [output.name for output in session.get_outputs()]
    assert "anomaly_map" in names
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: X}), strict=True))
    assert outputs["anomaly_map"].shape == (len(X), 32, 32)
    cleaning = (root / "artifacts" / "cleaning_log.json").read_text()
    assert "defect-free by construction" in cleaning
