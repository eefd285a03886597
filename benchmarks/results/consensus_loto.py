"""One-off (issue 11): how good is a consensus member set chosen on other tables? Leave one
table out over every member set that includes iforest and knn.

For each table and seed (quality_tabular.py's splits, params.yaml's cleaning and candidates)
it fits the pipeline's candidates once and keeps every candidate's validation and test scores
(`--cache DIR`, one npz per table and seed; a rerun reuses them). Each rule is a member set
(iforest + knn + any of the other candidates below) and a combination (max or mean of the
robust z-scores on the validation rows, as `Ensemble` does). It prints the best rules by mean
test AUROC x 100 over all tables (a choice made on test labels), and the leave-one-table-out
figure: for each table, the rule best on the other tables, scored on it. Run from the
repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/results/consensus_loto.py \
        --data-dir ../shared/data/tabular --cache /tmp/consensus_cache
"""

import argparse
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import quality_tabular as qt
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from normalcy.config import Params, load_params
from normalcy.detectors.ensemble import robust_location_scale

REPO = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)
FIXED = ("iforest", "knn")
OPTIONAL = ("knn_wide", "autoencoder", "vae", "pca", "mahalanobis", "flow")


def cached_scores(table: Path, seed: int, cache: Path, params: Params) -> dict[str, np.ndarray]:
    """{'val/NAME', 'test/NAME': scores of each fitted candidate, 'test_y', 'test/sk_iforest'}."""
    target = cache / f"{table.stem}__{seed}.npz"
    if not target.exists():
        X, y = qt.load_npz(table)
        split = qt.labelled_split(X, y, seed)
        train = params.train.model_copy(update={"seed": seed})
        detectors, _, winner = qt.run_pipeline(split.fit, split.val, params.clean, train)
        arrays = {"test_y": split.test_y}
        for name, detector in detectors.items():
            arrays[f"val/{name}"] = np.asarray(detector.score(split.val.X), dtype=np.float64)
            arrays[f"test/{name}"] = np.asarray(detector.score(split.test_X), dtype=np.float64)
        forest = IsolationForest(random_state=seed).fit(split.train_X)
        arrays["test/sk_iforest"] = -forest.score_samples(split.test_X)
        np.savez(target, **arrays)
        print(f"{table.stem} seed {seed}: fitted, pipeline chose {winner}", flush=True)
    with np.load(target) as stored:
        return dict(stored)


def combined(scores: dict[str, np.ndarray], members: tuple[str, ...], reduce: str) -> np.ndarray:
    """The members' test scores in robust z units of their validation scores, reduced."""
    z = []
    for name in members:
        location, scale = robust_location_scale(scores[f"val/{name}"])
        z.append((scores[f"test/{name}"] - location) / scale)
    return np.max(z, axis=0) if reduce == "max" else np.mean(z, axis=0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    tables = sorted(args.data_dir.glob("*.npz"))
    params = load_params(REPO / "params.yaml")
    rules = [
        (FIXED + extra, reduce)
        for k in range(len(OPTIONAL) + 1)
        for extra in combinations(OPTIONAL, k)
        for reduce in ("max", "mean")
    ]
    auroc = np.zeros((len(rules), len(tables)))
    oracle, iforest, current = (np.zeros(len(tables)) for _ in range(3))
    for t, table in enumerate(tables):
        runs = [cached_scores(table, seed, args.cache, params) for seed in SEEDS]
        for i, (members, reduce) in enumerate(rules):
            auroc[i, t] = np.mean(
                [roc_auc_score(r["test_y"], combined(r, members, reduce)) for r in runs]
            )
        candidates = [k[5:] for k in runs[0] if k.startswith("test/") and k != "test/sk_iforest"]
        oracle[t] = np.mean(
            [max(roc_auc_score(r["test_y"], r[f"test/{c}"]) for c in candidates) for r in runs]
        )
        iforest[t] = np.mean([roc_auc_score(r["test_y"], r["test/sk_iforest"]) for r in runs])
        current[t] = np.mean([roc_auc_score(r["test_y"], r["test/consensus"]) for r in runs])
    auroc, oracle, iforest, current = 100 * auroc, 100 * oracle, 100 * iforest, 100 * current
    name = ["+".join(members) + f" ({reduce})" for members, reduce in rules]
    print(f"\n{len(rules)} rules on {len(tables)} tables, 3 seeds; test AUROC x 100")
    print(
        f"oracle {oracle.mean():.2f}, IForest {iforest.mean():.2f}, "
        f"params.yaml's consensus {current.mean():.2f} "
        f"(regret {oracle.mean() - current.mean():.2f})"
    )
    print("\n| rule (chosen on all tables' test labels) | mean | regret | worst table vs IForest |")
    print("|---|---|---|---|")
    for i in np.argsort(-auroc.mean(axis=1))[:8]:
        print(
            f"| {name[i]} | {auroc[i].mean():.2f} | {oracle.mean() - auroc[i].mean():.2f} | "
            f"{np.min(auroc[i] - iforest):+.1f} |"
        )
    print("\n| held-out table | rule best on the other tables | its AUROC | consensus | oracle |")
    print("|---|---|---|---|---|")
    held_out = np.zeros(len(tables))
    for t, table in enumerate(tables):
        others = np.arange(len(tables)) != t
        best = int(np.argmax(auroc[:, others].mean(axis=1)))
        held_out[t] = auroc[best, t]
        print(
            f"| {table.stem} | {name[best]} | {held_out[t]:.1f} | {current[t]:.1f} | "
            f"{oracle[t]:.1f} |"
        )
    print(
        f"\nleave-one-table-out: mean {held_out.mean():.2f}, regret "
        f"{oracle.mean() - held_out.mean():.2f}, worst table vs IForest "
        f"{np.min(held_out - iforest):+.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
