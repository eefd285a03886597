"""`normalcy score --explain K` and `POST /score` with `"explain": K`: each row's top-K features
by contribution, named from the model's metadata, for files that call the contributions
`feature_contributions` and for older files that call them `feature_errors`; a model without
them, or K outside 1..d, is refused before any work (exit 2, one line; HTTP 422).

The models are the small onnx.helper graph of test_scoring_outputs (contributions = x^2), with
its contributions output renamed; no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pandas as pd
import pytest

from normalcy.artifact.names import FEATURE_CONTRIBUTIONS_NAME
from normalcy.cli import main
from normalcy.scoring.explanations import top_features
from tests.test_scoring_outputs import FEATURES, toy_model_proto


def renamed_contributions(name: str) -> onnx.ModelProto:
    """The toy graph with its `contributions` output called `name`."""
    model = toy_model_proto()
    for node in model.graph.node:
        node.input[:] = [name if value == "contributions" else value for value in node.input]
        node.output[:] = [name if value == "contributions" else value for value in node.output]
    for output in model.graph.output:
        if output.name == "contributions":
            output.name = name
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("explain")
    paths = {}
    for name in (FEATURE_CONTRIBUTIONS_NAME, "feature_errors", "contributions"):
        paths[name] = root / f"{name}.onnx"
        onnx.save(renamed_contributions(name), str(paths[name]))
    X = np.random.default_rng(0).normal(0, 1.2, size=(30, len(FEATURES))).astype(np.float32)
    batch = root / "batch.csv"
    pd.DataFrame(X, columns=FEATURES).to_csv(batch, index=False)
    return {"paths": paths, "X": X, "batch": batch}


def expected_top(X: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """(feature names, contributions) of each row's k largest x^2, largest first."""
    order = np.argsort(-(X * X), axis=1)[:, :k]
    names = [[FEATURES[j] for j in row] for row in order]
    return names, np.take_along_axis(X * X, order, axis=1)


def test_top_features_ranks_each_row_and_breaks_ties_by_feature_order():
    contributions = np.array([[0.5, 2.0, -1.0], [1.0, 1.0, 3.0]])
    top = top_features(contributions, ["a", "b", "c"], 2)
    assert list(top) == ["top1_feature", "top1_contribution", "top2_feature", "top2_contribution"]
    assert top["top1_feature"].tolist() == ["b", "c"]
    assert top["top2_feature"].tolist() == ["a", "a"]
    assert top["top1_contribution"].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="3 values per row for 2 features"):
        top_features(contributions, ["a", "b"], 1)


@pytest.mark.parametrize("name", [FEATURE_CONTRIBUTIONS_NAME, "feature_errors"])
def test_score_explain_adds_the_top_k_features(models, name, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    argv = ["score", "--model", str(models["paths"][name]), "--input", str(models["batch"])]
    assert main([*argv, "--output", str(out), "--quiet", "--explain", "2"]) == 0
    assert "top1_feature" in capsys.readouterr().out
    result = pd.read_csv(out)
    names, values = expected_top(models["X"], 2)
    assert result[["top1_feature", "top2_feature"]].to_numpy().tolist() == names
    got = result[["top1_contribution", "top2_contribution"]].to_numpy()
    np.testing.assert_allclose(got, values, rtol=1e-6)
    assert f"{name}[3]" in result.columns  # every contribution is still written


@pytest.mark.parametrize(
    ("model", "k", "message"),
    [
        ("contributions", "1", "this model has no per-feature contributions"),
        (FEATURE_CONTRIBUTIONS_NAME, "0", "K must be a whole number from 1 to 4"),
        (FEATURE_CONTRIBUTIONS_NAME, "5", "K must be a whole number from 1 to 4"),
    ],
)
def test_score_explain_refuses_early_with_one_line(models, model, k, message, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    argv = ["score", "--model", str(models["paths"][model]), "--input", "missing.csv"]
    assert main([*argv, "--output", str(out), "--explain", k]) == 2  # before reading the input
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_score_explain_runs_without_torch(models, tmp_path):
    out = tmp_path / "scores.csv"
    model = str(models["paths"][FEATURE_CONTRIBUTIONS_NAME])
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from normalcy.cli import main
argv = ["score", "--model", {model!r}, "--input", {str(models["batch"])!r}]
sys.exit(main([*argv, "--output", {str(out)!r}, "--explain", "1", "--quiet"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    top1 = [row[0] for row in expected_top(models["X"], 1)[0]]
    assert pd.read_csv(out)["top1_feature"].tolist() == top1


def test_post_score_explain_returns_the_top_k_features(models):
    from fastapi.testclient import TestClient

    from normalcy.serving import create_app

    X = models["X"][:5]
    records = [dict(zip(FEATURES, map(float, row), strict=True)) for row in X]
    names, values = expected_top(X, 3)
    for name in (FEATURE_CONTRIBUTIONS_NAME, "feature_errors"):
        with TestClient(create_app(models["paths"][name])) as client:
            body = client.post("/score", json={"records": records, "explain": 3}).json()
            plain = client.post("/score", json={"records": records}).json()
        got_names = np.array([body[f"top{i}_feature"] for i in (1, 2, 3)]).T
        assert got_names.tolist() == names
        got = np.array([body[f"top{i}_contribution"] for i in (1, 2, 3)]).T
        np.testing.assert_allclose(got, values, rtol=1e-6)
        assert "top1_feature" not in plain and plain["score"] == body["score"]


@pytest.mark.parametrize(
    ("model", "k", "message"),
    [
        ("contributions", 1, "this model has no per-feature contributions"),
        (FEATURE_CONTRIBUTIONS_NAME, 0, "K must be a whole number from 1 to 4"),
        (FEATURE_CONTRIBUTIONS_NAME, 5, "K must be a whole number from 1 to 4"),
        (FEATURE_CONTRIBUTIONS_NAME, True, "K must be a whole number from 1 to 4"),
        (FEATURE_CONTRIBUTIONS_NAME, "2", "K must be a whole number from 1 to 4"),
    ],
)
def test_post_score_explain_refuses_with_422(models, model, k, message):
    from fastapi.testclient import TestClient

    from normalcy.serving import create_app

    body = {"instances": models["X"][:2].tolist(), "explain": k}
    with TestClient(create_app(models["paths"][model])) as client:
        response = client.post("/score", json=body)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_score_file_bounds_the_rows_of_one_onnxruntime_run(models, tmp_path, monkeypatch):
    """A leave-feature-out graph runs d + 1 copies of each row, so activations follow the rows
    of one run, not the (larger) reading chunk."""
    import onnxruntime as ort

    from normalcy.scoring import load_session, score_file
    from normalcy.scoring.session import ROWS_PER_RUN

    rows_per_run: list[int] = []
    run = ort.InferenceSession.run

    def counting_run(self, names, feeds, *args, **kwargs):
        rows_per_run.append(len(next(iter(feeds.values()))))
        return run(self, names, feeds, *args, **kwargs)

    session = load_session(models["paths"][FEATURE_CONTRIBUTIONS_NAME])
    X = np.random.default_rng(1).normal(size=(2 * ROWS_PER_RUN + 5, len(FEATURES)))
    np.savez(tmp_path / "big.npz", X=X.astype(np.float32))
    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    result = score_file(
        session, tmp_path / "big.npz", tmp_path / "out.parquet", chunk_rows=len(X), explain=1
    )
    assert result.n_rows == len(X)
    assert max(rows_per_run) == ROWS_PER_RUN and sum(rows_per_run) == len(X)


def test_inspect_says_which_output_explain_ranks(models, capsys):
    assert main(["inspect", str(models["paths"]["feature_errors"])]) == 0
    printed = capsys.readouterr().out
    assert "feature_errors float32 [N, 4] (per-feature contributions; score --explain K" in printed
