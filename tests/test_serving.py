"""`normalcy serve`: the real uvicorn server on 127.0.0.1, real HTTP requests, a real MLflow
registry (sqlite in tmp_path) whose alias is moved while requests are in flight."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import mlflow
import numpy as np
import pytest
import uvicorn
from mlflow import MlflowClient

from normalcy.cli import main
from normalcy.config import MlflowParams
from normalcy.registry import register_challenger, setup_tracking
from normalcy.scoring import (
    DECISION_NAME,
    P_VALUE_NAME,
    SCORE_NAME,
    ModelSourceError,
    load_session,
    score_outputs,
)
from normalcy.serving import create_app
from tests.test_scoring import FEATURES, export_model

MAX_BATCH = 50


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def model(digits_xy, tmp_path_factory) -> dict:
    X = digits_xy[0]
    path, detector = export_model(
        tmp_path_factory.mktemp("serve") / "model.onnx", X, feature_names=FEATURES
    )
    return {"path": path, "detector": detector, "X": X, "session": load_session(path)}


@pytest.fixture(scope="module")
def server(model) -> Iterator[httpx.Client]:
    app = create_app(model["path"], max_batch=MAX_BATCH)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def records(X: np.ndarray) -> list[dict]:
    return [dict(zip(FEATURES, map(float, row), strict=True)) for row in X]


@pytest.mark.integration
def test_scores_over_http_equal_in_process_onnxruntime(server, model) -> None:
    X = model["X"][:MAX_BATCH]
    expected = score_outputs(model["session"], X)
    for body in ({"records": records(X)}, {"instances": X.tolist()}):
        response = server.post("/score", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert {SCORE_NAME, DECISION_NAME, P_VALUE_NAME} <= set(expected)
        assert set(result) == {*expected, "model_version"}  # explanations included
        for name, values in expected.items():
            np.testing.assert_array_equal(np.asarray(result[name], dtype=values.dtype), values)
        np.testing.assert_array_equal(np.float32(result[SCORE_NAME]), expected[SCORE_NAME])
        assert result[DECISION_NAME] == expected[DECISION_NAME].tolist()
        np.testing.assert_array_equal(np.float32(result[P_VALUE_NAME]), expected[P_VALUE_NAME])
        assert result["model_version"].startswith("sha256:")
    # Integers are numbers too, and a record may list its features in any order.
    shuffled = [dict(reversed(list(r.items()))) for r in records(np.round(X[:3]))]
    response = server.post("/score", json={"records": shuffled})
    np.testing.assert_array_equal(
        np.float32(response.json()[SCORE_NAME]),
        score_outputs(model["session"], np.round(X[:3]))[SCORE_NAME],
    )


@pytest.mark.integration
def test_health_and_metadata(server, model) -> None:
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["follows_alias"] is False
    assert health["model_source"] == str(model["path"])
    meta = server.get("/metadata").json()
    assert meta["input"]["feature_names"] == FEATURES
    assert meta["input"]["shape"] == ["N", 64] and meta["input"]["dtype"] == "float32"
    assert meta["outputs"][:3] == [SCORE_NAME, DECISION_NAME, P_VALUE_NAME]
    assert meta["max_batch"] == MAX_BATCH
    assert meta["metadata"]["detector"] == "autoencoder"
    assert meta["model_version"] == health["model_version"]


@pytest.mark.integration
def test_bad_requests_get_422_naming_the_field(server, model) -> None:
    row = records(model["X"][:1])[0]
    no_x3 = {k: v for k, v in row.items() if k != "x3"}
    cases = [
        ({"records": [row, no_x3]}, "records[1]: missing feature 'x3'"),
        ({"records": [{**row, "x2": "abc"}]}, "records[0]: non-numeric value (str 'abc') in 'x2'"),
        ({"records": [{**row, "x2": None}]}, "non-numeric value (null) in 'x2'"),
        ({"records": [{**row, "x9": True}]}, "non-numeric value (bool True) in 'x9'"),
        ({"records": [{**row, "colour": 1}]}, "records[0]: unknown field(s) ['colour']"),
        ({"records": [[1.0] * 64]}, "records[0]: expected an object"),
        ({"instances": [[0.0] * 64, [0.0] * 63]}, "instances[1]: 63 values; the model expects"),
        ({"instances": [[0.0] * 63 + ["x"]]}, "non-numeric value (str 'x') in 'x63'"),
        ({"instances": []}, "'instances' must be a non-empty list"),
        ({"rows": [[0.0] * 64]}, "unknown field(s) ['rows']"),
        ({"records": [row], "instances": [[0.0] * 64]}, "send exactly one of 'records'"),
        ([1, 2], "the body must be a JSON object"),
    ]
    for body, message in cases:
        response = server.post("/score", json=body)
        assert response.status_code == 422, (body, response.text)
        assert message in response.json()["detail"], (message, response.text)
    # JSON has no NaN, but Python's parser takes the literal: it must be refused by name.
    text = json.dumps({"records": [{**row, "x5": float("nan")}]})
    assert '"x5": NaN' in text
    response = server.post("/score", content=text, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "NaN (a missing value) in 'x5' at row 0" in response.json()["detail"]
    response = server.post("/score", content=b"{not json")
    assert response.status_code == 422 and "not valid JSON" in response.json()["detail"]


@pytest.mark.integration
def test_more_rows_than_the_cap_get_413(server, model) -> None:
    X = model["X"][: MAX_BATCH + 1]
    response = server.post("/score", json={"instances": X.tolist()})
    assert response.status_code == 413
    assert f"{MAX_BATCH + 1} rows in one request" in response.json()["detail"]
    assert f"at most {MAX_BATCH}" in response.json()["detail"]
    assert server.post("/score", json={"instances": X[:MAX_BATCH].tolist()}).status_code == 200


# --- registry aliases ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(model, tmp_path_factory) -> Iterator[dict]:
    """A real MLflow sqlite store with two versions of model 'm': v1 as exported (about 10% of
    training rows anomalous), v2 with threshold 0 (every row anomalous). Tests point the
    `champion` alias where they need it."""
    tmp_path = tmp_path_factory.mktemp("registry")
    params = MlflowParams(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
        experiment="serving-test",
    )
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    setup_tracking(params)
    strict, _ = export_model(
        tmp_path / "strict.onnx", model["X"], detector=model["detector"], threshold=0.0
    )
    versions = {}
    for label, path in (("v1", model["path"]), ("v2", strict)):
        with mlflow.start_run():
            versions[label] = register_challenger(path, "m", {}).version
    client = MlflowClient()
    try:
        yield {"uri": params.tracking_uri, "client": client, **versions}
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


@pytest.mark.integration
def test_alias_move_is_picked_up_without_failing_requests(registry, model) -> None:
    registry["client"].set_registered_model_alias("m", "champion", registry["v1"])
    app = create_app(
        "models:/m@champion", tracking_uri=registry["uri"], reload_interval=0.2, max_batch=100
    )
    X = model["X"][:20]
    v1_flags = score_outputs(model["session"], X)[DECISION_NAME].tolist()
    seen: list[tuple[int, str | None, list | None]] = []
    stop = threading.Event()

    def hammer(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                response = client.post("/score", json={"instances": X.tolist()})
                body = response.json() if response.status_code == 200 else {}
                seen.append(
                    (response.status_code, body.get("model_version"), body.get(DECISION_NAME))
                )

    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["model_version"] == registry["v1"]
        workers = [threading.Thread(target=hammer, args=(url,)) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)  # requests flow on v1
        registry["client"].set_registered_model_alias("m", "champion", registry["v2"])
        deadline = time.monotonic() + 30
        while client.get("/health").json()["model_version"] != registry["v2"]:
            assert time.monotonic() < deadline, "the server never switched to v2"
            time.sleep(0.05)
        time.sleep(0.5)  # requests flow on v2
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        health = client.get("/health").json()
        assert health["follows_alias"] is True and health["alias_error"] is None

    assert seen and all(status == 200 for status, _, _ in seen)
    versions = [version for _, version, _ in seen]
    assert {registry["v1"], registry["v2"]} == set(versions)
    for _, version, flags in seen:  # each response is wholly one version's
        assert flags == (v1_flags if version == registry["v1"] else [True] * len(X))
    assert versions[-1] == registry["v2"]


def test_registry_sources_for_score_and_a_missing_alias(registry, model, tmp_path, capsys) -> None:
    registry["client"].set_registered_model_alias("m", "champion", registry["v1"])
    np.savez(tmp_path / "batch.npz", X=model["X"][:10])
    out = tmp_path / "scores.csv"
    for source in ("models:/m@champion", f"models:/m/{registry['v2']}"):
        argv = ["--model", source, "--tracking-uri", registry["uri"]]
        assert (
            main(["score", *argv, "--input", str(tmp_path / "batch.npz"), "--output", str(out)])
            == 0
        )
        assert (
            f"version {registry['v1'] if '@' in source else registry['v2']}"
            in capsys.readouterr().out
        )
    with pytest.raises(
        ModelSourceError, match=r"cannot resolve alias 'nope' of registered model 'm'"
    ):
        create_app("models:/m@nope", tracking_uri=registry["uri"])
    argv = ["--model", "models:/m@nope", "--tracking-uri", registry["uri"]]
    assert main(["score", *argv, "--input", str(tmp_path / "batch.npz"), "--output", str(out)]) == 2
    assert "cannot resolve alias 'nope'" in capsys.readouterr().err


def test_image_instances_are_nested_arrays_checked_by_position() -> None:
    from fastapi import HTTPException

    from normalcy.scoring import InputSpec
    from normalcy.serving import parse_request

    spec = InputSpec("input", (1, 8, 8), np.dtype(np.float32))
    images = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    X, key, want_map = parse_request({"instances": images.tolist()}, spec, 10)
    np.testing.assert_array_equal(X, images)
    assert (key, want_map, X.dtype) == ("instances", False, np.float32)

    ragged = images.tolist()
    ragged[1][0][7] = ragged[1][0][7][:7]
    text = images.tolist()
    text[0][0][3][5] = "bright"
    cases = [
        (ragged, "instances[1]: ragged nested lists; the model expects one row of shape [1, 8, 8]"),
        (images[:, :, :7].tolist(), "instances[0]: shape [1, 7, 8]; the model expects"),
        (text, "instances[0]: non-numeric value (str 'bright') in position [0, 3, 5]"),
    ]
    for instances, message in cases:
        with pytest.raises(HTTPException) as raised:
            parse_request({"instances": instances}, spec, 10)
        assert raised.value.status_code == 422 and message in raised.value.detail
    with pytest.raises(HTTPException) as raised:
        parse_request({"records": [{"x0": 1.0}]}, spec, 10)
    assert "names no features" in raised.value.detail


def png_base64(pixels: np.ndarray) -> str:
    """A grayscale uint8 image as a base64-encoded PNG file."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_images_arrive_as_base64_files_decoded_as_in_training() -> None:
    from fastapi import HTTPException

    from normalcy.data.images import decode_image
    from normalcy.scoring import InputSpec
    from normalcy.serving import parse_request

    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 256, (8, 8)), rng.integers(0, 256, (16, 12))
    exact = InputSpec("input", (1, 8, 8), np.dtype(np.float32))
    X, key, _ = parse_request({"images": [png_base64(small)]}, exact, 10)
    assert key == "images" and X.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(X[0, 0], small)  # PNG is lossless: the very pixels
    # A model trained on an image folder resizes any size the way its training images were.
    resizing = InputSpec("input", (1, 8, 8), np.dtype(np.float32), image_resize="bilinear")
    X, _, _ = parse_request({"images": [png_base64(large), png_base64(small)]}, resizing, 10)
    import base64

    expected = decode_image(base64.b64decode(png_base64(large)), 1, (8, 8))
    np.testing.assert_array_equal(X[0], expected)
    vector = InputSpec("input", (64,), np.dtype(np.float32))
    cases = [
        (exact, [png_base64(large)], "images[0]: 16x12 pixels; this model takes 8x8 images"),
        (exact, ["not base64!"], "images[0]: not base64"),
        (exact, [base64.b64encode(b"no image here").decode()], "images[0]: unreadable"),
        (exact, [png_base64(small), 7], "images[1]: expected a base64 string, got int 7"),
        (vector, [png_base64(small)], "'images' is for image models"),
    ]
    for spec, images, message in cases:
        with pytest.raises(HTTPException) as raised:
            parse_request({"images": images}, spec, 10)
        assert raised.value.status_code == 422 and message in raised.value.detail, message


@pytest.mark.integration
def test_served_rows_go_to_the_prediction_log(model, tmp_path) -> None:
    from normalcy.scoring.prediction_log import PredictionLog, read_prediction_log

    log_path = tmp_path / "served.sqlite"
    app = create_app(model["path"], max_batch=MAX_BATCH, prediction_log=PredictionLog(log_path))
    rows = model["X"][:30]
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        answers = [
            client.post("/score", json={"records": records(part)})
            for part in (rows[:10], rows[10:])
        ]
    assert all(answer.status_code == 200 for answer in answers)
    logged = read_prediction_log(log_path)  # flushed when the app stopped
    served = [value for answer in answers for value in answer.json()[SCORE_NAME]]
    assert logged["score"].tolist() == pytest.approx(served)
    flagged = [value for answer in answers for value in answer.json()[DECISION_NAME]]
    assert logged["is_anomaly"].astype(bool).tolist() == flagged
    assert set(logged["model_version"]) == {answers[0].json()["model_version"]}
