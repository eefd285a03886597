"""Load on `normalcy serve`: N concurrent clients sending single-row POST /score requests.

    python benchmarks/load_serving.py [--clients 16] [--seconds 5] [--max-requests 50000]
                                      [--out benchmarks/results/load_serving.json]

Trains the autoencoder briefly on the fixed dataset of speed_scoring.py, exports its production
graph (with p_value), and for each configuration (1 or 2 workers, with or without
micro-batching) starts `normalcy serve` in its own process on 127.0.0.1 and drives it from a
second process: N asyncio clients, one keep-alive connection each, one request at a time,
pre-encoded single-row bodies, stopped after `--seconds` or `--max-requests`. Loopback only.
The clients speak HTTP/1.1 over asyncio streams directly rather than through httpx: the
generator shares the machine's cores with the server, and httpx costs more CPU per request
than the server itself, so it would measure the client. Each worker gets 1 onnxruntime thread.

Per configuration (JSON): clients, requests, errors (non-200 or a body without scores), rps,
p50_ms, p99_ms, in_process_rows_per_s (onnxruntime in this process, batch 1, same graph), and
the CPU seconds the server (all its processes) and the load generator used during the run:
they share this machine's cores, so `client_cpu_share` says how much of the machine the
generator itself took, and `requests_per_server_cpu_s` is the server's cost per request
whatever else runs beside it; and `app_cpu_us_per_request`: CPU per single-row request
through the ASGI app in-process, one at a time, no sockets (the service's own Python cost).
Compare configurations of one run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_scoring import latencies_ms, load_data, train_and_export  # noqa: E402

from normalcy.serving.server import wait_until_healthy  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (label, workers, micro-batching on)
    ("1 worker", 1, False),
    ("1 worker + batching", 1, True),
    ("2 workers", 2, False),
    ("2 workers + batching", 2, True),
]
GOAL_RPS, GOAL_P99_MS = 5 * 398, 50.0  # issue 12: 5x the single-client rate of before
_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the load generator (its own process) ----------------------------------------------------


async def _client(port: int, request: bytes, stop_at: float, budget: list, out: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while budget[0] > 0 and time.perf_counter() < stop_at:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            out["latencies"].append(time.perf_counter() - started)
            if head[9:12] != b"200" or b'"score"' not in body:
                out["errors"] += 1
    finally:
        writer.close()


async def _drive(port: int, request: bytes, clients: int, seconds: float, max_requests: int):
    out = {"latencies": [], "errors": 0}
    budget = [max_requests]
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_client(port, request, stop_at, budget, out) for _ in range(clients)))
    out["wall_s"] = time.perf_counter() - started
    return out


def generate_load(
    port: int,
    request: bytes,
    clients: int,
    seconds: float,
    max_requests: int,
    results: multiprocessing.Queue,
) -> None:
    """Run the clients; put (latencies, errors, wall seconds, CPU seconds) on `results`."""
    cpu = time.process_time()
    out = asyncio.run(_drive(port, request, clients, seconds, max_requests))
    results.put((out["latencies"], out["errors"], out["wall_s"], time.process_time() - cpu))


# --- the app alone, without a network ----------------------------------------------------------


def app_cpu_us_per_request(model: Path, row: list, batching: bool, n: int = 3000) -> float:
    """CPU microseconds per single-row POST /score through the ASGI app in this process, one
    request at a time, no sockets: what the service's own Python costs per request."""
    from normalcy.scoring import SessionSettings
    from normalcy.serving import BatchOptions, create_app

    app = create_app(
        model,
        settings=SessionSettings(intra_op_threads=1),
        batching=BatchOptions(window_ms=0) if batching else None,
    )
    body = json.dumps({"instances": [row]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/score",
        "raw_path": b"/score",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def one() -> None:
        status = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"POST /score answered {status}")

    async def run() -> float:
        async with app.router.lifespan_context(app):
            for _ in range(200):
                await one()
            started = time.process_time()
            for _ in range(n):
                await one()
            return (time.process_time() - started) / n * 1e6

    return asyncio.run(run())


# --- one configuration -----------------------------------------------------------------------


def _cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(
    model: Path,
    row: list,
    workers: int,
    window_ms: float | None,
    clients: int,
    seconds: float,
    max_requests: int,
) -> dict:
    """Start the server, warm it up, drive it, stop it; the figures of this configuration."""
    port = _free_port()
    command = [sys.executable, "-m", "normalcy.cli", "serve", "--model", str(model)]
    command += ["--port", str(port), "--workers", str(workers), "--intra-op-threads", "1"]
    command += ["--params", str(REPO_ROOT / "params.yaml"), "--log-level", "warning"]
    if window_ms is not None:
        command += ["--batch-window-ms", str(window_ms)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    body = json.dumps({"instances": [row]}).encode()
    request = (
        b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", server)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        warmup = (port, request, clients, 1.0, 2000, queue)
        warm = context.Process(target=generate_load, args=warmup)
        warm.start()
        queue.get(timeout=120)
        warm.join()
        server_cpu = _cpu_seconds(psutil.Process(server.pid))
        driver = context.Process(
            target=generate_load, args=(port, request, clients, seconds, max_requests, queue)
        )
        driver.start()
        latencies, errors, wall_s, client_cpu = queue.get(timeout=seconds + 120)
        driver.join()
        server_cpu = _cpu_seconds(psutil.Process(server.pid)) - server_cpu
    finally:
        server.terminate()
        server.wait(timeout=60)
    ms = np.asarray(latencies) * 1e3
    cpus = psutil.cpu_count()
    return {
        "clients": clients,
        "workers": workers,
        "batch_window_ms": window_ms,
        "requests": len(ms),
        "errors": errors,
        "rps": len(ms) / wall_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "wall_s": wall_s,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "client_cpu_share": client_cpu / (wall_s * cpus),
        "server_cpu_share": server_cpu / (wall_s * cpus),
        "requests_per_server_cpu_s": len(ms) / server_cpu if server_cpu > 0 else None,
        "machine_cpus": cpus,
    }


def print_table(rows: list[dict]) -> None:
    header = (
        "configuration",
        "clients",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p99 ms",
        "server CPU",
        "client CPU",
    )
    print(" | ".join(header))
    for r in rows:
        print(
            " | ".join(
                [
                    r["label"],
                    str(r["clients"]),
                    str(r["requests"]),
                    str(r["errors"]),
                    f"{r['rps']:.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['server_cpu_share']:.0%}",
                    f"{r['client_cpu_share']:.0%}",
                ]
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=50_000)
    parser.add_argument("--baseline-clients", type=int, default=1, help="also run with this many")
    parser.add_argument("--batch-window-ms", type=float, default=1.0, help="when batching")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks/results/load_serving.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    X, data_name = load_data()
    print(f"data: {data_name}; {psutil.cpu_count()} CPUs; load average {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="load-serving-") as folder:
        built = train_and_export("autoencoder", X, Path(folder))
        if isinstance(built, str):
            raise SystemExit(f"autoencoder: {built}")
        _, plain, with_p_value, _ = built
        model = with_p_value or plain
        from normalcy.scoring import load_session

        session = load_session(model, intra_op_threads=1)
        name = session.get_inputs()[0].name
        one = X[:1]
        in_process = float(1e3 / latencies_ms(lambda: session.run(None, {name: one})).mean())
        app_us = {b: app_cpu_us_per_request(model, X[0].tolist(), b) for b in (False, True)}
        plan = [(f"1 worker, {args.baseline_clients} client(s)", args.baseline_clients, 1, None)]
        plan += [
            (label, args.clients, workers, args.batch_window_ms if batching else None)
            for label, workers, batching in CONFIGS
        ]
        for label, clients, workers, window in plan:
            result = measure(
                model, X[0].tolist(), workers, window, clients, args.seconds, args.max_requests
            )
            result |= {
                "label": label,
                "in_process_rows_per_s": in_process,
                "app_cpu_us_per_request": app_us[window is not None],
            }
            rows.append(result)
            print(f"{label}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.2f} ms")
    print(f"\nin-process onnxruntime, batch 1, 1 thread: {in_process:.0f} rows/s")
    print(
        f"the app alone (ASGI, no sockets, one request at a time): {app_us[False]:.0f} us CPU "
        f"per request, {app_us[True]:.0f} us with batching on (batches of one)"
    )
    print(f"load average at the end: {os.getloadavg()} on {psutil.cpu_count()} CPUs")
    print_table(rows)
    for r in rows:
        r["goal_met"] = bool(
            r["clients"] >= 16
            and r["rps"] >= GOAL_RPS
            and r["p99_ms"] < GOAL_P99_MS
            and r["errors"] == 0
        )
    met = [r["label"] for r in rows if r["goal_met"]]
    print(
        f"goal (16 clients, >= {GOAL_RPS} req/s, p99 < {GOAL_P99_MS:g} ms, no errors): "
        f"{'met by ' + ', '.join(met) if met else 'not met'}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
