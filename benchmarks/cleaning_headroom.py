"""How much can cleaning give the label-free pick? A diagnostic, not a benchmark of a choice.

    python benchmarks/cleaning_headroom.py --data-dir ../shared/data/tabular
        [--datasets NAME,NAME] [--seeds 0,1,2] [--params params.yaml] [--out results.json]

`quality_tabular.py`'s splits (stratified 70/30, the 70% split 80/20 into fit and validation
rows). The `iforest` and `knn` candidates and their `consensus` (mean of robustly standardized
scores, normalized on the validation rows, as `normalcy train` builds it) are fitted on three
versions of the fit rows:

- `contaminated`: every fit row, as a pipeline without cleaning would;
- `cleaned`: the rows that `clean.*` of `--params` keeps (no label used);
- `normal`: the truly normal fit rows, found with the training labels. This is the ceiling that a
  perfect cleaning would reach; it is a DIAGNOSTIC that chooses nothing.

It prints the test AUROC of each (candidate, training set) and the cleaning's removal figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_tabular import REPO, labelled_split, load_npz  # noqa: E402

from normalcy.config import Params, TrainParams, load_params  # noqa: E402
from normalcy.data.splits import Split  # noqa: E402
from normalcy.detectors.ensemble import Ensemble  # noqa: E402
from normalcy.evaluation.metrics import ranking_metrics  # noqa: E402
from normalcy.pipeline.clean import cleaning_detector  # noqa: E402
from normalcy.pipeline.train import fit_candidate  # noqa: E402
from normalcy.validation.cleaning import clean_training_split  # noqa: E402

MEMBERS = ("iforest", "knn")
TRAINING_SETS = ("contaminated", "cleaned", "normal")


def test_aurocs(
    fit: Split, val: Split, test_X: np.ndarray, test_y: np.ndarray, train: TrainParams
) -> dict[str, float]:
    """Test AUROC of each member and of their consensus, all fitted on `fit` (labels unseen)."""
    detectors = {name: fit_candidate(name, fit, val, train)[0] for name in MEMBERS}
    detectors["consensus"] = Ensemble.from_fitted([detectors[n] for n in MEMBERS], val.X)
    return {n: ranking_metrics(test_y, d.score(test_X))["auroc"] for n, d in detectors.items()}


def run_table(path: Path, seeds: list[int], params: Params, max_train_rows: int) -> list[dict]:
    """One row per seed: the cleaning's removal figures and every test AUROC."""
    X, y = load_npz(path)
    rows = []
    for seed in seeds:
        train = params.train.model_copy(update={"seed": seed})
        split = labelled_split(X, y, seed, max_train_rows)
        fit, val, test_X, test_y = split.fit, split.val, split.test_X, split.test_y
        make = cleaning_detector(params.clean)
        _, cleaning = clean_training_split(fit, make, params.clean)
        kept, anomalies = cleaning.kept, split.fit_y == 1
        sets = {
            "contaminated": fit,
            "cleaned": Split(fit.X[kept], None, fit.ids[kept]),
            "normal": Split(fit.X[~anomalies], None, fit.ids[~anomalies]),
        }
        row = {"table": path.stem, "seed": seed, "rate_before": float(anomalies.mean())}
        row["rate_after"] = float(anomalies[kept].mean())
        removed = ~kept
        row["recall"] = float((removed & anomalies).sum() / max(anomalies.sum(), 1))
        row["precision"] = float((removed & anomalies).sum() / max(removed.sum(), 1))
        for set_name, training_rows in sets.items():
            for member, auroc in test_aurocs(training_rows, val, test_X, test_y, train).items():
                row[f"{member}/{set_name}"] = auroc
        forest = IsolationForest(random_state=seed).fit(split.train_X)
        row["sklearn_iforest"] = ranking_metrics(test_y, -forest.score_samples(test_X))["auroc"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


def cell(key: str, value: float) -> str:
    """AUROCs x 100, rates and shares as they are."""
    return f"{100 * value:.1f}" if "/" in key or key == "sklearn_iforest" else f"{value:.3f}"


def print_table(rows: list[dict]) -> None:
    """Per table, means over seeds; then the mean over tables."""
    keys = [f"{m}/{s}" for m in (*MEMBERS, "consensus") for s in TRAINING_SETS]
    keys += ["sklearn_iforest", "rate_before", "rate_after", "recall", "precision"]
    tables = list(dict.fromkeys(r["table"] for r in rows))
    print("\n| table | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    means = {k: [] for k in keys}
    for table in tables:
        cells = []
        for k in keys:
            value = float(np.mean([r[k] for r in rows if r["table"] == table]))
            means[k].append(value)
            cells.append(cell(k, value))
        print(f"| {table} | " + " | ".join(cells) + " |")
    cells = [f"**{cell(k, float(np.mean(v)))}**" for k, v in means.items()]
    print("| **mean** | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--datasets", default="")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--max-train-rows", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    params = load_params(args.params)
    wanted = set(filter(None, args.datasets.split(",")))
    paths = [p for p in sorted(args.data_dir.glob("*.npz")) if not wanted or p.stem in wanted]
    if not paths:
        raise SystemExit(f"no .npz tables in {args.data_dir} (datasets: {sorted(wanted)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [row for path in paths for row in run_table(path, seeds, params, args.max_train_rows)]
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
