"""A new threshold and new calibration scores for an exported graph, without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from normalcy.artifact.calibration_head import (
    attach_head,
    calibration_array,
    check_threshold,
    head_metadata,
    strip_head,
)
from normalcy.artifact.metadata import get_metadata, load_model, save_model, set_metadata


def recalibrate_graph(
    onnx_path: str | Path,
    threshold: float,
    calibration_scores: np.ndarray,
    out_path: str | Path,
    metadata_updates: dict | None = None,
) -> Path:
    """Write a copy of the model whose is_anomaly and p_value use a new threshold and new
    calibration scores; no torch, no re-export.

    The calibration head is removed and written again from the new values, so the score subgraph
    is unchanged and the scores bit-identical. It also upgrades a file from before p_value
    existed, or with the older all-pairs p_value count. `metadata_updates` are merged into the
    'normalcy' metadata; `threshold`, `outputs` and `n_p_value_scores` come from the new head.
    `out_path` may equal `onnx_path`.
    """
    threshold = check_threshold(threshold)
    calibration = calibration_array(calibration_scores)
    model = load_model(onnx_path)
    strip_head(model, str(onnx_path))
    attach_head(model, threshold, calibration)
    set_metadata(
        model,
        {
            **get_metadata(model),
            **(metadata_updates or {}),
            **head_metadata(model, threshold, calibration),
        },
    )
    return save_model(model, out_path)
