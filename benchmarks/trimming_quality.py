"""Does loss truncation (`trim_fraction`) help the deep candidates on a contaminated training set?

    python benchmarks/trimming_quality.py --data-dir ../shared/data/tabular
        [--datasets NAME,NAME] [--seeds 0,1] [--detectors autoencoder,vae,flow,deep_svdd]
        [--fractions 0,0.05,0.1] [--trim-after 5] [--out results.json]

Same protocol as `quality_tabular.py`: per seed a stratified 70/30 split, the 70% keeps its
contamination, 80% of it are the fit rows (cleaned by params.yaml's `clean` section, labels
unseen) and 20% the validation rows that early stopping watches. Each detector is fitted with
params.yaml's settings and each `trim_fraction`, through the pipeline's own `build_candidate`
and `fit_detector`. The decision figure is **`val_auroc`**: AUROC on the validation rows with
their labels, which this benchmark alone reads (the training split's labels, never the 30%).
`test_auroc` on the 30% is reported beside it and must not be used to choose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_tabular import REPO, cleaned, labelled_split, load_npz  # noqa: E402

from normalcy.config import CleanParams, TrainParams, load_params  # noqa: E402
from normalcy.pipeline.train import build_candidate, fit_detector  # noqa: E402


def auroc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC, or NaN when the labels hold one class or a score is not finite."""
    if len(np.unique(labels)) < 2 or not np.isfinite(scores).all():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def run_table(
    X: np.ndarray,
    y: np.ndarray,
    seeds: list[int],
    train: TrainParams,
    clean: CleanParams,
    detectors: list[str],
    fractions: list[float],
    trim_after: int,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """results[detector][fraction] = {val_auroc, test_auroc, seconds}: one value per seed."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed in seeds:
        split = labelled_split(X, y, seed)
        fit, val, val_y = cleaned(split.fit, clean), split.val, split.val_y
        test_X, test_y = split.test_X, split.test_y
        seeded = train.model_copy(update={"seed": seed})
        for name in detectors:
            for fraction in fractions:
                params = {**train.detectors.get(name, {}), "trim_fraction": fraction}
                params["trim_after"] = trim_after
                started = time.perf_counter()
                detector = fit_detector(build_candidate(name, seeded, params), fit, val)
                seconds = time.perf_counter() - started
                cell = out.setdefault(name, {}).setdefault(str(fraction), {})
                cell.setdefault("val_auroc", []).append(auroc_or_nan(val_y, detector.score(val.X)))
                cell.setdefault("test_auroc", []).append(
                    auroc_or_nan(test_y, detector.score(test_X))
                )
                cell.setdefault("seconds", []).append(seconds)
    return out


def summary_table(
    results: dict[str, dict], detectors: list[str], fractions: list[float], key: str
) -> str:
    """Mean `key` x 100 per detector and fraction over tables (each a mean over seeds), and
    against fraction 0: tables better / worse by more than 0.5 point."""
    header = ["detector", *(f"trim {f:g}" for f in fractions), "better / worse than 0 (tables)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in detectors:
        per_table = {
            f: np.array([np.nanmean(row[name][str(f)][key]) for row in results.values()])
            for f in fractions
        }
        cells = [name] + [f"{100 * np.nanmean(per_table[f]):.1f}" for f in fractions]
        counts = []
        for f in fractions[1:]:
            gain = per_table[f] - per_table[fractions[0]]
            counts.append(f"{f:g}: {int((gain > 0.005).sum())} / {int((gain < -0.005).sum())}")
        lines.append("| " + " | ".join([*cells, "; ".join(counts)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--datasets", default=None, help="comma-separated file stems")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--detectors", default="autoencoder,vae,flow,deep_svdd")
    parser.add_argument("--fractions", default="0,0.05,0.1")
    parser.add_argument("--trim-after", type=int, default=5)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    files = sorted(args.data_dir.glob("*.npz"))
    if args.datasets:
        files = [f for f in files if f.stem in args.datasets.split(",")]
    if not files:
        sys.exit(f"{args.data_dir}: no matching *.npz files")
    params = load_params(args.params)
    seeds = [int(s) for s in args.seeds.split(",")]
    detectors = args.detectors.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    started = time.perf_counter()
    results = {}
    for i, path in enumerate(files, start=1):
        X, y = load_npz(path)
        results[path.stem] = run_table(
            X, y, seeds, params.train, params.clean, detectors, fractions, args.trim_after
        )
        line = ", ".join(
            f"{name} " + "/".join(f"{100 * np.nanmean(c['val_auroc']):.1f}" for c in row.values())
            for name, row in results[path.stem].items()
        )
        print(f"[{i}/{len(files)}] {path.stem}: val AUROC by fraction {fractions}: {line}")
        print(f"  ({time.perf_counter() - started:.0f} s so far)", flush=True)
    for key in ("val_auroc", "test_auroc"):
        print(f"\n{key} (mean over {len(files)} tables of the mean over seeds {seeds}):")
        print(summary_table(results, detectors, fractions, key))
    if args.out:
        payload = {
            "seeds": seeds,
            "fractions": fractions,
            "trim_after": args.trim_after,
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
