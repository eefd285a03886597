"""What a local Dask worker of the train flow loads before its first candidate: imported once
by the forkserver its workers are forked from (`normalcy.pipeline.worker_start`), or by each
worker's warm-up where workers are spawned.

Importing this module does the work (a forkserver preloads modules by name). Nothing here
imports Prefect: the forkserver starts before the workers have the Prefect API's address in
their environment, and Prefect reads its settings when it is imported."""

from __future__ import annotations

import torch

import normalcy.pipeline.train  # noqa: F401  the candidates' fitting code
from normalcy.detectors.registry import load_builtin_detectors


def warm_up_torch() -> None:
    """One optimizer step on one thread: torch's first `step` imports torch._dynamo (about a
    second), and on one thread it starts no OpenMP threads that a forked child would inherit
    broken."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer = torch.nn.Linear(2, 1)
        optimizer = torch.optim.Adam(layer.parameters())
        layer(torch.zeros(1, 2)).sum().backward()
        optimizer.step()
    finally:
        torch.set_num_threads(previous)


load_builtin_detectors()
warm_up_torch()
