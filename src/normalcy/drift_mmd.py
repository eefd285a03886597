"""A kernel two-sample test on whole rows: maximum mean discrepancy (MMD), permutation p-value.

Per-feature KS tests see each feature alone; a batch whose features keep their marginals but
change how they move together (a correlation that breaks, a mixture component that moves) passes
them all. MMD compares the two samples as distributions of whole rows: with an RBF kernel `k`,
`MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)` is zero only when the distributions are equal.

The rows are the features scaled by their standard deviations in both samples together, so no
unit dominates the distances. The champion graphs have no embedding output today (only score,
is_anomaly, p_value and explanation outputs), so the test runs on the input features, not on the
detector's latent space. The bandwidth is the median heuristic, the median pairwise squared
distance of the pooled rows, which a permutation does not change, so the permutation p-value
stays exact. Each sample is subsampled to at most `max_rows` rows: the kernel matrix is
`[2 max_rows]^2` and every permutation costs a product with it.
"""

from __future__ import annotations

import numpy as np

DEFAULT_PERMUTATIONS = 1000


def rbf_kernel(rows: np.ndarray) -> np.ndarray:
    """`exp(-|a - b|^2 / median pairwise |a - b|^2)` over all pairs of `rows`."""
    squared = np.sum(rows**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * rows @ rows.T, 0.0)
    off_diagonal = distances[~np.eye(len(rows), dtype=bool)]
    positive = off_diagonal[off_diagonal > 0]
    bandwidth = float(np.median(positive)) if positive.size else 1.0
    return np.exp(-distances / bandwidth)


def mmd_test(
    reference: np.ndarray,
    batch: np.ndarray,
    max_rows: int,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> tuple[float, float]:
    """(biased MMD^2 estimate, permutation p-value) of `batch` against `reference`, both
    `[n, d]` finite float arrays (the caller checks them).

    The p-value is `(1 + #{permuted >= observed}) / (1 + permutations)`, never below
    `1 / (1 + permutations)`: `permutations` must exceed `1 / level - 1` for the test to be able
    to reject at `level`. Seeded, so the same batch always gets the same p-value."""
    if max_rows < 2:
        raise ValueError(f"max_rows must be at least 2, got {max_rows}")
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    rng = np.random.default_rng(seed)
    ref = reference[rng.choice(len(reference), min(max_rows, len(reference)), replace=False)]
    new = batch[rng.choice(len(batch), min(max_rows, len(batch)), replace=False)]
    pooled = np.vstack([ref, new])
    scale = pooled.std(axis=0)  # of both samples: a permutation does not change it
    scale[scale == 0] = 1.0
    kernel = rbf_kernel(pooled / scale)
    n_ref, n_new = len(ref), len(new)
    labels = np.r_[np.full(n_ref, 1.0 / n_ref), np.full(n_new, -1.0 / n_new)]
    observed = float(labels @ kernel @ labels)
    shuffled = np.stack([rng.permutation(labels) for _ in range(permutations)], axis=1)
    permuted = np.einsum("ib,ib->b", shuffled, kernel @ shuffled)
    exceed = int(np.count_nonzero(permuted >= observed - 1e-12))
    return observed, (1 + exceed) / (1 + permutations)
