"""One-off scan behind the wide-kNN cleaning section of benchmarks/README.md: how well does each
detector rank the contamination of the fit rows themselves, at the top? R-precision (the share of
anomalies among the top-m fit rows, m = their number of anomalies), from the training labels only.

    PYTHONPATH=src:benchmarks python benchmarks/results/cleaning_rprecision_scan.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from quality_tabular import labelled_split, load_npz
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

FRACTIONS = (0.025, 0.05, 0.1, 0.2)


def scaled(rows: np.ndarray, kind: str) -> np.ndarray:
    if kind == "minmax":
        span = rows.max(0) - rows.min(0)
        return (rows - rows.min(0)) / np.where(span < 1e-6, 1.0, span)
    std = rows.std(0)
    return (rows - rows.mean(0)) / np.where(std < 1e-6, 1.0, std)


def r_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(labels[np.argsort(-scores)[: int(labels.sum())]].mean())


def scan(seed: int, X: np.ndarray, y: np.ndarray) -> list[float]:
    split = labelled_split(X, y, seed)
    fit, fit_y = split.fit, split.fit_y
    figures = []
    for kind in ("minmax", "standardize"):
        rows = scaled(fit.X.astype(np.float64), kind)
        ks = [max(5, int(f * len(rows))) for f in FRACTIONS]
        distances = NearestNeighbors(n_neighbors=max(ks) + 1).fit(rows).kneighbors(rows)[0]
        figures += [r_precision(fit_y, distances[:, k]) for k in ks]
    for samples in (64, 256):
        forest = IsolationForest(max_samples=min(samples, len(fit.X)), random_state=seed)
        figures.append(r_precision(fit_y, -forest.fit(fit.X).score_samples(fit.X)))
    return figures


def main() -> None:
    means = {}
    for path in sorted(Path("../shared/data/tabular").glob("*.npz")):
        X, y = load_npz(path)
        means[path.stem] = np.mean([scan(seed, X, y) for seed in (0, 1, 2)], axis=0)
        print(f"{path.stem:16s} " + " ".join(f"{v:.2f}" for v in means[path.stem]), flush=True)
    print("mean             " + " ".join(f"{v:.3f}" for v in np.mean(list(means.values()), 0)))
    print(f"columns: kNN min-max k={FRACTIONS} of the rows, kNN standardized k={FRACTIONS}, ")
    print("IForest max_samples 64, 256")


if __name__ == "__main__":
    main()
