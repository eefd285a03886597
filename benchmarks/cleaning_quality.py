"""How well does cleaning remove the anomalies that contaminate a training set?

    python benchmarks/cleaning_quality.py --data-dir ../shared/data/tabular
        [--datasets NAME,NAME] [--seeds 0,1,2] [--configs NAME,NAME] [--out results.json]

Same protocol and rows as `quality_tabular.py` (its `labelled_split`): per seed a stratified
70/30 split, the 70% keeps its contamination (capped at 10k rows), and of it the same 80% of fit
rows the pipeline would clean. Every cleaning
configuration (a detector and a cutoff rule, run by the pipeline's own `clean_training_split`)
cleans those fit rows without labels; the labels, which this benchmark alone reads, then give:

- `rate_before` / `rate_after`: the anomaly share of the fit rows before and after cleaning;
- `precision` / `recall`: of the rows removed, the share that were anomalies; of the anomalies,
  the share removed; `removed`: the share of fit rows removed;
- `knn_auroc`: test AUROC of a 5-NN distance detector (standardized, the `knn` candidate) fitted
  on the cleaned rows. kNN is the method whose ranking depends most on a clean training set (DTE,
  Livernoche et al. 2024: 80.9 clean vs 72.8 contaminated on ADBench), so it shows what the
  cleaning is worth downstream; `none` is the same kNN on the uncleaned rows, and `iforest` is
  scikit-learn's IsolationForest on the uncleaned 70%, the reference to beat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_tabular import MAX_TRAIN_ROWS, labelled_split, load_npz  # noqa: E402

from normalcy.config import CleanParams  # noqa: E402
from normalcy.data.splits import Split  # noqa: E402
from normalcy.detectors import create_detector  # noqa: E402
from normalcy.pipeline.clean import cleaning_detector  # noqa: E402
from normalcy.validation.cleaning import clean_training_split  # noqa: E402

IFOREST_KNN = {"members": ["iforest", "knn"]}
# kNN with k at 5% of the rows: above any cluster of contamination up to that share (masking)
KNN_WIDE = {"k_fraction": 0.05}
KNN_WIDE_MINMAX = {"k_fraction": 0.05, "preprocessing": "minmax"}
KNN_WIDER = {"k_fraction": 0.1}
KNN_WIDER_MINMAX = {"k_fraction": 0.1, "preprocessing": "minmax"}
IFOREST_KNN_WIDE = {**IFOREST_KNN, "member_params": {"knn": KNN_WIDE}}
IFOREST_KNN_WIDE_MINMAX = {**IFOREST_KNN, "member_params": {"knn": KNN_WIDE_MINMAX}}


@dataclass(frozen=True)
class Config:
    """One cleaning setting: the detector that scores the fit rows and the cutoff rule."""

    detector: str
    detector_params: dict
    mad_threshold: float = 3.5
    top_fraction: float | None = None
    max_iter: int = 3

    def clean_params(self) -> CleanParams:
        return CleanParams(
            detector=self.detector,
            detector_params=self.detector_params,
            mad_threshold=self.mad_threshold,
            top_fraction=self.top_fraction,
            max_iter=self.max_iter,
            epochs=30,
            threads=1,
            log_path="/dev/null",
        )


CONFIGS = {
    "autoencoder_mad3.5": Config("autoencoder", {}),  # params.yaml's default until 2026-12-01
    "iforest_mad3.5": Config("iforest", {}),
    "knn_mad3.5": Config("knn", {}),
    "iforest+knn_mad3.5": Config("ensemble", IFOREST_KNN),
    "iforest+knn_mad2.5": Config("ensemble", IFOREST_KNN, mad_threshold=2.5),
    "iforest+knn_top10": Config("ensemble", IFOREST_KNN, top_fraction=0.1),
    "autoencoder_top10": Config("autoencoder", {}, top_fraction=0.1),
    "knn5%_mad2.5": Config("knn", KNN_WIDE, mad_threshold=2.5),
    "knn5%minmax_mad2.5": Config("knn", KNN_WIDE_MINMAX, mad_threshold=2.5),
    "iforest+knn5%_mad2.5": Config("ensemble", IFOREST_KNN_WIDE, mad_threshold=2.5),
    "iforest+knn5%minmax_mad2.5": Config("ensemble", IFOREST_KNN_WIDE_MINMAX, mad_threshold=2.5),
    "iforest+knn5%_top10": Config("ensemble", IFOREST_KNN_WIDE, top_fraction=0.1),
    "knn5%minmax_mad2.5_iter6": Config("knn", KNN_WIDE_MINMAX, mad_threshold=2.5, max_iter=6),
    "knn10%_mad2.5": Config("knn", KNN_WIDER, mad_threshold=2.5),
    "knn10%minmax_mad2.5": Config("knn", KNN_WIDER_MINMAX, mad_threshold=2.5),
    # the params.yaml default: knn_wide is knn at k_fraction 0.05 in min-max units
    "knn_wide_mad2.5_iter6": Config("knn_wide", {}, mad_threshold=2.5, max_iter=6),
}


def knn_test_auroc(fit_X: np.ndarray, test_X: np.ndarray, test_y: np.ndarray) -> float:
    """Test AUROC of the `knn` candidate (k=5, standardized) fitted on `fit_X`."""
    detector = create_detector("knn", k=5, max_bank=MAX_TRAIN_ROWS).fit(fit_X)
    return float(roc_auc_score(test_y, detector.score(test_X)))


def run_config(
    config: Config, fit_X: np.ndarray, fit_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray
) -> dict[str, float]:
    """Clean the fit rows with `config` (labels unseen), then the figures of the module doc."""
    params = config.clean_params()
    start = time.perf_counter()
    split = Split(fit_X, None, np.arange(len(fit_X)))
    cleaned, result = clean_training_split(split, cleaning_detector(params), params)
    seconds = time.perf_counter() - start
    removed = ~result.kept
    anomalies = fit_y == 1
    hits = int((removed & anomalies).sum())
    return {
        "rate_before": float(anomalies.mean()),
        "rate_after": float(anomalies[result.kept].mean()),
        "removed": float(removed.mean()),
        "precision": hits / int(removed.sum()) if removed.any() else float("nan"),
        "recall": hits / int(anomalies.sum()) if anomalies.any() else float("nan"),
        "knn_auroc": knn_test_auroc(cleaned.X, test_X, test_y),
        "seconds": seconds,
    }


def mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def benchmark_table(
    path: Path, seeds: list[int], configs: dict[str, Config]
) -> dict[str, dict[str, float]]:
    """Every config's figures on one table, averaged over seeds, plus `none` and `iforest`."""
    X, y = load_npz(path)
    per_seed: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        split = labelled_split(X, y, seed)
        fit_X, fit_y, train_X = split.fit.X, split.fit_y, split.train_X
        test_X, test_y = split.test_X, split.test_y
        forest = IsolationForest(random_state=seed).fit(train_X)
        per_seed.setdefault("iforest", []).append(
            {"knn_auroc": float(roc_auc_score(test_y, -forest.score_samples(test_X)))}
        )
        rate = float(fit_y.mean())
        per_seed.setdefault("none", []).append(
            {"rate_before": rate, "rate_after": rate, "removed": 0.0,
             "knn_auroc": knn_test_auroc(fit_X, test_X, test_y)}
        )  # fmt: skip
        for name, config in configs.items():
            per_seed.setdefault(name, []).append(run_config(config, fit_X, fit_y, test_X, test_y))
            figures = per_seed[name][-1]
            print(
                f"  {path.stem} seed {seed} {name}: removed {figures['removed']:.3f}, "
                f"recall {figures['recall']:.2f}, knn AUROC {figures['knn_auroc']:.3f}",
                flush=True,
            )
    return {
        name: {key: mean([run[key] for run in runs]) for key in runs[0]}
        for name, runs in per_seed.items()
    }


def print_tables(results: dict[str, dict[str, dict[str, float]]], columns: list[str]) -> None:
    """One markdown table per figure: tables as rows, configs as columns, then the mean."""
    for figure in ("rate_after", "recall", "precision", "removed", "knn_auroc"):
        shown = [c for c in columns if figure in next(iter(results.values()))[c]]
        print(f"\n### {figure}\n")
        print("| table | " + " | ".join(shown) + " |")
        print("|---" * (len(shown) + 1) + "|")
        for table, row in results.items():
            cells = [f"{row[c][figure]:.3f}" for c in shown]
            print(f"| {table} | " + " | ".join(cells) + " |")
        means = [mean([row[c][figure] for row in results.values()]) for c in shown]
        print("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--datasets", default="", help="comma-separated file stems (default all)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {list(CONFIGS)}")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; expected some of {list(CONFIGS)}")
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    wanted = set(filter(None, args.datasets.split(",")))
    paths = [p for p in sorted(args.data_dir.glob("*.npz")) if not wanted or p.stem in wanted]
    if not paths:
        raise SystemExit(f"no .npz tables in {args.data_dir} (datasets: {sorted(wanted)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.stem}", flush=True)
        results[path.stem] = benchmark_table(path, seeds, configs)
    print_tables(results, ["none", *configs, "iforest"])
    if args.out:
        payload = {"seeds": seeds, "configs": {n: vars(c) for n, c in configs.items()}}
        args.out.write_text(json.dumps({**payload, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
