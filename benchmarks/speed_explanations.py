"""What leave-feature-out contributions cost: onnxruntime rows/s with and without them.

    python benchmarks/speed_explanations.py [--detectors deep_svdd,flow,dagmm]
        [--features 8,32] [--rows 20000] [--out explanations.json]

For each detector that explains by leave-feature-out (default: every registered one that does)
and each feature count d, it trains briefly on Gaussian rows, exports the graph with
`feature_contributions` (`scoring_module()`) and without (`score_only_module()`), and scores the
same rows with onnxruntime in runs of `ROWS_PER_RUN` rows, the best of three passes. The graph
with contributions runs d + 1 copies of each row, so expect a slowdown of about d + 1 or less.
Thread counts follow OMP_NUM_THREADS (one intra-op thread when unset); compare the ratios of
one run rather than absolute rates, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def rows_per_second(path: Path, X: np.ndarray, threads: int) -> float:
    """The best of three passes of onnxruntime over `X`, in rows per second."""
    from normalcy.scoring import load_session, score_outputs

    session = load_session(path, intra_op_threads=threads)
    score_outputs(session, X[:100])  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        score_outputs(session, X)
        best = min(best, time.perf_counter() - start)
    return len(X) / best


def measure(name: str, n_features: int, n_rows: int, threads: int, folder: Path) -> dict:
    """Rows/s of `name`'s graph with and without contributions, for `n_features` features."""
    from normalcy.detectors import create_detector
    from normalcy.export import export_onnx

    rng = np.random.default_rng(0)
    train = rng.normal(size=(1000, n_features)).astype(np.float32)
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    detector = create_detector(name, epochs=2, seed=0, threads=threads, leave_feature_out=True)
    detector.fit(train)
    rates = {}
    for label, module in (
        ("without", detector.score_only_module()),
        ("with", detector.scoring_module()),
    ):
        path = export_onnx(module, 1.0, X[:2], folder / f"{name}_{n_features}_{label}.onnx")
        rates[label] = rows_per_second(path, X, threads)
    return {
        "detector": name,
        "n_features": n_features,
        "rows_per_s_without": rates["without"],
        "rows_per_s_with": rates["with"],
        "slowdown": rates["without"] / rates["with"],
    }


def main() -> None:
    from normalcy.detectors import available_detectors, create_detector

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--detectors", default=None, help="comma-separated names")
    parser.add_argument("--features", default="8,32", help="comma-separated feature counts")
    parser.add_argument("--rows", type=int, default=20000, help="rows scored per pass")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    names = (
        args.detectors.split(",")
        if args.detectors
        else [
            name
            for name in available_detectors()
            if getattr(create_detector(name), "explains_by_leaving_features_out", False)
        ]
    )
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for n_features in map(int, args.features.split(",")):
                row = measure(name, n_features, args.rows, threads, Path(tmp))
                results.append(row)
                print(
                    f"{name:10s} d={n_features:3d}  without {row['rows_per_s_without']:12.0f} "
                    f"rows/s  with contributions {row['rows_per_s_with']:12.0f} rows/s  "
                    f"({row['slowdown']:.1f}x slower)",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
