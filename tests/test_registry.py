"""Registry against a real MLflow sqlite store in a temp folder: no mocks, real ONNX models."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper

from normalcy.artifact.calibration_head import attach_head
from normalcy.artifact.metadata import read_onnx_metadata, update_metadata
from normalcy.config import MlflowParams, PromotionParams
from normalcy.data.splits import Split
from normalcy.promotion import (
    apply_promotion,
    decide_promotion,
    gather_evidence,
    promote_version,
    rollback,
)
from normalcy.registry import (
    CHALLENGER,
    CHAMPION,
    INT8_TAG,
    MAX_PARAM_VAL_LENGTH,
    describe_version,
    download_run_artifact,
    load_champion,
    log_int8_twin,
    log_json,
    log_onnx_model,
    log_params_flat,
    register_challenger,
    resolve_tracking_uri,
    set_champion,
    setup_tracking,
)


def make_onnx(path: Path, scale: float) -> Path:
    """float32 [N, 3] -> score [N] = scale * sum(x); `scale` tells versions apart when served."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "scale"], ["score"]),
    ]
    graph = helper.make_graph(nodes, "sum_score", [x], [score], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # readable by older onnxruntime builds too
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["score"], {"x": x.astype(np.float32)})[0]


@dataclass
class Store:
    base: Path
    cwd: Path
    params: MlflowParams
    experiment_id: str

    def onnx(self, scale: float) -> Path:
        return make_onnx(self.base / f"model-{uuid.uuid4().hex[:8]}.onnx", scale)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One sqlite store per module (its migrations take seconds); the process runs in another
    folder, so a stray `./mlruns` would show. Tests use their own model names."""
    root = tmp_path_factory.mktemp("mlflow")
    base, cwd = root / "store", root / "cwd"
    cwd.mkdir()
    params = MlflowParams(experiment="normalcy-test")
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        experiment_id = setup_tracking(params, base_dir=base)
        yield Store(base=base, cwd=cwd, params=params, experiment_id=experiment_id)
    mlflow.set_tracking_uri(previous_uri)
    mlflow.set_registry_uri(previous_uri)


def fresh_name() -> str:
    return f"normalcy-{uuid.uuid4().hex[:8]}"


# --- resolve_tracking_uri (pure) ----------------------------------------------------------------


def test_resolve_makes_relative_sqlite_and_artifacts_absolute(tmp_path: Path) -> None:
    uri, artifacts = resolve_tracking_uri(MlflowParams(), base_dir=tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert artifacts == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert artifacts.startswith("file:///")


def test_resolve_defaults_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = MlflowParams(tracking_uri="sqlite:///db/m.db?timeout=20", artifact_location="art")
    uri, artifacts = resolve_tracking_uri(params)
    assert uri == f"sqlite:///{tmp_path.resolve()}/db/m.db?timeout=20"
    assert artifacts == (tmp_path.resolve() / "art").as_uri()


@pytest.mark.parametrize(
    ("tracking_uri", "artifact_location"),
    [
        ("sqlite:////already/abs.db", "file:///already/art"),
        ("sqlite:////already/abs.db", "s3://bucket/art"),
        ("sqlite:///:memory:", "file:///already/art"),
        ("http://mlflow.internal:5000", "mlartifacts"),  # the server's folders, not ours
        ("databricks", ""),
    ],
)
def test_resolve_leaves_absolute_and_remote_alone(
    tracking_uri: str, artifact_location: str, tmp_path: Path
) -> None:
    params = MlflowParams(tracking_uri=tracking_uri, artifact_location=artifact_location)
    assert resolve_tracking_uri(params, base_dir=tmp_path) == (tracking_uri, artifact_location)


def test_resolve_absolute_artifact_path_becomes_uri(tmp_path: Path) -> None:
    params = MlflowParams(artifact_location=str(tmp_path / "art"))
    _, artifacts = resolve_tracking_uri(params, base_dir=Path("/elsewhere"))
    assert artifacts == (tmp_path / "art").resolve().as_uri()


def test_resolve_plain_path_file_store(tmp_path: Path) -> None:
    uri, _ = resolve_tracking_uri(MlflowParams(tracking_uri="mlruns"), base_dir=tmp_path)
    assert uri == str(tmp_path.resolve() / "mlruns")


# --- setup_tracking -----------------------------------------------------------------------------


def test_setup_tracking_puts_store_and_artifacts_under_base(store: Store) -> None:
    assert (store.base / "mlflow.db").is_file()
    assert mlflow.get_tracking_uri() == f"sqlite:///{store.base.resolve()}/mlflow.db"
    exp = MlflowClient().get_experiment(store.experiment_id)
    assert exp.name == "normalcy-test"
    assert exp.artifact_location == (store.base.resolve() / "mlartifacts").as_uri()
    with mlflow.start_run() as run:
        log_json({"ok": True}, "probe.json")
    assert run.info.experiment_id == store.experiment_id
    assert (store.base / "mlartifacts" / run.info.run_id / "artifacts" / "probe.json").is_file()
    assert not (store.cwd / "mlruns").exists()
    assert not (store.base / "mlruns").exists()


def test_setup_tracking_is_idempotent(store: Store) -> None:
    assert setup_tracking(store.params, base_dir=store.base) == store.experiment_id


# --- run logging ----------------------------------------------------------------------------


def test_log_params_flat_many_and_long(store: Store) -> None:
    params: dict[str, object] = {f"p.{i:03d}": i * 0.5 for i in range(250)}
    params["long"] = "x" * (MAX_PARAM_VAL_LENGTH * 2)
    params["none"] = None
    params["list"] = [1, 2, 3]
    with mlflow.start_run() as run:
        log_params_flat(params)
    logged = MlflowClient().get_run(run.info.run_id).data.params
    assert len(logged) == len(params)
    assert logged["p.007"] == "3.5"
    assert logged["none"] == "None"
    assert logged["list"] == "[1, 2, 3]"
    assert len(logged["long"]) == MAX_PARAM_VAL_LENGTH
    assert logged["long"].endswith("...")


def test_log_json_with_numpy_and_download(store: Store, tmp_path: Path) -> None:
    report = {"auc": np.float32(0.5), "counts": np.arange(3), "path": Path("a/b"), "n": np.int64(7)}
    with mlflow.start_run() as run:
        log_json(report, "reports/eval.json")
    local = download_run_artifact(run.info.run_id, "reports/eval.json", tmp_path / "dl")
    assert local.is_file()
    assert json.loads(local.read_text()) == {"auc": 0.5, "counts": [0, 1, 2], "path": "a/b", "n": 7}


def test_logging_outside_a_run_fails_loudly(store: Store) -> None:
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_params_flat({"a": 1})
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        register_challenger(store.onnx(1.0), fresh_name(), {})


def test_log_onnx_model_uris_load(store: Store) -> None:
    name = fresh_name()
    x = np.ones((2, 3), dtype=np.float32)
    with mlflow.start_run():
        unregistered = log_onnx_model(store.onnx(2.0))
        registered = log_onnx_model(store.onnx(3.0), model_name=name)
    assert unregistered.startswith("models:/m-")
    assert registered == f"models:/{name}/1"
    for uri, expected in [(unregistered, 6.0), (registered, 9.0)]:
        session = onnxruntime.InferenceSession(
            mlflow.onnx.load_model(uri).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        np.testing.assert_allclose(session.run(["score"], {"x": x})[0], [expected] * 2)


# --- registry: challenger / champion ---------------------------------------------------------


def test_load_champion_none_without_model_or_alias(store: Store, tmp_path: Path) -> None:
    name = fresh_name()
    assert load_champion(name, tmp_path) is None
    with mlflow.start_run():
        register_challenger(store.onnx(1.0), name, {"detector": "autoencoder"})
    assert load_champion(name, tmp_path) is None  # a challenger is not served


def weighted_scorer(path: Path, weights: list[float], threshold: float) -> Path:
    """float32 [N, 3] -> score = x @ weights, with the calibration head (is_anomaly)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [3], weights)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["score"])], "weighted", [x], [score], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    attach_head(model, threshold)
    onnx.save(model, str(path))
    return path


def holdout_rows(n: int = 400, seed: int = 0) -> Split:
    """Feature 0 tells anomalies apart (+4), features 1 and 2 are noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    X = rng.normal(size=(n, 3)).astype(np.float32)
    X[:, 0] += 4.0 * y
    return Split(X, y, np.arange(n))


def test_promotion_sequence(store: Store, tmp_path: Path) -> None:
    """First model served; a worse one (noise) kept out with its evidence tagged; a better one
    promoted; a decision made against a champion that has since moved promotes nothing."""
    name = fresh_name()
    client = MlflowClient()
    holdout, params = holdout_rows(), PromotionParams(n_bootstrap=200)

    def champion_version() -> str:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)

    def register_and_decide(weights: list[float], threshold: float, tags: dict):
        path = weighted_scorer(tmp_path / f"{uuid.uuid4().hex[:8]}.onnx", weights, threshold)
        evidence = gather_evidence(path, holdout, name, 0.01, params, seed=0)
        with mlflow.start_run() as run:
            registered = register_challenger(path, name, tags)
            applied = apply_promotion(registered, decide_promotion(evidence, params))
        return registered, applied, run

    # v1: the sum of all features, mediocre; no champion yet -> champion
    v1, first, run1 = register_and_decide([1.0, 1.0, 1.0], 5.0, {"detector": "autoencoder"})
    assert (v1.name, v1.version, v1.run_id) == (name, "1", run1.info.run_id)
    mv1 = client.get_model_version(name, "1")
    assert mv1.tags["detector"] == "autoencoder"
    assert first.promoted and "no champion" in first.reason.lower()
    assert champion_version() == "1"

    # v2: noise only -> stays challenger; the reason and the evidence are tagged
    v2, second, _ = register_and_decide([0.0, 1.0, 0.0], 2.5, {"detector": "deep_svdd"})
    assert not second.promoted and "does not beat" in second.reason
    evidence = second.evidence
    assert evidence.champion_version == "1" and evidence.n_rows == len(holdout)
    assert evidence.challenger_metric < evidence.champion_metric
    assert evidence.metric_delta_interval[1] < 0  # clearly worse, and the interval says so
    assert champion_version() == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    tags2 = client.get_model_version(name, "2").tags
    assert tags2["promotion_decision"] == "not_promoted"
    assert tags2["promotion_reason"] == second.reason
    assert tags2["champion_version_before"] == "1"
    assert tags2["promotion_metric_name"] == "holdout_auprc"
    low, high = (float(v) for v in tags2["promotion_metric_delta_interval"].split(".."))
    assert low <= high < 0

    # v3: the informative feature alone -> champion, and it is what load_champion serves
    v3, third, run3 = register_and_decide([1.0, 0.0, 0.0], 2.5, {"detector": "autoencoder"})
    assert third.promoted, third.reason
    assert third.evidence.metric_delta_interval[0] > 0
    assert champion_version() == "3"
    assert client.get_model_version(name, "3").tags["promotion_decision"] == "promoted"

    # v4 is as good as v3, but measured against v1: the champion moved, so nothing is promoted
    path4 = weighted_scorer(tmp_path / "v4.onnx", [1.0, 0.0, 0.0], 2.5)
    stale = replace(gather_evidence(path4, holdout, name, 0.01, params, 0), champion_version="1")
    with mlflow.start_run():
        v4 = register_challenger(path4, name, {"detector": "autoencoder"})
        fourth = apply_promotion(
            v4, replace(decide_promotion(stale, params), promoted=True, reason="planned.")
        )
    assert not fourth.promoted and "moved to version 3" in fourth.reason
    assert champion_version() == "3"

    champion = load_champion(name, tmp_path / "serve")
    assert champion is not None
    assert (champion.name, champion.version, champion.run_id) == (name, "3", run3.info.run_id)
    assert champion.tags["detector"] == "autoencoder"
    assert champion.onnx_path.suffix == ".onnx" and champion.onnx_path.is_file()
    assert champion.onnx_path.is_relative_to(tmp_path / "serve")
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(run_onnx(champion.onnx_path, x), [1.0, 0.0])  # x @ [1, 0, 0]

    # rollback, as recalibration does: set_champion moves the alias
    set_champion(name, "1")
    rolled = load_champion(name, tmp_path / "serve")
    assert rolled is not None and rolled.version == "1"
    np.testing.assert_allclose(run_onnx(rolled.onnx_path, x), [6.0, 1.0])  # x @ [1, 1, 1]


def test_the_alert_rate_is_checked_against_the_graphs_own_target(
    store: Store, tmp_path: Path
) -> None:
    """A threshold set for 20% alerts (say by an alert budget) is judged against 20%, not
    against the configured default."""
    path = weighted_scorer(tmp_path / "budget.onnx", [1.0, 0.0, 0.0], 0.5)
    update_metadata(path, {"target_fpr": 0.2}, path)
    evidence = gather_evidence(path, holdout_rows(), fresh_name(), 0.01, PromotionParams(), 0)
    assert evidence.target_rate == 0.2
    plain = weighted_scorer(tmp_path / "plain.onnx", [1.0, 0.0, 0.0], 0.5)
    assert (
        gather_evidence(plain, holdout_rows(), fresh_name(), 0.01, PromotionParams(), 0).target_rate
        == 0.01
    )


def test_non_finite_scores_never_win_and_never_block(store: Store, tmp_path: Path) -> None:
    """A challenger scoring NaN is not promoted; a champion scoring NaN (set by hand) is
    replaced by the next sound challenger instead of failing the run."""
    name, holdout = fresh_name(), holdout_rows()
    params = PromotionParams(n_bootstrap=100)

    def register_and_decide(weights: list[float]):
        path = weighted_scorer(tmp_path / f"{uuid.uuid4().hex[:6]}.onnx", weights, 2.5)
        evidence = gather_evidence(path, holdout, name, 0.01, params, seed=0)
        with mlflow.start_run():
            registered = register_challenger(path, name, {"detector": "autoencoder"})
            return apply_promotion(registered, decide_promotion(evidence, params))

    broken = register_and_decide([float("nan"), 1.0, 1.0])
    assert not broken.promoted and "NaN" in broken.reason
    set_champion(name, "1")  # a person serves it anyway
    sound = register_and_decide([1.0, 0.0, 0.0])
    assert math.isnan(sound.evidence.champion_metric)
    assert sound.promoted and "non-finite" in sound.reason


def test_promote_by_hand_and_roll_back(store: Store, tmp_path: Path) -> None:
    name = fresh_name()
    client = MlflowClient()
    with mlflow.start_run():
        for scale in (1.0, 2.0, 3.0):
            register_challenger(store.onnx(scale), name, {"detector": "autoencoder"})
    with pytest.raises(ValueError, match="no champion to roll back"):
        rollback(name)
    assert promote_version(name, "1", "first") is None
    with pytest.raises(ValueError, match="nothing to roll back to"):
        rollback(name)
    assert promote_version(name, "2", "a person looked") == "1"
    assert promote_version(name, "2", "promoted twice") == "2"  # a no-op: history kept
    assert promote_version(name, "3", "and again") == "2"
    assert client.get_model_version(name, "3").tags["promotion_reason"] == "and again"
    assert rollback(name) == "2"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert client.get_model_version(name, "3").tags["rolled_back"] == "champion returned to v2"
    assert rollback(name) == "1"  # a chain: each champion remembers the one it replaced
    with pytest.raises(ValueError, match="has no version '9'"):
        promote_version(name, "9", "typo")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"


# --- the version number inside the registered file ---------------------------------------------


def version_file(name: str, version: str, dst: Path) -> Path:
    """The .onnx file a registered version points at, downloaded."""
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dst / f"v{version}")
    )
    (onnx_file,) = Path(local).glob("*.onnx")
    return onnx_file


def test_registered_file_carries_its_own_version(store: Store, tmp_path: Path) -> None:
    name = fresh_name()
    path = update_metadata(
        store.onnx(1.0), {"detector": "autoencoder", "model_version": None}, store.base / "m.onnx"
    )
    registered = []
    for _ in range(2):
        with mlflow.start_run() as run:
            registered.append(register_challenger(path, name, {"detector": "autoencoder"}))
        assert registered[-1].run_id == run.info.run_id
    assert [r.version for r in registered] == ["1", "2"]
    for r in registered:
        meta = read_onnx_metadata(version_file(name, r.version, tmp_path))
        assert meta == r.metadata
        assert meta == {
            "detector": "autoencoder",
            "model_name": name,
            "model_version": int(r.version),
            "mlflow_run_id": r.run_id,
        }
    # the local file is the last registered one; MLmodel carries the same metadata
    assert read_onnx_metadata(path) == registered[-1].metadata
    mlmodel = mlflow.models.Model.load(f"models:/{name}/2")
    assert mlmodel.metadata == {"normalcy": registered[-1].metadata}
    x = np.ones((2, 3), dtype=np.float32)
    np.testing.assert_allclose(run_onnx(version_file(name, "2", tmp_path), x), [3.0, 3.0])


def test_version_numbers_held_by_deleted_versions_are_skipped(store: Store, tmp_path: Path) -> None:
    """MLflow never reuses a deleted version's number, and the registry does not show it: the
    predicted number is wrong, the wrong version is deleted and the next number is used."""
    name = fresh_name()
    client = MlflowClient()
    with mlflow.start_run():
        register_challenger(store.onnx(1.0), name, {})
        register_challenger(store.onnx(2.0), name, {})
    client.delete_model_version(name, "2")
    with mlflow.start_run():
        third = register_challenger(store.onnx(3.0), name, {"detector": "deep_svdd"})
    visible = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    assert visible == [1, int(third.version)] and int(third.version) > 3
    for version in visible:
        meta = read_onnx_metadata(version_file(name, str(version), tmp_path))
        assert meta["model_version"] == version
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == third.version
    assert client.get_model_version(name, third.version).tags["detector"] == "deep_svdd"


def test_a_failed_registration_leaves_no_version(store: Store, tmp_path: Path) -> None:
    name = fresh_name()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with mlflow.start_run(), pytest.raises(ValueError, match="not a loadable ONNX model"):
        register_challenger(broken, name, {})
    assert MlflowClient().search_model_versions(f"name = '{name}'") == []
    assert broken.read_bytes() == b"not a model"


def test_int8_twin_is_logged_beside_its_version(store: Store, tmp_path: Path) -> None:
    name = fresh_name()
    twin = update_metadata(store.onnx(1.0), {"quantized": "int8"}, store.base / "m.int8.onnx")
    with mlflow.start_run() as run:
        registered = register_challenger(store.onnx(1.0), name, {})
        uri = log_int8_twin(twin, registered)
    assert uri == f"runs:/{run.info.run_id}/model_int8/m.int8.onnx"
    version = MlflowClient().get_model_version(name, registered.version)
    assert version.tags[INT8_TAG] == uri
    local = download_run_artifact(run.info.run_id, "model_int8/m.int8.onnx", tmp_path)
    assert read_onnx_metadata(local) == {
        "quantized": "int8",
        "model_name": name,
        "model_version": 1,
        "mlflow_run_id": run.info.run_id,
    }
    with mlflow.start_run(), pytest.raises(RuntimeError, match="in the run that registered"):
        log_int8_twin(twin, registered)
    describe_version(name, registered.version, "# Model card\n")
    assert MlflowClient().get_model_version(name, "1").description == "# Model card\n"
