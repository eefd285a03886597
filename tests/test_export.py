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
from sklearn.datasets import load_digits
from torch import nn

from normalcy.detectors import create_detector
from normalcy.export import (
    ParityError,
    export_onnx,
    parity_check,
    require_parity,
    set_threshold,
)
from normalcy.scoring import load_session, read_metadata, score_onnx

TOLERANCES = {"max_abs": 1e-4, "max_rel": 1e-3, "min_agreement": 1.0}
METHODS = ["autoencoder", "deep_svdd"]


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
        threshold = float(np.quantile(detector.score(digits), 0.9))
        path = root / "not" / "yet" / f"{method}.onnx"
        metadata = {"detector": method, "threshold": threshold, "n_features": 64}
        export_onnx(module, threshold, digits[:32], path, metadata=metadata)
        models[method] = {
            "module": module,
            "threshold": threshold,
            "path": path,
            "metadata": metadata,
        }
    return models


def _torch_scores(module: nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(X)).numpy()


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
    assert [o.name for o in model.graph.output] == ["score", "is_anomaly"]
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
        entry["module"], entry["threshold"], entry["path"], digits, **TOLERANCES, batch_size=500
    )
    assert report.passed, report.message()
    assert report.max_abs_diff <= 1e-4
    assert report.n_rows == len(digits)
    assert report.is_anomaly_agreement == 1.0
    assert report.spearman > 0.999
    assert "passed" in report.message()
    require_parity(report)
    assert json.loads(json.dumps(report.to_dict()))["tolerances"]["parity_max_abs"] == 1e-4


def test_parity_fails_against_a_different_model(exported: dict, digits: np.ndarray) -> None:
    other = exported["deep_svdd"]
    report = parity_check(
        other["module"], other["threshold"], exported["autoencoder"]["path"], digits, **TOLERANCES
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
    report = parity_check(entry["module"], other_threshold, entry["path"], digits, **TOLERANCES)
    assert not report.passed
    assert report.n_score_mismatches == 0
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


def test_set_threshold_changes_decisions_not_scores(
    exported: dict, digits: np.ndarray, tmp_path: Path
) -> None:
    entry = exported["autoencoder"]
    original_hash = _sha(entry["path"])
    before_score, before_flag = score_onnx(entry["path"], digits)
    assert 0.05 < before_flag.mean() < 0.15  # exported at the 90% quantile

    median = float(np.median(before_score))
    out = tmp_path / "sub" / "recalibrated.onnx"
    assert (
        set_threshold(entry["path"], median, out, {"threshold": median, "reason": "drift"}) == out
    )

    session = load_session(out)
    after_score, after_flag = score_onnx(session, digits)
    np.testing.assert_array_equal(after_score, before_score)
    np.testing.assert_array_equal(after_flag, after_score > np.float32(median))
    assert 0.45 < after_flag.mean() <= 0.5
    assert read_metadata(session) == {**entry["metadata"], "threshold": median, "reason": "drift"}
    assert _sha(entry["path"]) == original_hash
    assert [p.name for p in out.parent.iterdir()] == ["recalibrated.onnx"]

    # In place, and repeatedly: the threshold initializer is rewritten, not accumulated.
    set_threshold(out, float(before_score.max()), out)
    assert not score_onnx(out, digits)[1].any()
    inits = [t.name for t in onnx.load(str(out)).graph.initializer if "threshold" in t.name]
    assert inits == ["threshold"]


def test_images_export_and_score_with_a_one_row_example(digits: np.ndarray, tmp_path: Path) -> None:
    images = digits.reshape(-1, 1, 8, 8)
    detector = create_detector("autoencoder", epochs=3).fit(images)
    module = detector.scoring_module()
    threshold = float(np.quantile(detector.score(images), 0.9))
    path = export_onnx(module, threshold, images[:1], tmp_path / "images.onnx")

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    for n_rows in (1, 7):
        score, is_anomaly = score_onnx(path, images[:n_rows])
        np.testing.assert_allclose(score, _torch_scores(module, images[:n_rows]), atol=1e-4)
        np.testing.assert_array_equal(is_anomaly, score > np.float32(threshold))
    assert parity_check(module, threshold, path, images, **TOLERANCES).passed

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
