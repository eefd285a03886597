"""One-off scan behind train.consensus_members / consensus_combine (benchmarks/README.md, issue 11).

On the 15 shared tables, 3 seeds, the quality_tabular.py splits and params.yaml's cleaning: fit
iforest, knn, knn_wide (and knn_wide at other widths and scalings) on the cleaned fit rows,
standardize each on the validation rows as the consensus does, and print the test AUROC x 100 of
each member alone and of each (member set, combination rule). Run from the repository root:

    PYTHONPATH=src:benchmarks OMP_NUM_THREADS=1 python benchmarks/results/consensus_rules_scan.py
"""

import sys
from pathlib import Path

import numpy as np
import quality_tabular as qt
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from normalcy.config import Params, load_params
from normalcy.detectors import create_detector
from normalcy.detectors.ensemble import robust_location_scale
from normalcy.pipeline.train import fit_candidates

REPO = Path(__file__).resolve().parents[2]
WIDTHS = {
    "knn_wide_3%": {"k_fraction": 0.03},
    "knn_wide_10%": {"k_fraction": 0.10},
    "knn_wide_std": {"preprocessing": "standardize"},
}
SETS = {
    "I+K": ["iforest", "knn"],
    "I+K+W": ["iforest", "knn", "knn_wide"],
    "I+W": ["iforest", "knn_wide"],
    "I+K+W3%": ["iforest", "knn", "knn_wide_3%"],
    "I+K+Wstd": ["iforest", "knn", "knn_wide_std"],
    "I+K+W+V": ["iforest", "knn", "knn_wide", "vae"],
    "I+W+V": ["iforest", "knn_wide", "vae"],
}


def ecdf(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(reference), x, side="right") / len(reference)


def z(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    location, scale = robust_location_scale(reference)
    return (x - location) / scale


def combined(normalize, reduce):  # noqa: ANN001, ANN201
    """A rule: each member normalized on its validation scores, then reduced across members."""
    return lambda val, test: reduce(
        [normalize(v, t) for v, t in zip(val, test, strict=True)], axis=0
    )


RULES = {
    "z-mean": combined(z, np.mean),
    "z-max": combined(z, np.max),
    "ecdf-mean": combined(ecdf, np.mean),
    "ecdf-max": combined(ecdf, np.max),
}


def scores_of(table: Path, seed: int, params: Params) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Validation and test scores of each member, the test labels, and sklearn's IForest on the
    whole contaminated 70% (the benchmark's `iforest` column)."""
    X, y = qt.load_npz(table)
    split = qt.labelled_split(X, y, seed)
    train_X, test_X, test_y, val_X = split.train_X, split.test_X, split.test_y, split.val.X
    fit = qt.cleaned(split.fit, params.clean)
    train = params.train.model_copy(
        update={"seed": seed, "candidates": ["iforest", "knn", "knn_wide", "vae"]}
    )  # as candidates: knn keeps the scaling best on the validation rows
    fitted, _, _ = fit_candidates(fit, split.val, train)
    fitted.pop("consensus", None)
    for name, given in WIDTHS.items():
        fitted[name] = create_detector("knn_wide", **given).fit(fit.X)
    val = {name: detector.score(val_X) for name, detector in fitted.items()}
    test = {name: detector.score(test_X) for name, detector in fitted.items()}
    forest = IsolationForest(random_state=seed).fit(train_X)
    return val, test, test_y, -forest.score_samples(test_X)


def main() -> int:
    params = load_params(REPO / "params.yaml")
    tables = sorted((REPO.parent / "shared" / "data" / "tabular").glob("*.npz"))
    columns: dict[str, list[float]] = {}
    for table in tables:
        per_seed: dict[str, list[float]] = {}
        for seed in (0, 1, 2):
            val, test, test_y, reference = scores_of(table, seed, params)
            row = {"iforest (sklearn, 70%)": roc_auc_score(test_y, reference)}
            row.update({n: roc_auc_score(test_y, s) for n, s in test.items()})
            for set_name, members in SETS.items():
                for rule, combine in RULES.items():
                    combined = combine([val[m] for m in members], [test[m] for m in members])
                    row[f"{set_name} {rule}"] = roc_auc_score(test_y, combined)
            for key, value in row.items():
                per_seed.setdefault(key, []).append(value)
        for key, values in per_seed.items():
            columns.setdefault(key, []).append(100 * float(np.mean(values)))
        print(table.stem, flush=True)
    reference = np.array(columns["iforest (sklearn, 70%)"])
    print("\n| column | mean | vs IForest | worst table vs IForest |\n|---|---|---|---|")
    for key, values in columns.items():
        gap = np.array(values) - reference
        worst = tables[int(gap.argmin())].stem
        print(f"| {key} | {np.mean(values):.1f} | {gap.mean():+.1f} | {gap.min():+.1f} ({worst}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
