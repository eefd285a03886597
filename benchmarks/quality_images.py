"""Image quality benchmark on MVTec-layout folders: image and pixel metrics of the image detectors,
scored through their exported ONNX graphs by onnxruntime.

    python benchmarks/quality_images.py --data-dir DIR [--categories A,B] [--detectors A,B]
        [--image-size 256] [--out results.json]

DIR is one MVTec-layout category folder (train/good, test/<defect or good>, ground_truth) or a
folder of them. Per category it runs the pipeline's own pieces: `load_mvtec` (images resized to
`--image-size`, masks binarized at > 127), `Detector.fit` on train/good less a held-out tenth
(the held-out tenth as its validation rows: `fastflow` stops early on them), `export_onnx` with
the held-out scores as calibration (threshold at their 99th percentile), and
onnxruntime (`normalcy.scoring.score_outputs`) for the test part's `score` and `anomaly_map`.
Metrics on raw scores and maps (`normalcy.evaluation`): image AUROC/AUPRC, pixel AUROC, AUPRO to
FPR 0.3 and a per-defect image AUROC. `score_ms_per_image` is the median onnxruntime latency of
one image (batch 1) over `--latency-images` test images after a warm-up, with the session's
threads = torch's thread count (OMP_NUM_THREADS when set); printed with the table.

JSON: `results[category][detector] = {image_auroc, image_auprc, pixel_auroc, aupro, fit_seconds,
score_ms_per_image, uses_pretrained, per_defect: {defect: {image_auroc, n}}, ...}` and
`summary = {default_detector}`: the first detector of examples/images.yaml's `train.candidates`
when that file exists, else `DEFAULT_DETECTOR`."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import yaml

from normalcy.data.mvtec import load_mvtec
from normalcy.data.sources import Dataset
from normalcy.detectors import create_detector
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.evaluation.pixel_metrics import per_defect_metrics, pixel_metrics
from normalcy.export import export_onnx
from normalcy.scoring import load_session
from normalcy.scoring.session import score_outputs

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PARAMS = REPO / "examples" / "images.yaml"
DEFAULT_DETECTOR = "padim"  # as examples/images.yaml, chosen on validation data
# Each detector's params, chosen on validation data only (benchmarks/image_validation.py:
# held-out train/good images with synthetic defects), never on a test folder.
DETECTOR_PARAMS: dict[str, dict[str, Any]] = {
    "patchcore": {},
    "padim": {},
    # stages 1-3: on validation at 128 px (10 epochs), pixel AUROC 0.808 and AUPRO 0.553 against
    # 0.773 and 0.466 for the default stages 2-3 (benchmarks/README.md)
    "fastflow": {"stages": [1, 2, 3]},
}
HELD_OUT_FRACTION = 0.1
CALIBRATION_QUANTILE = 0.99
SCORING_CHUNK = 8  # images per onnxruntime run when scoring the test part


def categories_in(data_dir: Path, wanted: list[str] | None) -> list[Path]:
    """The category folders: DIR itself when it has train/, else its sub-folders that do."""
    if (data_dir / "train").is_dir():
        found = [data_dir]
    else:
        found = sorted(p for p in data_dir.iterdir() if (p / "train").is_dir())
    if wanted:
        missing = sorted(set(wanted) - {p.name for p in found})
        if missing:
            raise SystemExit(
                f"no category {missing} in {data_dir}; found {[p.name for p in found]}"
            )
        found = [p for p in found if p.name in wanted]
    if not found:
        raise SystemExit(f"{data_dir}: no MVTec-layout category folder (train/good, test/...)")
    return found


def held_out_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): a seeded random tenth of train/good is held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(HELD_OUT_FRACTION * n)))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def latency_ms(session: ort.InferenceSession, images: np.ndarray) -> float:
    """Median milliseconds of one onnxruntime run on one image (after one warm-up run)."""
    name = session.get_inputs()[0].name
    session.run(None, {name: images[:1]})
    times = []
    for image in images:
        start = time.perf_counter()
        session.run(None, {name: image[None]})
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def fit_and_export(
    name: str, params: dict[str, Any], train: np.ndarray, folder: Path
) -> tuple[Any, Path, float]:
    """(fitted detector, its ONNX file, fit seconds): fit on all but the held-out tenth (its
    validation rows), export with the held-out scores as calibration."""
    fit_rows, held_rows = held_out_split(len(train))
    detector = create_detector(name, **params)
    start = time.perf_counter()
    detector.fit(train[fit_rows], train[held_rows])
    fit_seconds = time.perf_counter() - start
    calibration = detector.score(train[held_rows])
    threshold = float(np.quantile(calibration, CALIBRATION_QUANTILE))
    path = export_onnx(
        detector.scoring_module(),
        threshold,
        train[:2],
        folder / f"{name}.onnx",
        calibration_scores=calibration,
    )
    return detector, path, fit_seconds


def image_and_pixel_metrics(
    scores: np.ndarray, maps: np.ndarray, labels: np.ndarray, masks: np.ndarray, defects: np.ndarray
) -> dict[str, Any]:
    """Image AUROC/AUPRC, pixel AUROC, AUPRO@0.3 and per-defect image AUROC, on raw values."""
    image = ranking_metrics(labels, scores)
    pixel = pixel_metrics(maps, masks)
    return {
        "image_auroc": image["auroc"],
        "image_auprc": image["auprc"],
        "pixel_auroc": pixel["pixel_auroc"],
        "aupro": pixel["aupro"],
        "per_defect": {
            defect: {"image_auroc": row["image_auroc"], "n": row["n"]}
            for defect, row in per_defect_metrics(scores, defects).items()
        },
    }


def run_detector(
    name: str,
    params: dict[str, Any],
    train: Dataset,
    test: Dataset,
    threads: int,
    latency_images: int,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        detector, path, fit_seconds = fit_and_export(name, params, train.X, Path(tmp))
        session = load_session(path, intra_op_threads=threads)
        start = time.perf_counter()
        out = score_outputs(session, test.X, SCORING_CHUNK, ["score", "anomaly_map"])
        score_seconds = time.perf_counter() - start
        latency = latency_ms(session, test.X[:latency_images])
        onnx_mb = path.stat().st_size / 2**20
    return {
        **image_and_pixel_metrics(
            out["score"], out["anomaly_map"], test.y, test.masks, test.defects
        ),
        "fit_seconds": fit_seconds,
        "score_ms_per_image": latency,
        "score_seconds_test": score_seconds,
        "uses_pretrained": not detector.weights_source.startswith("random"),
        "weights_source": detector.weights_source,
        "onnx_mb": onnx_mb,
        "params": {**params},
    }


def default_detector() -> str:
    """The image example's first candidate, or `DEFAULT_DETECTOR` without that file."""
    if EXAMPLE_PARAMS.is_file():
        train = (yaml.safe_load(EXAMPLE_PARAMS.read_text()) or {}).get("train", {})
        candidates = train.get("candidates") or list(train.get("detectors", {}))
        if candidates:
            return candidates[0]
    return DEFAULT_DETECTOR


def print_table(results: dict[str, dict[str, dict[str, Any]]], threads: int) -> None:
    columns = ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "fit_seconds")
    print(f"\n| category | detector | {' | '.join(columns)} | score_ms_per_image ({threads} thr) |")
    print("|---" * (len(columns) + 3) + "|")
    for category, by_detector in results.items():
        for name, row in by_detector.items():
            values = " | ".join(
                f"{row[c]:.3f}" if c != "fit_seconds" else f"{row[c]:.0f}" for c in columns
            )
            print(f"| {category} | {name} | {values} | {row['score_ms_per_image']:.1f} |")
    for category, by_detector in results.items():
        for name, row in by_detector.items():
            defects = ", ".join(
                f"{d} {v['image_auroc']:.3f} (n={v['n']})" for d, v in row["per_defect"].items()
            )
            print(f"{category}/{name} per defect: {defects}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--categories", default=None, help="comma-separated folder names")
    parser.add_argument("--detectors", default=",".join(DETECTOR_PARAMS))
    parser.add_argument("--image-size", type=int, default=256, help="loader resize, pixels")
    parser.add_argument("--latency-images", type=int, default=20)
    parser.add_argument(
        "--scoring-threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (default: torch's, i.e. OMP_NUM_THREADS when set)",
    )
    parser.add_argument(
        "--detector-params",
        type=json.loads,
        default={},
        help='JSON {detector: {param: value}} over the chosen params, e.g. \'{"patchcore": '
        '{"image_size": 320}}\'',
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = args.scoring_threads or torch.get_num_threads()
    detectors = args.detectors.split(",")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for folder in categories_in(args.data_dir, args.categories and args.categories.split(",")):
        train = load_mvtec(folder, "train", args.image_size)
        test = load_mvtec(folder, "test", args.image_size)
        results[folder.name] = {}
        for name in detectors:
            logging.info("%s: %s", folder.name, name)
            params = {**DETECTOR_PARAMS.get(name, {}), **args.detector_params.get(name, {})}
            row = run_detector(name, params, train, test, threads, args.latency_images)
            results[folder.name][name] = row
            logging.info(
                "%s/%s: %s", folder.name, name, {k: v for k, v in row.items() if k != "per_defect"}
            )
    report = {
        "results": results,
        "summary": {"default_detector": default_detector()},
        "settings": {
            "image_size": args.image_size,
            "scoring_threads": threads,
            "torch_threads": torch.get_num_threads(),
            "command": sys.argv,
        },
    }
    print_table(results, threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
