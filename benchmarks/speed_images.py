"""onnxruntime latency of one image for the image detectors, at a chosen bank size, per thread
count: the "one 256 x 256 image under 100 ms on 2 cores" goal, without a full fit.

    python benchmarks/speed_images.py [--image-size 256] [--bank-rows 6144] [--threads 1,2]
        [--detectors patchcore,padim,embedded] [--repeats 30] [--out FILE]

Scoring cost depends on the graph's shapes, not on what was learned: PatchCore's on its bank's
row count (the full magnetic tile fit at coreset 1% keeps 6144 rows of 600 x 1024 patches), so
patchcore is fitted here on `--fit-images` synthetic textures with the coreset fraction that
keeps `--bank-rows` rows. Each detector is exported with `export_onnx` and timed by
onnxruntime at batch 1 (median of `--repeats` runs after a warm-up) per intra-op thread count."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from normalcy.detectors import create_detector
from normalcy.export import export_onnx
from normalcy.scoring import load_session


def textures(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Grayscale stripes plus noise, 0..255 `[n, 1, size, size]`."""
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    images = 128 + 40 * np.sin(0.2 * xx + phase) + rng.normal(0, 8, size=(n, size, size))
    return np.clip(images, 0, 255)[:, None].astype(np.float32)


def median_ms(path: Path, image: np.ndarray, threads: int, repeats: int) -> float:
    session = load_session(path, intra_op_threads=threads)
    name = session.get_inputs()[0].name
    session.run(None, {name: image})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: image})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--bank-rows", type=int, default=6144)
    parser.add_argument("--fit-images", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--detectors", default="patchcore,padim,embedded")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    images = textures(args.fit_images, args.image_size)
    thread_counts = [int(t) for t in args.threads.split(",")]
    rows = {}
    for name in args.detectors.split(","):
        params = {}
        if name == "patchcore":
            patches = args.fit_images * (args.image_size // 8) ** 2  # stage 2: stride 8
            params["coreset_fraction"] = min(1.0, args.bank_rows / patches)
        detector = create_detector(name, **params).fit(images)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(detector.scoring_module(), 1.0, images[:2], Path(tmp) / "m.onnx")
            rows[name] = {
                "params": params,
                "bank_rows": len(detector.bank) if name == "patchcore" else None,
                "onnx_mb": path.stat().st_size / 2**20,
                "ms_per_image": {
                    t: median_ms(path, images[:1], t, args.repeats) for t in thread_counts
                },
            }
    print(
        f"\none {args.image_size} x {args.image_size} image, onnxruntime, median of {args.repeats}"
    )
    print(
        "| detector | bank rows | onnx MB | "
        + " | ".join(f"{t} thr ms" for t in thread_counts)
        + " |"
    )
    print("|---" * (3 + len(thread_counts)) + "|")
    for name, row in rows.items():
        times = " | ".join(f"{row['ms_per_image'][t]:.1f}" for t in thread_counts)
        print(f"| {name} | {row['bank_rows'] or '-'} | {row['onnx_mb']:.1f} | {times} |")
    if args.out:
        args.out.write_text(json.dumps({"image_size": args.image_size, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
