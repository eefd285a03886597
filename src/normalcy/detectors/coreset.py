"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling), fast on one core.

Shared by `knn` (a bank of rows) and `patchcore` (a bank of patch features, often ~10^6 rows)."""

from __future__ import annotations

import logging
import math
import time

import torch

log = logging.getLogger(__name__)

# Rows per distance update: a chunk's distances and running minima stay in the CPU cache
# between the matrix-vector product and the minimum, instead of a full pass each.
CHUNK_ROWS = 65_536
PROGRESS_SECONDS = 30.0  # a log line at most this often during a long selection


def random_projection(rows: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """`rows` `[n, F]` mapped to `[n, dim]` by a seeded Gaussian matrix scaled by 1/sqrt(dim)
    (Johnson-Lindenstrauss: pairwise distances are kept approximately)."""
    projection = torch.randn(rows.shape[1], dim, generator=generator)
    return rows @ (projection / math.sqrt(dim))


def greedy_coreset(
    rows: torch.Tensor,
    size: int,
    generator: torch.Generator,
    projection_dim: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Indices of `size` rows chosen by greedy k-center (iterative farthest point) selection.

    PatchCore (Roth et al. 2022, Alg. 1): start from a random row, then repeatedly add the row
    farthest from the current coreset, which approximately minimises the largest distance from
    any row to its nearest coreset member (a 2-approximation of the k-center optimum). Rows wider
    than `projection_dim` are first randomly projected, as PatchCore does for speed.

    Each new centre c updates every row's squared distance to the coreset as
    min(d, ||x||^2 - 2 x.c + ||c||^2): one matrix-vector product per chunk of rows with the row
    norms computed once, updated in place (anomalib recomputes ||x - c|| with a new `[n, F]`
    difference tensor per centre)."""
    n = len(rows)
    if size >= n:
        return torch.arange(n)
    rows = rows.to(torch.float32)
    if projection_dim is not None and rows.shape[1] > projection_dim:
        rows = random_projection(rows, projection_dim, generator)
    rows = rows.contiguous()
    row_sq = (rows * rows).sum(dim=1)
    nearest = torch.full((n,), math.inf)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    chunks = [
        (rows[start : start + chunk_rows], row_sq[start : start + chunk_rows], nearest[start:])
        for start in range(0, n, chunk_rows)
    ]
    started = last_log = time.monotonic()
    for i in range(size - 1):
        if time.monotonic() - last_log > PROGRESS_SECONDS:
            last_log = time.monotonic()
            log.info(
                "coreset: %d of %d centres chosen from %d rows (%.0f s)",
                i,
                size,
                n,
                last_log - started,
            )
        centre = rows[chosen[i]]
        centre_sq = row_sq[chosen[i]]
        for chunk, chunk_sq, chunk_nearest in chunks:
            distance = torch.addmv(chunk_sq, chunk, centre, alpha=-2.0).add_(centre_sq)
            view = chunk_nearest[: len(chunk)]
            torch.minimum(view, distance, out=view)
        chosen[i + 1] = int(torch.argmax(nearest))
    return chosen
