"""The top-K features of each row, from a model's per-feature contributions (torch-free).

`normalcy score --explain K` and `POST /score` with `"explain": K` use the same two steps:
`explained_output` refuses, before any work, a model without per-feature contributions or a K
outside 1..d; `top_features` turns contributions `[N, d]` into the columns `top1_feature,
top1_contribution, ..., topK_feature, topK_contribution` (largest contribution first)."""

from __future__ import annotations

import numpy as np

from normalcy.artifact.names import CONTRIBUTIONS_NAMES
from normalcy.scoring.inputs import InputError, InputSpec


def contributions_output(outputs: list[str] | tuple[str, ...]) -> str | None:
    """The model's per-feature contributions output (the current name first, then the name of
    older files), or None when it has none."""
    return next((name for name in CONTRIBUTIONS_NAMES if name in outputs), None)


def explained_output(k: object, outputs: list[str] | tuple[str, ...], spec: InputSpec) -> str:
    """The output to rank for `explain K`; an InputError saying why when K is not a whole
    number in 1..d (d = features per row) or the model has no per-feature contributions."""
    name = contributions_output(outputs)
    if name is None:
        raise InputError(
            f"explain: this model has no per-feature contributions (one of "
            f"{list(CONTRIBUTIONS_NAMES)}) to rank; its outputs are {list(outputs)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= spec.row_size:
        raise InputError(
            f"explain: K must be a whole number from 1 to {spec.row_size} (the model's features "
            f"per row), got {k!r}"
        )
    return name


def feature_labels(spec: InputSpec) -> list[str]:
    """A name per flattened input position: the metadata's feature names, else `[j]` (the
    index, as in the `feature_contributions[j]` columns)."""
    return list(spec.feature_names) or [f"[{j}]" for j in range(spec.row_size)]


def top_features(contributions: np.ndarray, labels: list[str], k: int) -> dict[str, np.ndarray]:
    """`topI_feature` (name) and `topI_contribution` (value) for I = 1..k, per row, largest
    contribution first (ties: the earlier feature first)."""
    flat = np.asarray(contributions).reshape(len(contributions), -1)
    if flat.shape[1] != len(labels):
        raise ValueError(
            f"contributions have {flat.shape[1]} values per row for {len(labels)} features"
        )
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    names = np.asarray(labels, dtype=object)
    columns: dict[str, np.ndarray] = {}
    for rank in range(order.shape[1]):
        index = order[:, rank]
        columns[f"top{rank + 1}_feature"] = names[index]
        columns[f"top{rank + 1}_contribution"] = np.take_along_axis(flat, index[:, None], 1)[:, 0]
    return columns
