"""ONNX export, parity and torch-free scoring, with real torch export and real onnxruntime."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from sklearn.datasets import load_digits
from torch import nn

from normalcy.artifact.calibration_head import graph_calibration, subsample_calibration
from normalcy.artifact.recalibration import recalibrate_graph
from normalcy.detectors import create_detector
from normalcy.detectors.base import Prediction
from normalcy.export import (
    ParityError,
    export_onnx,
    parity_check,
    quantize_int8,
    quantized_parity_check,
    require_parity,
)
from normalcy.export.parity import p_value_mismatches
from normalcy.scoring import load_session, read_metadata, score_onnx

TOLERANCES = {"max_abs": 1e-4, "max_rel": 1e-3, "min_agreement": 1.0}
METHODS = ["autoencoder", "deep_svdd", "icl"]
OUTPUTS = ["score", "is_anomaly", "p_value"]


def numpy_p_values(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """The conformal p-value, written out independently of normalcy.export."""
    s = np.asarray(scores, dtype=np.float32)
    c = np.asarray(calibration, dtype=np.float32)
    return np.array([(1 + np.sum(c >= v)) / (len(c) + 1) for v in s])


def run_all(path: Path, X: np.ndarray) -> dict[str, np.ndarray]:
    session = load_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": X}), strict=True))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().data.astype(np.float32)


@pytest.fixture(scope="module")
def exported(digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each method trained briefly and exported once, into a directory that does not exist yet."""
    root = tmp_path_factory.mktemp("export")
    models = {}
    for method in METHODS:
        detector = create_detector(method, epochs=3).fit(digits)
        module = detector.scoring_module()
        scores = detector.score(digits)
        threshold = float(np.quantile(scores, 0.9))
        calibration = scores[::7]  # some of the rows scored below are calibration rows: ties
        path = root / "not" / "yet" / f"{method}.onnx"
        metadata = {"detector": method, "threshold": threshold, "n_features": 64}
        export_onnx(
            module, threshold, digits[:32], path, metadata=metadata, calibration_scores=calibration
        )
        explanations = _explanation_specs(module, digits[:2])
        models[method] = {
            "outputs": [*OUTPUTS, *(spec["name"] for spec in explanations)],
            "module": module,
            "threshold": threshold,
            "calibration": calibration,
            "path": path,
            "metadata": {
                **metadata,
                "outputs": [
                    {"name": "score", "dtype": "float32", "shape": ["N"]},
                    {"name": "is_anomaly", "dtype": "bool", "shape": ["N"]},
                    {"name": "p_value", "dtype": "float32", "shape": ["N"]},
                    *explanations,
                ],
                "n_p_value_scores": len(calibration),
            },
        }
    return models


def _explanation_specs(module: nn.Module, X: np.ndarray) -> list[dict]:
    """The outputs a method adds after the calibration head (its explanations), as metadata."""
    with torch.no_grad():
        outputs = module(torch.from_numpy(X)).named_outputs()
    return [
        {"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": ["N", *t.shape[1:]]}
        for name, t in outputs.items()
        if name != "score"
    ]


def _torch_scores(module: nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(X)).score.numpy()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", METHODS)
def test_export_is_one_file_with_named_io_and_dynamic_batch(exported: dict, method: str) -> None:
    path = exported[method]["path"]
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f"{m}.onnx" for m in METHODS)
    model = onnx.load(str(path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == exported[method]["outputs"]
    initializers = {t.name for t in model.graph.initializer}
    assert "threshold" in initializers
    assert "TreeEnsembleRegressor" in {n.op_type for n in model.graph.node}  # the p-value count
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [64]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_rows", [1, 7, 100])
def test_onnx_scores_match_torch_for_any_batch(
    exported: dict, digits: np.ndarray, method: str, n_rows: int
) -> None:
    entry = exported[method]
    X = digits[-n_rows:]
    score, is_anomaly = score_onnx(entry["path"], X, batch_size=64)
    assert score.dtype == np.float32 and score.shape == (n_rows,)
    assert is_anomaly.dtype == np.bool_ and is_anomaly.shape == (n_rows,)
    np.testing.assert_allclose(score, _torch_scores(entry["module"], X), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(is_anomaly, score > np.float32(entry["threshold"]))


@pytest.mark.parametrize("method", METHODS)
def test_parity_passes_for_the_exported_model(
    exported: dict, digits: np.ndarray, method: str
) -> None:
    entry = exported[method]
    report = parity_check(
        entry["module"],
        entry["threshold"],
        entry["path"],
        digits,
        **TOLERANCES,
        batch_size=500,
        calibration_scores=entry["calibration"],
    )
    assert report.passed, report.message()
    assert report.outputs_compared == entry["outputs"] and report.missing_outputs == []
    assert report.n_p_value_mismatches == 0
    assert report.max_abs_diff <= 1e-4
    assert report.n_rows == len(digits)
    assert report.is_anomaly_agreement == 1.0
    assert report.spearman > 0.999
    assert "passed" in report.message()
    require_parity(report)
    assert json.loads(json.dumps(report.to_dict()))["tolerances"]["parity_max_abs"] == 1e-4


def test_parity_fails_against_a_different_model(exported: dict, digits: np.ndarray) -> None:
    # The autoencoder's graph has an explanation output that deep_svdd's lacks: the file whose
    # outputs are a subset is the one compared, so the report is about the scores.
    other = exported["autoencoder"]
    report = parity_check(
        other["module"],
        other["threshold"],
        exported["deep_svdd"]["path"],
        digits,
        **TOLERANCES,
        calibration_scores=other["calibration"],
    )
    assert not report.passed
    assert report.n_score_mismatches > 0
    assert report.max_abs_diff > 1e-4
    message = report.message()
    assert "FAILED" in message and "parity_max_abs" in message and "exceeds" in message
    with pytest.raises(ParityError) as raised:
        require_parity(report)
    assert raised.value.report is report
    assert "parity_max_abs" in str(raised.value)


def test_parity_fails_when_only_the_decisions_differ(exported: dict, digits: np.ndarray) -> None:
    entry = exported["autoencoder"]
    scores = _torch_scores(entry["module"], digits)
    other_threshold = float(np.median(scores))  # the file still compares against the 90% quantile
    report = parity_check(
        entry["module"],
        other_threshold,
        entry["path"],
        digits,
        **TOLERANCES,
        calibration_scores=entry["calibration"],
    )
    assert not report.passed
    assert report.n_score_mismatches == 0 and report.n_p_value_mismatches == 0
    assert 0.2 < report.is_anomaly_agreement < 0.8
    assert "parity_min_agreement" in report.message()
    assert "parity_max_abs" not in report.message()


def test_metadata_round_trip(exported: dict, tmp_path: Path) -> None:
    entry = exported["deep_svdd"]
    assert read_metadata(entry["path"]) == entry["metadata"]
    assert read_metadata(load_session(entry["path"])) == entry["metadata"]

    model = onnx.load(str(entry["path"]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    assert read_metadata(bare) == {}


def test_parity_checks_p_values_against_the_given_calibration_scores(
    exported: dict, digits: np.ndarray
) -> None:
    entry = exported["autoencoder"]
    scores = _torch_scores(entry["module"], digits)
    shifted = entry["calibration"] + np.float32(np.std(scores))  # not what the file stores
    report = parity_check(
        entry["module"],
        entry["threshold"],
        entry["path"],
        digits,
        **TOLERANCES,
        calibration_scores=shifted,
    )
    assert not report.passed
    assert report.n_score_mismatches == 0 and report.is_anomaly_agreement == 1.0
    assert report.n_p_value_mismatches > 0
    assert "p_values differ by more than their scores explain" in report.message()
    with pytest.raises(ValueError, match=r"pass calibration_scores to check p_value"):
        parity_check(entry["module"], entry["threshold"], entry["path"], digits, **TOLERANCES)


def test_p_value_is_the_conformal_formula_with_ties(tmp_path: Path) -> None:
    """Identity scoring: the graph's p_value equals the numpy formula, ties included."""
    rng = np.random.default_rng(0)
    calibration = np.round(rng.normal(size=200), 1).astype(np.float32)  # many tied values
    X = np.concatenate(
        [
            calibration[:50],  # exactly tied with calibration scores
            np.round(rng.normal(size=50), 1),  # ties by rounding
            rng.normal(size=50),
            [calibration.min() - 1, calibration.max(), calibration.max() + 1],
        ]
    ).astype(np.float32)[:, None]
    path = export_onnx(
        FirstColumn(), 0.5, X[:2], tmp_path / "p.onnx", calibration_scores=calibration
    )
    out = run_all(path, X)
    assert out["p_value"].dtype == np.float32 and out["p_value"].shape == (len(X),)
    np.testing.assert_allclose(out["p_value"], numpy_p_values(X[:, 0], calibration), rtol=1e-6)
    n = len(calibration)
    counts = np.rint(out["p_value"].astype(np.float64) * (n + 1)) - 1
    np.testing.assert_array_equal(counts, (calibration[None, :] >= X[:, :1]).sum(axis=1))
    assert out["p_value"][-3] == pytest.approx(1.0)  # below every calibration score
    ties_at_max = int((calibration == calibration.max()).sum())
    assert out["p_value"][-2] == pytest.approx((1 + ties_at_max) / (n + 1))  # ties count
    assert out["p_value"][-1] == pytest.approx(1 / (n + 1))  # above every calibration score
    report = parity_check(FirstColumn(), 0.5, path, X, **TOLERANCES, calibration_scores=calibration)
    assert report.passed and report.max_p_value_diff == 0.0, report.message()


def test_without_calibration_scores_there_is_no_p_value(tmp_path: Path) -> None:
    X = np.random.default_rng(1).normal(size=(9, 3)).astype(np.float32)
    path = export_onnx(FirstColumn(), 0.0, X[:2], tmp_path / "bare.onnx")
    assert list(run_all(path, X)) == ["score", "is_anomaly"]
    assert "n_p_value_scores" not in read_metadata(path)
    report = parity_check(FirstColumn(), 0.0, path, X, **TOLERANCES)
    assert report.passed and report.outputs_compared == ["score", "is_anomaly"], report.message()
    # the head can be added later without torch, as for a file from before p_value
    upgraded = recalibrate_graph(path, 0.0, X[:4, 0], tmp_path / "upgraded.onnx")
    assert list(run_all(upgraded, X)) == OUTPUTS


def test_p_value_tie_at_the_boundary_is_not_a_mismatch() -> None:
    calibration = np.array([0.0, 1.0, 1.0, 2.0], dtype=np.float32)
    n = len(calibration)

    def p(counts: list[int]) -> np.ndarray:
        return (1 + np.array(counts, dtype=np.float32)) / np.float32(n + 1)

    torch_score = np.array([1.0, 1.0, 0.5, 3.0], dtype=np.float32)
    # row 0: torch ties the two 1.0s (count 3), onnxruntime lands just above them (count 1);
    # row 1: the same scores but another count: a real mismatch; rows 2-3: bit-equal, equal counts
    ort_score = np.array([np.nextafter(np.float32(1.0), np.float32(2.0)), 1.0, 0.5, 3.0])
    bad = p_value_mismatches(torch_score, ort_score, p([3, 3, 3, 0]), p([1, 2, 3, 0]), calibration)
    assert bad.tolist() == [False, True, False, False]


def test_recalibration_swaps_threshold_and_calibration_scores_not_scores(
    exported: dict, digits: np.ndarray, tmp_path: Path
) -> None:
    entry = exported["autoencoder"]
    original_hash = _sha(entry["path"])
    before = run_all(entry["path"], digits)
    assert 0.05 < before["is_anomaly"].mean() < 0.15  # exported at the 90% quantile

    median = float(np.median(before["score"]))
    calibration = before["score"][::3] * np.float32(1.5)
    out = tmp_path / "sub" / "recalibrated.onnx"
    result = recalibrate_graph(
        entry["path"], median, calibration, out, {"reason": "drift", "n_calibration_scores": 600}
    )
    assert result == out

    after = run_all(out, digits)
    assert list(after) == entry["outputs"]
    np.testing.assert_array_equal(after["score"], before["score"])  # bit-identical
    np.testing.assert_array_equal(after["is_anomaly"], after["score"] > np.float32(median))
    assert 0.45 < after["is_anomaly"].mean() <= 0.5
    np.testing.assert_allclose(
        after["p_value"], numpy_p_values(after["score"], calibration), rtol=1e-6
    )
    threshold, stored = graph_calibration(out)
    assert threshold == np.float32(median)
    np.testing.assert_array_equal(stored, np.sort(calibration))  # stored sorted for the lookup
    assert read_metadata(out) == {
        **entry["metadata"],
        "threshold": median,
        "reason": "drift",
        "n_calibration_scores": 600,
        "n_p_value_scores": len(calibration),
    }
    assert _sha(entry["path"]) == original_hash
    assert [p.name for p in out.parent.iterdir()] == ["recalibrated.onnx"]

    # In place, and repeatedly: the head is rewritten, not accumulated; names stay stable.
    size = len(onnx.load(str(out)).graph.node)
    recalibrate_graph(out, float(before["score"].max()), calibration[:10], out)
    again = run_all(out, digits)
    assert not again["is_anomaly"].any()
    np.testing.assert_array_equal(again["score"], before["score"])
    model = onnx.load(str(out))
    assert len(model.graph.node) == size
    names = [t.name for t in model.graph.initializer]
    assert names.count("threshold") == 1 and not any(n.startswith("threshold_") for n in names)
    trees = [n for n in model.graph.node if n.op_type == "TreeEnsembleRegressor"]
    assert [n.name for n in trees] == ["normalcy_head/treeensembleregressor"]
    assert len(graph_calibration(out)[1]) == 10
    with pytest.raises(ValueError, match="non-finite"):
        recalibrate_graph(out, 1.0, np.array([1.0, np.nan]), tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


def test_recalibration_upgrades_a_graph_without_p_value(tmp_path: Path) -> None:
    """A file from before p_value: score -> Greater(score, threshold) only."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["N"]),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("threshold", TensorProto.FLOAT, [], [1.0]),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["input", "axes"], ["score"], keepdims=0),
        helper.make_node("Greater", ["score", "threshold"], ["is_anomaly"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "legacy", [x], outputs, inits),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    legacy = tmp_path / "legacy.onnx"
    onnx.save(model, str(legacy))
    X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    calibration = X[:10].sum(axis=1)
    out = recalibrate_graph(legacy, 0.0, calibration, tmp_path / "upgraded.onnx")
    result = run_all(out, X)
    assert list(result) == OUTPUTS
    np.testing.assert_array_equal(result["score"], run_all(legacy, X)["score"])
    np.testing.assert_array_equal(result["is_anomaly"], result["score"] > 0)
    np.testing.assert_allclose(result["p_value"], numpy_p_values(result["score"], calibration))


class FirstColumn(nn.Module):
    """Score = the first feature: makes p-values and ties easy to reason about."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * 1.0


class Localizing(nn.Module):
    """A toy image scorer with a map: per-pixel squared deviation, the score its maximum."""

    def forward(self, x: torch.Tensor) -> Prediction:
        anomaly_map = (x - 0.5).pow(2).mean(dim=1)  # [N, H, W]
        return Prediction(anomaly_map.flatten(1).amax(dim=1), anomaly_map)


def test_a_localizing_module_exports_an_anomaly_map(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((12, 3, 4, 5), dtype=np.float32)
    module = Localizing()
    scores = module(torch.from_numpy(images)).score.numpy()
    calibration = scores[:6]
    threshold = float(np.median(scores))
    path = export_onnx(
        module, threshold, images[:1], tmp_path / "map.onnx", calibration_scores=calibration
    )
    out = run_all(path, images)
    assert list(out) == [*OUTPUTS, "anomaly_map"]
    assert out["anomaly_map"].shape == (12, 4, 5) and out["anomaly_map"].dtype == np.float32
    expected_map = module(torch.from_numpy(images)).anomaly_map
    np.testing.assert_allclose(out["anomaly_map"], expected_map, atol=1e-6)
    meta = read_metadata(path)
    assert meta["outputs"][-1] == {"name": "anomaly_map", "dtype": "float32", "shape": ["N", 4, 5]}
    report = parity_check(
        module, threshold, path, images, **TOLERANCES, calibration_scores=calibration
    )
    assert report.passed and report.outputs_compared == [*OUTPUTS, "anomaly_map"], report.message()

    class WrongMap(Localizing):
        def forward(self, x: torch.Tensor) -> Prediction:
            score, anomaly_map, _ = super().forward(x)
            return Prediction(score, anomaly_map * 2)

    bad = parity_check(
        WrongMap(), threshold, path, images, **TOLERANCES, calibration_scores=calibration
    )
    assert not bad.passed and bad.n_map_mismatches > 0 and bad.n_score_mismatches == 0
    assert "anomaly_map pixels are outside both tolerances" in bad.message()

    # recalibration keeps the map; a map of the wrong rank is refused at export
    recalibrated = run_all(recalibrate_graph(path, 0.0, calibration, tmp_path / "r.onnx"), images)
    np.testing.assert_array_equal(recalibrated["anomaly_map"], out["anomaly_map"])

    class FlatMap(nn.Module):
        def forward(self, x: torch.Tensor) -> Prediction:
            return Prediction(x.flatten(1).mean(dim=1), x.flatten(1))

    with pytest.raises(ValueError, match=r"anomaly map of shape \[2, 60\].*expected \[2, H, W\]"):
        export_onnx(FlatMap(), 0.0, images[:2], tmp_path / "flat.onnx")
    assert not (tmp_path / "flat.onnx").exists()


def test_int8_twin_passes_loose_and_fails_impossible_tolerances(
    exported: dict, digits: np.ndarray, tmp_path: Path
) -> None:
    entry = exported["autoencoder"]
    int8 = quantize_int8(entry["path"], tmp_path / "model.int8.onnx")
    assert read_metadata(int8) == {**entry["metadata"], "quantized": "int8"}
    assert {n.op_type for n in onnx.load(str(int8)).graph.node} & {"MatMulInteger", "ConvInteger"}
    args = (entry["module"], entry["threshold"], int8, digits)
    loose = quantized_parity_check(*args, 1.0, 0.9, 0.9, calibration_scores=entry["calibration"])
    assert loose.passed, loose.message()
    assert loose.spearman > 0.99 and loose.outputs_compared == entry["outputs"]
    assert "INT8 parity passed" in loose.message()
    strict = quantized_parity_check(*args, 1e-9, 1.0, 1.0, calibration_scores=entry["calibration"])
    assert not strict.passed
    assert "misses quantized_max_rel" in strict.message() and "worst row" in strict.message()
    json.dumps(strict.to_dict())
    # the INT8 graph recalibrates like the float one: its scores stay bit-identical
    before = run_all(int8, digits)
    out = recalibrate_graph(int8, 0.1, entry["calibration"][:5], tmp_path / "r.int8.onnx")
    after = run_all(out, digits)
    np.testing.assert_array_equal(after["score"], before["score"])
    assert read_metadata(out)["quantized"] == "int8"


def test_subsample_calibration_is_seeded_and_bounded() -> None:
    scores = np.arange(100, dtype=np.float64)
    np.testing.assert_array_equal(subsample_calibration(scores, 200), scores)
    kept = subsample_calibration(scores, 10)
    assert len(kept) == 10 and np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(kept, subsample_calibration(scores, 10))
    with pytest.raises(ValueError, match="max_scores"):
        subsample_calibration(scores, 0)


def test_images_export_and_score_with_a_one_row_example(digits: np.ndarray, tmp_path: Path) -> None:
    images = digits.reshape(-1, 1, 8, 8)
    detector = create_detector("autoencoder", epochs=3).fit(images)
    module = detector.scoring_module()
    threshold = float(np.quantile(detector.score(images), 0.9))
    calibration = detector.score(images[::5])
    path = export_onnx(
        module, threshold, images[:1], tmp_path / "images.onnx", calibration_scores=calibration
    )

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    for n_rows in (1, 7):
        score, is_anomaly = score_onnx(path, images[:n_rows])
        np.testing.assert_allclose(score, _torch_scores(module, images[:n_rows]), atol=1e-4)
        np.testing.assert_array_equal(is_anomaly, score > np.float32(threshold))
    report = parity_check(
        module, threshold, path, images, **TOLERANCES, calibration_scores=calibration
    )
    assert report.passed, report.message()

    with pytest.raises(ValueError, match=r"expects \[N, 1, 8, 8\], got \[5, 64\]"):
        score_onnx(path, digits[:5])


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_failed_export_leaves_no_file(digits: np.ndarray, tmp_path: Path) -> None:
    module = Exploding().train()
    fresh = tmp_path / "fresh" / "model.onnx"
    with pytest.raises(Exception, match="boom"):
        export_onnx(module, 1.0, digits[:4], fresh)
    assert not fresh.exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []

    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"previous model")
    with pytest.raises(Exception, match="boom"):
        export_onnx(module, 1.0, digits[:4], existing)
    assert existing.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["existing.onnx"]
    assert module.training  # the caller's train/eval state is restored


def test_scoring_works_without_torch(exported: dict, digits: np.ndarray) -> None:
    entry = exported["autoencoder"]
    script = f"""
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from normalcy.scoring import read_metadata, score_onnx
X = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)
score, flag = score_onnx({str(entry["path"])!r}, X)
print(json.dumps({{"score": score.tolist(), "flag": flag.tolist(),
                  "meta": read_metadata({str(entry["path"])!r})}}))
"""
    X = digits[:20]
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(X.tolist()),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected_score, expected_flag = score_onnx(entry["path"], X)
    np.testing.assert_allclose(out["score"], expected_score, rtol=0, atol=0)
    assert out["flag"] == expected_flag.tolist()
    assert out["meta"] == entry["metadata"]


def test_missing_or_corrupted_model_files_fail_clearly(tmp_path):
    from normalcy.scoring import load_session

    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_session(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        load_session(broken)


@pytest.mark.parametrize("n", [1, 2, 17, 1655])
def test_torch_p_values_are_the_brute_force_count(n: int) -> None:
    """ScoringGraph counts with the blocked lookup, bit-identical to comparing with all of them."""
    from normalcy.export import ScoringGraph

    rng = np.random.default_rng(n)
    calibration = np.round(rng.normal(size=n), 1).astype(np.float32)  # ties when n is large
    scores = np.concatenate(
        [
            rng.normal(size=300),
            calibration,
            [calibration.min() - 1, calibration.max() + 1, -np.inf, np.inf, np.nan],
        ]
    ).astype(np.float32)
    graph = ScoringGraph(FirstColumn(), 0.0, calibration)
    with torch.no_grad():
        p = graph(torch.from_numpy(scores[:, None]))["p_value"].numpy()
    counts = (calibration[None, :] >= scores[:, None]).sum(axis=1)
    np.testing.assert_array_equal(p, (1 + counts).astype(np.float32) / np.float32(n + 1))


class Explaining(nn.Module):
    """A toy scorer with explanations: per-feature contributions [N, d] and the index of the
    nearest of five stored rows [N] (int64)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("rows", torch.randn(5, 4, generator=generator))

    def forward(self, x: torch.Tensor) -> Prediction:
        distances = (x[:, None, :] - self.rows[None]).pow(2).sum(dim=2)  # [N, 5]
        nearest = distances.argmin(dim=1)
        contributions = (x - self.rows[nearest]).pow(2)
        return Prediction(
            x.abs().amax(dim=1),
            explanations={"nearest_row": nearest, "contributions": contributions},
        )


def test_explanations_are_exported_named_and_pass_parity(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    module = Explaining()
    calibration = module(torch.from_numpy(X[:32])).score.numpy()
    path = export_onnx(
        module, 1.0, X[:2], tmp_path / "explained.onnx", calibration_scores=calibration
    )
    names = [*OUTPUTS, "contributions", "nearest_row"]
    out = run_all(path, X)
    assert list(out) == names
    expected = module(torch.from_numpy(X))
    assert out["contributions"].dtype == np.float32 and out["contributions"].shape == (64, 4)
    assert out["nearest_row"].dtype == np.int64 and out["nearest_row"].shape == (64,)
    np.testing.assert_array_equal(out["nearest_row"], expected.explanations["nearest_row"])
    np.testing.assert_allclose(out["contributions"], expected.explanations["contributions"])
    assert read_metadata(path)["outputs"][3:] == [
        {"name": "contributions", "dtype": "float32", "shape": ["N", 4]},
        {"name": "nearest_row", "dtype": "int64", "shape": ["N"]},
    ]
    report = parity_check(module, 1.0, path, X, **TOLERANCES, calibration_scores=calibration)
    assert report.passed and report.outputs_compared == names, report.message()
    assert list(report.outputs) == names
    assert [o.role for o in report.outputs.values()] == [
        "score",
        "decision",
        "p_value",
        "float",
        "exact",
    ]
    assert "max contributions diff" in report.message()
    assert json.loads(json.dumps(report.to_dict()))["outputs"]["nearest_row"]["n_values"] == 64
    # recalibration keeps every explanation, bit for bit
    again = run_all(recalibrate_graph(path, 0.5, calibration[:8], tmp_path / "r.onnx"), X)
    assert list(again) == names
    np.testing.assert_array_equal(again["contributions"], out["contributions"])

    class Drifted(Explaining):
        """The same outputs, but contributions off by a relative 1e-5: a real, small diff."""

        def forward(self, x: torch.Tensor) -> Prediction:
            score, _, explanations = super().forward(x)
            contributions = explanations["contributions"] * (1 + 1e-5)
            return Prediction(score, explanations={**explanations, "contributions": contributions})

    loose = parity_check(Drifted(), 1.0, path, X, **TOLERANCES, calibration_scores=calibration)
    assert loose.passed, loose.message()
    tight = parity_check(Drifted(), 1.0, path, X, 1e-9, 1e-9, 1.0, calibration_scores=calibration)
    assert not tight.passed and tight.n_score_mismatches == 0
    assert tight.outputs["contributions"].n_mismatches > 0
    assert "contributions values are outside both tolerances" in tight.message()
    assert "nearest_row" not in tight.message() and "scores are outside" not in tight.message()

    class Renumbered(Explaining):
        def forward(self, x: torch.Tensor) -> Prediction:
            score, _, explanations = super().forward(x)
            renumbered = explanations["nearest_row"] + 1
            return Prediction(score, explanations={**explanations, "nearest_row": renumbered})

    wrong = parity_check(Renumbered(), 1.0, path, X, **TOLERANCES, calibration_scores=calibration)
    assert not wrong.passed and wrong.outputs["nearest_row"].n_mismatches == 64
    assert "64 of 64 nearest_row values differ" in wrong.message()


def test_explanations_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    class Scalar(nn.Module):
        def forward(self, x: torch.Tensor) -> Prediction:
            return Prediction(x[:, 0] * 1.0, explanations={"total": x.sum()})

    expected = r"output 'total' of shape \[\] for 2 rows; expected \[2, \.\.\.\]"
    with pytest.raises(ValueError, match=expected):
        export_onnx(Scalar(), 0.0, np.ones((2, 3), np.float32), tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()
