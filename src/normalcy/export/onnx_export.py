"""Export of a scoring module to one self-contained ONNX file with its calibration head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from normalcy.artifact.calibration_head import (
    attach_head,
    calibration_array,
    check_threshold,
    head_metadata,
)
from normalcy.artifact.metadata import save_model, set_metadata
from normalcy.artifact.names import INPUT_NAME
from normalcy.detectors.base import inference
from normalcy.export.graph import ScorePath, check_outputs, device_of, named_outputs


def export_onnx(
    scoring_module: nn.Module,
    threshold: float,
    example: np.ndarray,
    path: str | Path,
    opset: int = 18,
    metadata: dict | None = None,
    calibration_scores: np.ndarray | None = None,
) -> Path:
    """Export `ScoringGraph(scoring_module, threshold, calibration_scores)` to one ONNX file.

    Input 'input' (dynamic batch, other dims fixed by `example`); outputs score, is_anomaly,
    p_value (with `calibration_scores`), then every other field of the module's `Prediction`
    under its name (anomaly_map, explanations sorted by name). The torch part is exported with
    the dynamo exporter; the calibration head is written as plain ONNX on its score. A 1-row
    example is duplicated: torch.export specializes a dimension traced at size 1 to a constant,
    which would freeze the batch size. `metadata` goes under the 'normalcy' metadata key as JSON,
    with `outputs`, `threshold` and `n_p_value_scores` taken from the graph. The module's
    train/eval flags are left as they were; a failure leaves no file.
    """
    example = np.asarray(example, dtype=np.float32)
    if example.ndim < 2 or len(example) == 0:
        raise ValueError(f"example must be a non-empty batch [N, ...], got shape {example.shape}")
    if len(example) == 1:
        example = np.concatenate([example, example])
    threshold = check_threshold(threshold)
    calibration = None if calibration_scores is None else calibration_array(calibration_scores)
    module = ScorePath(scoring_module)
    sample = torch.from_numpy(np.ascontiguousarray(example)).to(device_of(scoring_module))
    batch = torch.export.Dim("batch", min=1)
    with inference(module):
        outputs = named_outputs(scoring_module(sample))
        check_outputs(outputs, len(sample))
        program = torch.onnx.export(
            module,
            (sample,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    attach_head(model, threshold, calibration)
    set_metadata(model, {**(metadata or {}), **head_metadata(model, threshold, calibration)})
    return save_model(model, Path(path))
