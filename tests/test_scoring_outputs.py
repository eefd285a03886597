"""Every graph output, whatever its name, comes back from `normalcy score`, `POST /score` and
`normalcy inspect`; and a host without torch scores `models:/normalcy@champion` from the store
that params.yaml names, with no tracking flag or variable.

The model is a small ONNX graph built here with onnx.helper (no torch): besides score,
is_anomaly and p_value it has two explanation outputs, `contributions` [N, d] float32 (each
feature's share of the score) and `nearest_row` [N] int64 (the closest stored normal row).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from normalcy.cli import main
from normalcy.scoring import (
    DECISION_NAME,
    METADATA_KEY,
    P_VALUE_NAME,
    SCORE_NAME,
    load_session,
    score_outputs,
    store_uris,
    table_columns,
    tracking_uri_for_source,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["a", "b", "c", "d"]
NORMAL_ROWS = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [3, 0, 0, 3]], dtype=np.float32)
THRESHOLD = 2.5
EXPLANATIONS = ("contributions", "nearest_row")


def toy_model_proto() -> onnx.ModelProto:
    """score = sum(x^2), is_anomaly = score > THRESHOLD, p_value = 1 / (1 + score),
    contributions = x^2 [N, 4], nearest_row = argmin over NORMAL_ROWS of the distance [N]."""
    d = len(FEATURES)
    nodes = [
        helper.make_node("Mul", ["input", "input"], ["contributions"]),
        helper.make_node("ReduceSum", ["contributions", "axis1"], ["score"], keepdims=0),
        helper.make_node("Greater", ["score", "threshold"], ["is_anomaly"]),
        helper.make_node("Add", ["score", "one"], ["one_plus_score"]),
        helper.make_node("Div", ["one", "one_plus_score"], ["p_value"]),
        helper.make_node("Unsqueeze", ["input", "axis1"], ["rows"]),
        helper.make_node("Sub", ["rows", "normal_rows"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["diff2"]),
        helper.make_node("ReduceSum", ["diff2", "axis2"], ["distance"], keepdims=0),
        helper.make_node("ArgMin", ["distance"], ["nearest_row"], axis=1, keepdims=0),
    ]
    constants = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array(THRESHOLD, dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(NORMAL_ROWS, "normal_rows"),
    ]
    outputs = [
        helper.make_tensor_value_info(SCORE_NAME, TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info(DECISION_NAME, TensorProto.BOOL, ["N"]),
        helper.make_tensor_value_info(P_VALUE_NAME, TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("contributions", TensorProto.FLOAT, ["N", d]),
        helper.make_tensor_value_info("nearest_row", TensorProto.INT64, ["N"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", d])],
        outputs,
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dtypes = {TensorProto.FLOAT: "float32", TensorProto.BOOL: "bool", TensorProto.INT64: "int64"}
    metadata = {
        "detector": "toy",
        "input": {
            "name": "input",
            "dtype": "float32",
            "shape": ["N", d],
            "feature_names": FEATURES,
        },
        "outputs": [
            {
                "name": o.name,
                "dtype": dtypes[o.type.tensor_type.elem_type],
                "shape": [dim.dim_value or dim.dim_param for dim in o.type.tensor_type.shape.dim],
            }
            for o in outputs
        ],
        "threshold": THRESHOLD,
    }
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(model)
    return model


def expected_outputs(X: np.ndarray) -> dict[str, np.ndarray]:
    """What the toy graph computes, in numpy."""
    contributions = X * X
    score = contributions.sum(axis=1)
    distance = ((X[:, None, :] - NORMAL_ROWS[None]) ** 2).sum(axis=2)
    return {
        SCORE_NAME: score,
        DECISION_NAME: score > THRESHOLD,
        P_VALUE_NAME: 1 / (1 + score),
        "contributions": contributions,
        "nearest_row": distance.argmin(axis=1),
    }


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    path = root / "toy.onnx"
    onnx.save(toy_model_proto(), str(path))
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1.2, size=(40, len(FEATURES))).astype(np.float32)
    return {"path": path, "X": X, "expected": expected_outputs(X)}


def assert_explanations(got: dict, expected: dict) -> None:
    np.testing.assert_allclose(np.asarray(got["contributions"]), expected["contributions"], 1e-6)
    np.testing.assert_array_equal(np.asarray(got["nearest_row"]), expected["nearest_row"])


def test_score_outputs_carries_every_output(toy) -> None:
    outputs = score_outputs(load_session(toy["path"]), toy["X"], chunk_rows=7)
    assert list(outputs) == [SCORE_NAME, DECISION_NAME, P_VALUE_NAME, *EXPLANATIONS]
    assert outputs["contributions"].shape == (40, 4) and outputs["nearest_row"].dtype == np.int64
    assert_explanations(outputs, toy["expected"])
    assert outputs[DECISION_NAME].tolist() == toy["expected"][DECISION_NAME].tolist()
    assert 0 < outputs[DECISION_NAME].sum() < 40  # both decisions occur


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_score_file_writes_explanations_as_columns(toy, tmp_path, suffix, capsys) -> None:
    frame = pd.DataFrame(toy["X"], columns=FEATURES)
    frame.to_csv(tmp_path / "batch.csv", index=False)
    out = tmp_path / f"scores{suffix}"
    argv = ["--model", str(toy["path"]), "--input", str(tmp_path / "batch.csv")]
    assert main(["score", *argv, "--output", str(out), "--quiet", "--chunk-rows", "9"]) == 0
    printed = capsys.readouterr().out
    assert "contributions[0]..contributions[3], nearest_row" in printed
    result = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    contribution_columns = [f"contributions[{k}]" for k in range(len(FEATURES))]
    assert list(result.columns) == [
        "row",
        SCORE_NAME,
        DECISION_NAME,
        P_VALUE_NAME,
        *contribution_columns,
        "nearest_row",
    ]
    assert_explanations(
        {
            "contributions": result[contribution_columns].to_numpy(np.float32),
            "nearest_row": result["nearest_row"].to_numpy(),
        },
        toy["expected"],
    )
    assert result["nearest_row"].dtype == np.int64


def test_table_columns_flatten_each_output_in_c_order() -> None:
    maps = np.arange(2 * 2 * 3).reshape(2, 2, 3)
    columns = table_columns({"score": np.array([0.5, 1.5]), "maps": maps})
    assert list(columns) == ["score", *[f"maps[{i},{j}]" for i in range(2) for j in range(3)]]
    np.testing.assert_array_equal(columns["maps[1,2]"], maps[:, 1, 2])


def test_post_score_returns_every_output(toy) -> None:
    from fastapi.testclient import TestClient

    from normalcy.serving import create_app

    X = toy["X"][:10]
    records = [dict(zip(FEATURES, map(float, row), strict=True)) for row in X]
    expected = expected_outputs(X)
    with TestClient(create_app(toy["path"])) as client:
        for body in ({"records": records}, {"instances": X.tolist()}):
            response = client.post("/score", json=body)
            assert response.status_code == 200, response.text
            result = response.json()
            assert set(result) == {
                SCORE_NAME,
                DECISION_NAME,
                P_VALUE_NAME,
                *EXPLANATIONS,
                "model_version",
            }
            assert len(result["contributions"]) == 10 and len(result["contributions"][0]) == 4
            assert_explanations(result, expected)
            assert result[DECISION_NAME] == expected[DECISION_NAME].tolist()
        response = client.post("/score", json={"instances": X.tolist(), "anomaly_map": True})
        assert response.status_code == 422 and "no 'anomaly_map' output" in response.text
        assert client.get("/metadata").json()["outputs"] == [
            SCORE_NAME,
            DECISION_NAME,
            P_VALUE_NAME,
            *EXPLANATIONS,
        ]


def test_inspect_lists_every_output(toy, capsys) -> None:
    assert main(["inspect", str(toy["path"])]) == 0
    text = capsys.readouterr().out
    for fragment in (
        "output  score float32 [N] (anomaly score)",
        "output  is_anomaly bool [N] (score > threshold)",
        "output  p_value float32 [N] (conformal p-value)",
        "output  contributions float32 [N, 4] (explanation)",
        "output  nearest_row int64 [N] (explanation)",
    ):
        assert fragment in text, (fragment, text)


# --- the registry path without torch ----------------------------------------------------------


def test_tracking_uri_precedence(tmp_path, monkeypatch) -> None:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then params.yaml (relative to its folder)."""
    params_file = tmp_path / "ops" / "params.yaml"
    source = "models:/normalcy@champion"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from_params = tracking_uri_for_source(source, None, "sqlite:///mlflow.db", params_file)
    assert from_params == f"sqlite:///{(tmp_path / 'ops' / 'mlflow.db').resolve().as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri_for_source(source, None, "sqlite:///mlflow.db", params_file) == (
        "http://env:5000"
    )
    assert tracking_uri_for_source(source, "http://flag:5000", "x", params_file) == (
        "http://flag:5000"
    )
    assert tracking_uri_for_source("model.onnx", "http://flag:5000", "x", params_file) is None


def register_champion(onnx_path: Path, work: Path) -> str:
    """Register `onnx_path` as `normalcy@champion` in the store params.yaml in `work` names
    (its defaults: sqlite:///mlflow.db and mlartifacts/ in that folder), with MLflow's own
    client; returns the version. MLflow's global tracking URI is restored afterwards."""
    import mlflow
    from mlflow import MlflowClient

    from normalcy.config import load_serving_params

    params = load_serving_params(work / "params.yaml").mlflow
    uri, artifacts = store_uris(params.tracking_uri, params.artifact_location, work)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = MlflowClient(uri, uri)
        experiment = client.create_experiment(params.experiment, artifact_location=artifacts)
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name="model",
                save_as_external_data=False,
                pip_requirements=["onnxruntime"],
                registered_model_name=params.model_name,
            )
        version = str(info.registered_model_version)
        client.set_registered_model_alias(params.model_name, "champion", version)
        return version
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def run_without_torch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`normalcy ARGV` in a fresh process where `import torch` fails and no MLflow tracking
    variable is set, from `cwd`."""
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "from normalcy.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('torch loaded:', sys.modules.get('torch') is not None)\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO_ROOT / "src")
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_champion_scores_without_torch_from_the_params_store(toy, tmp_path) -> None:
    work = tmp_path / "ops"
    work.mkdir()
    shutil.copy(REPO_ROOT / "params.yaml", work / "params.yaml")
    version = register_champion(toy["path"], work)
    assert (work / "mlflow.db").is_file() and (work / "mlartifacts").is_dir()
    pd.DataFrame(toy["X"], columns=FEATURES).to_csv(work / "batch.csv", index=False)

    inspected = run_without_torch(["inspect", "models:/normalcy@champion"], work)
    assert inspected.returncode == 0, inspected.stderr
    assert f"models:/normalcy@champion (version {version})" in inspected.stdout
    assert "contributions float32 [N, 4] (explanation)" in inspected.stdout
    assert "torch loaded: False" in inspected.stdout

    argv = ["--model", "models:/normalcy@champion", "--quiet"]
    scored = run_without_torch(
        ["score", *argv, "--input", "batch.csv", "--output", "scores.csv"], work
    )
    assert scored.returncode == 0, scored.stderr
    assert f"with models:/normalcy@champion version {version}" in scored.stdout
    assert "torch loaded: False" in scored.stdout
    result = pd.read_csv(work / "scores.csv")
    np.testing.assert_allclose(result[SCORE_NAME], toy["expected"][SCORE_NAME], rtol=1e-6)
    np.testing.assert_array_equal(result["nearest_row"], toy["expected"]["nearest_row"])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = run_without_torch(["inspect", "models:/normalcy@champion"], elsewhere)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"no MLflow store at {elsewhere.resolve() / 'mlflow.db'}" in missing.stderr
    assert not (elsewhere / "mlflow.db").exists()  # looking did not create an empty store
