"""Scoring speed: torch eager vs the exported ONNX graph in onnxruntime, and over HTTP.

    python benchmarks/speed_scoring.py [--detectors NAME,NAME] [--out speed.json]

For each exportable detector (default: every registered one; others are skipped with a note) it
trains briefly on a fixed dataset (ADBench cardio from ../shared when present, sklearn digits
otherwise), exports the graph with normalcy.export.export_onnx, and measures in this one process:

- rows/s at batch 1024, and rows/s with p50/p99 latency at batch 1, for torch eager (eval mode,
  no_grad, the detector's `scoring_module()`) and for an onnxruntime session of the same
  computation (the graph exported without calibration scores: score and is_anomaly);
- ratio = ORT rows/s / torch rows/s (> 1: onnxruntime is faster);
- the production graph too (exported with calibration scores, so it also computes the conformal
  p_value: a binary search tree over the sorted calibration scores, about log2(n) comparisons
  per row), as `ort_pvalue_graph_*`, and `p_value keeps`: its throughput at batch 1024 over
  the graph without p_value, the two measured in turn three times each. onnxruntime
  runs every node whatever outputs are requested, so this is what `normalcy score` pays;
- FLOPs per row, counted on the ONNX graph: every MatMul/Gemm whose weight is a constant of
  shape [K, M] costs K*M multiply-adds per row, i.e. 2*K*M FLOPs (Conv nodes are counted as
  2 * C_in/groups * kH * kW * C_out * H_out * W_out when shape inference knows the output size).
  Element-wise work (activations, the threshold and p-value head) is not counted: it is small
  next to the GEMMs and not limited by FLOP/s;
- the float32 GEMM GFLOP/s numpy reaches on this machine in the same run, with the same thread
  count (a 2048^3 matmul: `machine_gflops`; and a matmul shaped like the model's largest layer
  at batch 1024: `layer_gemm_gflops`), and the fraction of it ORT reaches at batch 1024;
- for the autoencoder only: single-row HTTP requests to `normalcy serve` (a separate process,
  one keep-alive client, one request at a time) against in-process ORT at batch 1.

torch and onnxruntime get the same thread count (torch's default, i.e. OMP_NUM_THREADS when
set), and so does numpy's BLAS for the GEMM reference; the script prints it. Compare ratios
measured in one run rather than absolute times: the machine may be shared.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CARDIO = REPO_ROOT.parent / "shared" / "data" / "tabular" / "6_cardio.npz"
TRAIN_PARAMS = {"epochs": 3, "pretrain_epochs": 1, "warmup_epochs": 1, "seed": 0}
MEASURE_SECONDS = 1.0  # per measurement, after a warm-up
ROUNDS = 3  # alternating measurements of the graphs with and without p_value
HTTP_DETECTOR = "autoencoder"
HTTP_SECONDS = 3.0


def load_data() -> tuple[np.ndarray, str]:
    """Normal rows of the fixed benchmark dataset, float32, and its name."""
    if CARDIO.is_file():
        with np.load(CARDIO) as archive:
            X, y = archive["X"].astype(np.float32), archive["y"]
        return X[y == 0], f"ADBench 6_cardio ({CARDIO}), normal rows"
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32), "sklearn digits (../shared data absent)"


# --- timing ------------------------------------------------------------------------------------


def throughput(run: Callable[[], object], rows: int) -> float:
    """Rows per second of `run()` (which scores `rows` rows), over about MEASURE_SECONDS."""
    run()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= MEASURE_SECONDS and calls >= 5:
            return calls * rows / elapsed


def latencies_ms(run: Callable[[], object], seconds: float = MEASURE_SECONDS) -> np.ndarray:
    """Per-call wall times in ms of `run()`, for about `seconds` (after 20 warm-up calls)."""
    for _ in range(20):
        run()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 100:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return np.asarray(times) * 1e3


def tile_rows(X: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(X, (n, *X.shape[1:])))


# --- FLOPs ------------------------------------------------------------------------------------


def graph_flops_per_row(onnx_path: Path) -> tuple[float | None, list[tuple[int, int]]]:
    """(FLOPs per row, [(K, M) of each counted GEMM]) from the ONNX graph; None if nothing
    countable (e.g. tree ensembles)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            constants[node.output[0]] = tuple(node.attribute[0].t.dims)
    shapes = {}
    for value in (*graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    flops, layers = 0.0, []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            weight = next((constants[i] for i in node.input[1:2] if i in constants), None)
            if weight is None or len(weight) != 2:
                continue
            k, m = int(weight[0]), int(weight[1])
            flops += 2.0 * k * m
            layers.append((k, m))
        elif node.op_type == "Conv":
            kernel = constants.get(node.input[1])
            out = shapes.get(node.output[0])
            if kernel is None or not out or any(d is None for d in out[2:]):
                continue
            c_out, c_in_per_group, *window = kernel
            flops += 2.0 * c_out * c_in_per_group * float(np.prod(window)) * float(np.prod(out[2:]))
    return (flops or None), layers


def gemm_gflops(n: int, k: int, m: int, seconds: float = MEASURE_SECONDS) -> float:
    """float32 GFLOP/s numpy reaches for an [n, k] @ [k, m] product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal((k, m), dtype=np.float32)
    rows_per_s = throughput(lambda: a @ b, n)
    return rows_per_s * 2.0 * k * m / 1e9


# --- one detector -----------------------------------------------------------------------------


def train_and_export(
    name: str, X: np.ndarray, folder: Path
) -> tuple[object, Path, Path | None, int] | str:
    """(detector, graph without p_value, graph with p_value or None, n calibration scores), or
    the reason it was skipped."""
    from normalcy.detectors import accepted_params, create_detector
    from normalcy.export import export_onnx

    accepted = accepted_params(name)
    params = {k: v for k, v in TRAIN_PARAMS.items() if k in accepted}
    detector = create_detector(name, **params)
    if not getattr(detector, "exportable", True):
        return "not exportable (its inference is not a graph)"
    detector.fit(X)
    if not detector.exportable:
        return "not exportable after fitting"
    scores = detector.score(X)
    threshold = float(np.quantile(scores, 0.99))
    plain = export_onnx(detector.scoring_module(), threshold, X[:2], folder / f"{name}.onnx")
    with_p_value = None
    if "calibration_scores" in inspect.signature(export_onnx).parameters:
        with_p_value = export_onnx(
            detector.scoring_module(),
            threshold,
            X[:2],
            folder / f"{name}.p_value.onnx",
            calibration_scores=scores,
        )
    return detector, plain, with_p_value, len(scores)


def measure(detector: object, path: Path, X: np.ndarray, threads: int) -> dict:
    """torch eager vs onnxruntime on the graph at `path`, plus its FLOPs per row."""
    import torch

    from normalcy.scoring import SessionSettings, load_session

    session = load_session(path, settings=SessionSettings(intra_op_threads=threads))
    input_name = session.get_inputs()[0].name
    module = detector.scoring_module().eval()
    b1024, b1 = tile_rows(X, 1024), X[:1].copy()
    t1024, t1 = torch.from_numpy(b1024), torch.from_numpy(b1)

    def torch_run(batch: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(batch)

        return run

    def ort_run(batch: np.ndarray) -> Callable[[], object]:
        return lambda: session.run(None, {input_name: batch})

    result = {
        "ort_rows_per_s_b1024": throughput(ort_run(b1024), 1024),
        "torch_rows_per_s_b1024": throughput(torch_run(t1024), 1024),
    }
    ort_ms, torch_ms = latencies_ms(ort_run(b1)), latencies_ms(torch_run(t1))
    result.update(
        ort_p50_ms_b1=float(np.percentile(ort_ms, 50)),
        ort_p99_ms_b1=float(np.percentile(ort_ms, 99)),
        torch_p50_ms_b1=float(np.percentile(torch_ms, 50)),
        torch_p99_ms_b1=float(np.percentile(torch_ms, 99)),
        ort_rows_per_s_b1=float(1e3 / ort_ms.mean()),
        torch_rows_per_s_b1=float(1e3 / torch_ms.mean()),
    )
    result["ratio_b1024"] = result["ort_rows_per_s_b1024"] / result["torch_rows_per_s_b1024"]
    result["ratio_b1"] = result["ort_rows_per_s_b1"] / result["torch_rows_per_s_b1"]
    flops, layers = graph_flops_per_row(path)
    result["flops_per_row"] = flops
    result["flops_method"] = "ONNX graph: 2*K*M per MatMul/Gemm with a constant [K, M] weight"
    if flops:
        achieved = flops * result["ort_rows_per_s_b1024"] / 1e9
        result["ort_gflops_b1024"] = achieved
        k, m = max(layers, key=lambda km: km[0] * km[1]) if layers else (X.shape[1], 64)
        result["layer_gemm_gflops"] = gemm_gflops(1024, k, m)
        result["largest_layer"] = [k, m]
    return result


def measure_ort_graph(path: Path, plain_path: Path, X: np.ndarray, threads: int) -> dict:
    """rows/s at batch 1024 and p50/p99 at batch 1 of every output of the graph at `path`, and
    the share of the plain graph's throughput it keeps: both measured in turn, ROUNDS times
    each, side by side so that a busy neighbour slows both alike (ratio of the medians)."""
    from normalcy.scoring import SessionSettings, load_session

    settings = SessionSettings(intra_op_threads=threads)
    session, plain = (
        load_session(path, settings=settings),
        load_session(plain_path, settings=settings),
    )
    name = session.get_inputs()[0].name
    b1024, b1 = tile_rows(X, 1024), X[:1].copy()
    ms = latencies_ms(lambda: session.run(None, {name: b1}))
    with_p, without_p = [], []
    for _ in range(ROUNDS):
        with_p.append(throughput(lambda: session.run(None, {name: b1024}), 1024))
        without_p.append(throughput(lambda: plain.run(None, {name: b1024}), 1024))
    return {
        "ort_pvalue_graph_rows_per_s_b1024": float(np.median(with_p)),
        "ort_pvalue_graph_p50_ms_b1": float(np.percentile(ms, 50)),
        "ort_pvalue_graph_p99_ms_b1": float(np.percentile(ms, 99)),
        "ort_pvalue_graph_rows_per_s_b1": float(1e3 / ms.mean()),
        "p_value_keeps_b1024": float(np.median(with_p) / np.median(without_p)),
    }


# --- HTTP -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_http(path: Path, X: np.ndarray, threads: int, ort_rows_per_s_b1: float) -> dict:
    """Single-row POST /score requests, one at a time from one keep-alive client, to
    `normalcy serve` running in its own process."""
    import httpx

    from normalcy.serving.server import wait_until_healthy

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "normalcy.cli",
        "serve",
        "--model",
        str(path),
        "--port",
        str(port),
        "--intra-op-threads",
        str(threads),
        "--params",
        str(REPO_ROOT / "params.yaml"),
    ]
    server = subprocess.Popen(  # noqa: S603 - our own CLI
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server)
        with httpx.Client(base_url=url, timeout=30) as client:
            body = json.dumps({"instances": X[:1].tolist()})
            headers = {"content-type": "application/json"}

            def request() -> None:
                response = client.post("/score", content=body, headers=headers)
                response.raise_for_status()

            ms = latencies_ms(request, HTTP_SECONDS)
    finally:
        server.terminate()
        server.wait(timeout=30)
    rps = float(1e3 / ms.mean())
    return {
        "detector": HTTP_DETECTOR,
        "client": "one httpx keep-alive client in this process, one request at a time",
        "server": f"normalcy serve in a separate process, intra_op_threads={threads}",
        "requests_per_s": rps,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "inprocess_ort_rows_per_s_b1": ort_rows_per_s_b1,
        "ratio_http_vs_inprocess_b1": rps / ort_rows_per_s_b1,
    }


# --- main ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def print_table(results: dict, machine_gflops: float) -> None:
    print(
        "\n| detector | ORT rows/s b1024 | torch rows/s b1024 | ratio b1024 | ORT p50/p99 ms b1 "
        "| torch p50/p99 ms b1 | ratio b1 | FLOPs/row | ORT GFLOP/s b1024 | of machine "
        "| ORT+p_value rows/s b1024 | p_value keeps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        gflops = r.get("ort_gflops_b1024")
        share = f"{gflops / machine_gflops:.1%}" if gflops else "n/a"
        print(
            f"| {name} | {_fmt(r['ort_rows_per_s_b1024'])} | {_fmt(r['torch_rows_per_s_b1024'])} "
            f"| {r['ratio_b1024']:.2f} | {r['ort_p50_ms_b1']:.3f}/{r['ort_p99_ms_b1']:.3f} "
            f"| {r['torch_p50_ms_b1']:.3f}/{r['torch_p99_ms_b1']:.3f} | {r['ratio_b1']:.2f} "
            f"| {_fmt(r['flops_per_row'])} | {_fmt(gflops)} | {share} "
            f"| {_fmt(r.get('ort_pvalue_graph_rows_per_s_b1024'))} "
            f"| {_fmt(r.get('p_value_keeps_b1024'), 2)} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--detectors", default=None, help="comma-separated names (default: every exportable one)"
    )
    parser.add_argument("--out", default="speed.json", help="JSON results (default speed.json)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from threadpoolctl import threadpool_limits

    from normalcy.detectors import available_detectors

    names = args.detectors.split(",") if args.detectors else available_detectors()
    unknown = sorted(set(names) - set(available_detectors()))
    if unknown:
        parser.error(f"unknown detector(s) {unknown}; expected some of {available_detectors()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    X, dataset = load_data()
    print(f"dataset: {dataset}: {X.shape[0]} rows x {X.shape[1]} features")
    print(
        f"threads: torch.set_num_threads({threads}), onnxruntime intra_op_threads={threads}, "
        f"numpy BLAS threads={threads} (os.cpu_count()={os.cpu_count()})"
    )
    with threadpool_limits(limits=threads):
        machine_gflops = gemm_gflops(2048, 2048, 2048)
    print(f"machine: numpy float32 GEMM 2048x2048x2048 = {machine_gflops:.1f} GFLOP/s")

    results: dict[str, dict] = {}
    http: dict = {}
    with tempfile.TemporaryDirectory(prefix="normalcy-speed-") as folder:
        for name in names:
            started = time.perf_counter()
            try:
                built = train_and_export(name, X, Path(folder))
            except Exception as exc:  # a detector still being written must not stop the rest
                print(
                    f"note: skipped {name}: training or export failed ({type(exc).__name__}: {exc})"
                )
                continue
            if isinstance(built, str):
                print(f"note: skipped {name}: {built}")
                continue
            detector, path, p_value_path, n_calibration = built
            with threadpool_limits(limits=threads):
                results[name] = measure(detector, path, X, threads)
                if p_value_path is not None:
                    results[name].update(measure_ort_graph(p_value_path, path, X, threads))
                    results[name]["n_calibration_scores"] = n_calibration
            results[name]["machine_gflops"] = machine_gflops
            results[name]["threads"] = threads
            print(f"{name}: measured ({time.perf_counter() - started:.0f} s with training)")
            if name == HTTP_DETECTOR:
                # The graph `normalcy serve` would really serve, against the same graph in-process.
                r = results[name]
                served = p_value_path or path
                in_process = r.get("ort_pvalue_graph_rows_per_s_b1", r["ort_rows_per_s_b1"])
                http = measure_http(served, X, threads, in_process)

    print_table(results, machine_gflops)
    if http:
        print(
            f"\nHTTP ({http['detector']}, single-row requests, one client): "
            f"{http['requests_per_s']:.0f} req/s, p50 {http['p50_ms']:.2f} ms, p99 "
            f"{http['p99_ms']:.2f} ms = {http['ratio_http_vs_inprocess_b1']:.3f} x in-process "
            f"ORT at batch 1 ({http['inprocess_ort_rows_per_s_b1']:.0f} rows/s)"
        )
    else:
        print(f"\nHTTP: not measured ({HTTP_DETECTOR} was not benchmarked)")
    report = {
        "dataset": dataset,
        "threads": threads,
        "machine_gflops": machine_gflops,
        "results": results,
        "http": http,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
