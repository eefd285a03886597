"""`normalcy serve` under hostile input and under load: the body-size limit, 4xx for every
malformed body (never 5xx, also under schemathesis), the documented OpenAPI schema, the bearer
token, /metrics, micro-batching and several workers. Real uvicorn servers on 127.0.0.1, the
real exported model of tests/test_serving.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from normalcy.scoring import SCORE_NAME, SessionSettings, load_session, score_outputs
from normalcy.serving import BatchOptions, create_app, load_model
from normalcy.serving.auth import token_from_env
from normalcy.serving.batching import MicroBatcher, group_by_model, split_outputs
from normalcy.serving.limits import load_json
from normalcy.serving.server import wait_until_healthy
from normalcy.threads import worker_threads
from tests.test_scoring import FEATURES, export_model
from tests.test_serving import records, running

LIMIT = 8192


@pytest.fixture(scope="module")
def model(digits_xy, tmp_path_factory) -> dict:
    X = digits_xy[0]
    path, _ = export_model(tmp_path_factory.mktemp("hard") / "m.onnx", X, feature_names=FEATURES)
    return {"path": path, "X": X, "session": load_session(path)}


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model["path"], max_batch=50, max_body_bytes=LIMIT)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.integration
def test_oversized_bodies_get_413_before_parsing(server, model) -> None:
    declared = server.post("/score", content=b"x" * (LIMIT + 1))
    assert declared.status_code == 413
    assert f"{LIMIT + 1} bytes (Content-Length)" in declared.json()["detail"]

    def chunks():  # no Content-Length: httpx sends the body chunked
        for _ in range(4):
            yield b" " * (LIMIT // 2)

    chunked = server.post("/score", content=chunks())
    assert chunked.status_code == 413
    assert f"more than {LIMIT} bytes (chunked)" in chunked.json()["detail"]
    small = server.post("/score", json={"records": records(model["X"][:1])})
    assert small.status_code == 200  # under the limit, the same connection pool still works


@pytest.mark.integration
def test_a_content_length_that_is_not_a_number_gets_400(server) -> None:
    host, port = server.base_url.host, server.base_url.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"400", status_line


@pytest.mark.integration
def test_malformed_values_get_422_never_500(server, model) -> None:
    row = records(model["X"][:1])[0]
    text = json.dumps({"records": [row]})
    cases = {  # body -> what the 422 message says
        text.replace(json.dumps(row["x2"]), "1" * 400, 1): "an integer of 400 digits",
        text.replace(json.dumps(row["x2"]), "-" + "9" * 5000, 1): "an integer of 5000 digits",
        text.replace(json.dumps(row["x2"]), "1e400", 1): "inf (out of float range) in 'x2'",
        text.replace(json.dumps(row["x2"]), "Infinity", 1): "inf (out of float range) in 'x2'",
        text.replace(json.dumps(row["x2"]), "1" * 60, 1): "inf (out of float range) in 'x2'",
        nested(4000): "nests arrays or objects too deeply",
        text.replace(json.dumps(row["x2"]), nested(900), 1): "non-numeric value (list [[[[",
        json.dumps({"instances": json.loads(nested(900))}): "instances[0]: ragged nested",
        json.dumps({"records": [row], "explain": json.loads(nested(900))}): "K must be a whole",
        json.dumps({"records": {"x0": 1}}): "'records' must be a non-empty list",
        json.dumps({"records": [row], "anomaly_map": "yes"}): "must be true or false",
        json.dumps({"instances": [["1"] * 64]}): "non-numeric value (str '1')",
        '"just a string"': "the body must be a JSON object",
        "": "not valid JSON",
    }
    for body, message in cases.items():
        response = server.post("/score", content=body.encode())
        assert response.status_code == 422, (body[:80], response.text[:300])
        assert message in response.json()["detail"], (message, response.text[:300])


@pytest.mark.parametrize(
    "body",
    [
        b'{"instances": [[1, 2.5, -0.0, 1e-310]], "explain": 3}',  # orjson's fast path
        b'{"instances": [[NaN, -Infinity, 1]]}',  # not JSON: only the standard parser takes it
        b'{"records": [{"x0": 123456789012345678901234567890}]}',  # orjson: a float at once
        '{"records": [{"x0": 1.5}]}'.encode("utf-16"),  # JSON in UTF-16
        b'{"a": 1, "a": 2}',  # a repeated key: the last wins in both
    ],
)
def test_the_fast_parser_accepts_exactly_what_the_standard_one_does(body: bytes) -> None:
    """Same structure and, once numbers become the float64 features they feed, same values."""

    def as_features(value: object) -> object:
        if isinstance(value, dict):
            return {key: as_features(item) for key, item in value.items()}
        if isinstance(value, list):
            return [as_features(item) for item in value]
        return float(value) if isinstance(value, int | float) else value

    assert json.dumps(as_features(load_json(body))) == json.dumps(as_features(json.loads(body)))


def test_openapi_documents_the_body_and_every_error(model) -> None:
    with TestClient(create_app(model["path"], token="s3cret")) as client:
        schema = client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
    score = schema["paths"]["/score"]["post"]
    body = score["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ScoreRequest"}
    request = schema["components"]["schemas"]["ScoreRequest"]
    assert request["properties"]["records"]["items"]["required"] == FEATURES
    assert request["properties"]["instances"]["items"]["maxItems"] == 64
    assert set(score["responses"]) == {"200", "400", "401", "413", "422", "503"}
    assert score["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert set(schema["paths"]["/metadata"]["get"]["responses"]) == {"200", "401"}
    assert "401" not in schema["paths"]["/health"]["get"]["responses"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_schemathesis_finds_no_server_error(model) -> None:
    """Bounded fuzzing of every operation, with bodies that fit the schema and bodies that do
    not: no 5xx, and every answer is documented (status, content type, response schema)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    app = create_app(model["path"], max_batch=50, max_body_bytes=LIMIT)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/score", "/health", "/metadata", "/metrics"}
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    statuses: list[int] = []
    strategy = st.one_of([op.as_strategy(mode) for op in operations for mode in GenerationMode])

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case) -> None:
        response = case.call()
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks)

    fuzz()
    assert len(statuses) >= 20 and max(statuses) < 500
    assert {200, 422} <= set(statuses), sorted(set(statuses))


@pytest.mark.integration
def test_bearer_token_guards_everything_but_health(model, monkeypatch) -> None:
    app = create_app(model["path"], token="s3cret")
    row = {"records": records(model["X"][:1])}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/metadata", "/docs", "/openapi.json", "/metrics"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/score", json=row, headers=headers)
            assert response.status_code == 401 and "bearer token" in response.json()["detail"]
        assert client.get("/health").status_code == 200
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/score", json=row, headers=good).status_code == 200
        assert client.get("/docs", headers=good).status_code == 200
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    with pytest.raises(ValueError, match="environment variable NO_SUCH_TOKEN_VAR is not set"):
        token_from_env("NO_SUCH_TOKEN_VAR")
    monkeypatch.setenv("A_TOKEN_VAR", "t0ken")
    assert token_from_env("A_TOKEN_VAR") == "t0ken"
    with pytest.raises(ValueError, match="token must not be empty"):
        create_app(model["path"], token=" ")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name + (f"{{{wanted}}}" if labels else "")) + r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.integration
def test_metrics_count_requests_rows_and_latency(server, model) -> None:
    before = server.get("/metrics").text
    for _ in range(3):
        assert server.post("/score", json={"instances": model["X"][:2].tolist()}).is_success
    assert server.post("/score", content=b"{").status_code == 422
    after = server.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    ok = {"path": "/score", "status": "200"}
    name = "normalcy_http_requests_total"
    assert metric(after.text, name, **ok) - metric(before, name, **ok) == 3
    bad = {"path": "/score", "status": "422"}
    assert metric(after.text, name, **bad) - metric(before, name, **bad) == 1
    rows = "normalcy_scored_rows_total"
    assert metric(after.text, rows) - metric(before, rows) == 6
    latency = "normalcy_http_request_duration_seconds_count"
    assert metric(after.text, latency, path="/score") - metric(before, latency, path="/score") == 4


def test_batch_outputs_split_back_in_order() -> None:
    outputs = {"score": np.arange(6.0), "is_anomaly": np.arange(6) % 2 == 0}
    parts = split_outputs(outputs, [1, 3, 2])
    assert [part["score"].tolist() for part in parts] == [[0.0], [1.0, 2.0, 3.0], [4.0, 5.0]]
    assert parts[2]["is_anomaly"].tolist() == [True, False]


@pytest.mark.integration
def test_concurrent_single_rows_are_batched_and_each_gets_its_own_answer(model) -> None:
    app = create_app(model["path"], batching=BatchOptions(window_ms=20, max_rows=64, queue=64))
    X = model["X"][:48]
    expected = score_outputs(model["session"], X)[SCORE_NAME]
    answers: dict[int, httpx.Response] = {}

    def send(i: int, url: str) -> None:
        body = {"records": records(X[i : i + 1])} if i % 7 else {"records": [{"x0": 1.0}]}
        with httpx.Client(base_url=url, timeout=30) as client:
            answers[i] = client.post("/score", json=body)

    with running(app) as url:
        threads = [threading.Thread(target=send, args=(i, url)) for i in range(len(X))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        text = httpx.get(f"{url}/metrics").text
    for i, response in answers.items():
        if i % 7:
            assert response.status_code == 200, response.text
            assert np.float32(response.json()[SCORE_NAME][0]) == expected[i]
        else:  # a bad request among them fails alone, naming its field
            assert response.status_code == 422 and "missing feature 'x1'" in response.text
    assert len(answers) == len(X)
    calls = metric(text, "normalcy_batch_rows_count")
    batched_rows = metric(text, "normalcy_batch_rows_sum")
    assert batched_rows == len(X) - len(range(0, len(X), 7))
    assert calls < batched_rows  # some onnxruntime calls scored several requests' rows


def test_a_failing_request_in_a_batch_fails_alone_and_the_queue_is_bounded(model) -> None:
    loaded = load_model(model["path"], "m", None, SessionSettings(intra_op_threads=1))
    names = ("score",)

    async def scenario() -> list:
        batcher = MicroBatcher(window_s=0.05, max_rows=64, max_queue=3, metrics=None)
        batcher.start()
        good = np.ascontiguousarray(model["X"][:2], dtype=np.float32)
        wrong_width = good[:, :10]  # passes no checks: onnxruntime itself refuses it
        tasks = [
            batcher.score(loaded, good, names),
            batcher.score(loaded, wrong_width, names),
            batcher.score(loaded, good[:1], names),
            batcher.score(loaded, good, names),  # the fourth waiting request: queue full
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    first, failed, third, refused = asyncio.run(scenario())
    expected = score_outputs(model["session"], model["X"][:2])[SCORE_NAME]
    np.testing.assert_array_equal(first["score"], expected)
    np.testing.assert_array_equal(third["score"], expected[:1])
    assert not isinstance(failed, dict) and "10" in str(failed)
    assert getattr(refused, "status_code", None) == 503 and "(--batch-queue)" in refused.detail
    assert [len(group) for group in group_by_model([])] == []


def test_worker_threads_keep_workers_times_threads_within_the_cpus() -> None:
    assert worker_threads(1, cpus=8) == 8
    assert worker_threads(1, override=16, cpus=8) == 16  # one process: the override as given
    assert worker_threads(2, cpus=8) == 4
    assert worker_threads(3, cpus=8) == 2
    assert worker_threads(2, override=2, cpus=4) == 2
    with pytest.raises(ValueError, match="2 workers x 3 intra-op threads = 6 threads on 4"):
        worker_threads(2, override=3, cpus=4)
    with pytest.raises(ValueError, match="3 workers on 2 available CPUs"):
        worker_threads(3, cpus=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        worker_threads(0, cpus=2)


@pytest.mark.integration
def test_two_workers_serve_and_metrics_sum_over_both(model, tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SERVE_TOKEN": "tok", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "normalcy.cli", "serve", "--model", str(model["path"])]
    command += ["--port", str(port), "--workers", "2", "--intra-op-threads", "1"]
    (tmp_path / "params.yaml").write_text("scoring: {}\n")  # the defaults
    command += ["--token-env", "SERVE_TOKEN", "--params", str(tmp_path / "params.yaml")]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)  # noqa: S603
    headers = {"Authorization": "Bearer tok"}
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(40):  # new connections: the kernel spreads them over both workers
                with httpx.Client(base_url=client.base_url, timeout=30) as one:
                    body = {"records": records(model["X"][:1])}
                    assert one.post("/score", json=body, headers=headers).status_code == 200
            text = client.get("/metrics", headers=headers).text
    finally:
        server.terminate()
        server.wait(timeout=60)
    labels = {"path": "/score", "status": "200"}
    assert metric(text, "normalcy_http_requests_total", **labels) == 40
    assert metric(text, "normalcy_scored_rows_total") == 40


def test_serve_refuses_bad_settings_before_starting(model, tmp_path, monkeypatch, capsys) -> None:
    from normalcy.cli import main

    (tmp_path / "params.yaml").write_text("scoring: {}\n")
    base = ["serve", "--model", str(model["path"]), "--params", str(tmp_path / "params.yaml")]
    monkeypatch.delenv("UNSET_SERVE_TOKEN", raising=False)
    cases = [
        (["--token-env", "UNSET_SERVE_TOKEN"], "environment variable UNSET_SERVE_TOKEN is not set"),
        (["--workers", "2", "--intra-op-threads", "999"], "available CPUs"),
        (["--workers", "0"], "--workers"),
        (["--batch-window-ms", "-1"], "--batch-window-ms"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
    ]
    for flags, message in cases:
        assert main([*base, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def load_serving_benchmark():
    """benchmarks/load_serving.py as a module."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import load_serving
    finally:
        sys.path.pop(0)
    return load_serving


@pytest.mark.integration
def test_load_benchmark_measures_a_configuration(model) -> None:
    """benchmarks/load_serving.py's interface: the JSON keys of one configuration, from a
    short run against a real `normalcy serve` (a figure of speed is not asserted)."""
    load_serving = load_serving_benchmark()
    row = model["X"][0].tolist()
    result = load_serving.measure(model["path"], row, 1, 1.0, 4, 0.5, 400)
    assert {"clients", "requests", "errors", "rps", "p50_ms", "p99_ms"} <= set(result)
    assert result["clients"] == 4 and result["errors"] == 0
    assert 0 < result["requests"] <= 400 and result["rps"] > 0
    assert result["p50_ms"] <= result["p99_ms"] and result["client_cpu_s"] > 0
    assert load_serving.app_cpu_us_per_request(model["path"], row, batching=True, n=50) > 0


def test_the_app_itself_answers_400_to_a_content_length_that_is_not_a_number(model) -> None:
    """uvicorn refuses such a header before the app (the socket test above); another ASGI
    server may pass it through, and then the app must say 400 itself."""
    app = create_app(model["path"])
    sent: list[dict] = []
    scope = load_serving_benchmark().post_score_scope([(b"content-length", b"ten")])

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    app.state.store.stop()
    assert sent[0]["status"] == 400
    assert "Content-Length 'ten' is not a whole number" in json.loads(sent[1]["body"])["detail"]
