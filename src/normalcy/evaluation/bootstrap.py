"""How sure a comparison is: paired bootstrap intervals of a metric difference, and the Wilson
interval of a rate. A promotion decision on a few hundred rows must not follow noise."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from statistics import NormalDist

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]  # (labels, scores) -> value


def bootstrap_rows(labels: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """`n_resamples` draws of row indices with replacement, each holding rows of both classes
    (a draw with one class only has no ranking metric and is drawn again)."""
    labels = np.asarray(labels)
    if not 0 < int(labels.sum()) < len(labels):
        raise ValueError("a paired bootstrap of a ranking metric needs rows of both classes")
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        rows = rng.integers(0, len(labels), len(labels))
        if 0 < int(labels[rows].sum()) < len(rows):
            done += 1
            yield rows


def paired_bootstrap_deltas(
    metric: Metric,
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int,
    seed: int,
) -> np.ndarray:
    """`metric(a) - metric(b)` on `n_resamples` resamples of the rows (`bootstrap_rows`), the
    same rows for both.

    Pairing is what makes the interval narrow enough to decide on: both models see the same
    easy and hard rows in each resample, so only their difference varies."""
    labels = np.asarray(labels)
    if len(labels) != len(scores_a) or len(labels) != len(scores_b):
        raise ValueError(
            f"labels and both score arrays must have one entry per row, got {len(labels)}, "
            f"{len(scores_a)} and {len(scores_b)}"
        )
    return np.array(
        [
            metric(labels[rows], scores_a[rows]) - metric(labels[rows], scores_b[rows])
            for rows in bootstrap_rows(labels, n_resamples, seed)
        ],
        dtype=float,
    )


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap values."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a binomial rate: unlike the normal approximation it stays
    inside [0, 1] and is honest at 0 or 1 successes, the usual case for a 1% alert rate on a
    few hundred rows."""
    if trials < 1:
        raise ValueError(f"a rate needs at least one trial, got {trials}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)  # stdlib: scoring hosts stay light
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
