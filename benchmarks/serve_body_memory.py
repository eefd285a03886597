"""Memory of `normalcy serve` when a body over the size limit arrives.

    python benchmarks/serve_body_memory.py --model MODEL.onnx [--mib 48] [--pythonpath SRC]

Starts `normalcy serve` (from this tree, or the `src` folder given as `--pythonpath`, e.g. an
older checkout's, to compare) on 127.0.0.1, then sends a body of `--mib` MiB of single-row
`instances` twice, once with its Content-Length and once chunked, and prints the server's RSS
and peak RSS (VmHWM) before and after each, with the status and the start of each answer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil

from normalcy.serving.server import wait_until_healthy


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of process `pid` in MB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    peak_kb = int(next(line for line in status if line.startswith("VmHWM")).split()[1])
    return psutil.Process(pid).memory_info().rss / 2**20, peak_kb / 1024


def body_of(model: Path, mib: int) -> bytes:
    """About `mib` MiB of `{"instances": [...]}` rows of the model's width."""
    width = ort.InferenceSession(str(model)).get_inputs()[0].shape[1]
    row = json.dumps(np.random.default_rng(0).random(width).tolist()).encode()
    n = mib * 2**20 // (len(row) + 1)
    return b'{"instances": [' + b",".join([row] * n) + b"]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--mib", type=int, default=48)
    parser.add_argument("--pythonpath", default=None, help="run `normalcy serve` from this src")
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    with tempfile.TemporaryDirectory() as folder:
        params = Path(folder) / "params.yaml"
        params.write_text("scoring: {}\n")  # the defaults
        command = [sys.executable, "-m", "normalcy.cli", "serve", "--model", str(args.model)]
        command += ["--port", str(port), "--intra-op-threads", "1", "--params", str(params)]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, server)
            body = body_of(args.model, args.mib)
            print(f"body: {len(body) / 2**20:.1f} MiB")
            print("before: RSS {:.0f} MB, peak {:.0f} MB".format(*memory_mb(server.pid)))

            def chunks():  # no Content-Length: sent chunked
                for start in range(0, len(body), 2**20):
                    yield body[start : start + 2**20]

            for label, content in (("declared", body), ("chunked", chunks())):
                answer = httpx.post(f"{url}/score", content=content, timeout=300)
                print(f"{label}: HTTP {answer.status_code} {answer.text[:100]}")
                print("  after: RSS {:.0f} MB, peak {:.0f} MB".format(*memory_mb(server.pid)))
        finally:
            server.terminate()
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
