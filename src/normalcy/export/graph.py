"""The scoring computation in torch: the path that is exported, and the whole graph that parity
compares the file against."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from normalcy.artifact.calibration_head import (
    calibration_array,
    check_threshold,
)
from normalcy.artifact.names import ANOMALY_MAP_NAME, DECISION_NAME, P_VALUE_NAME, SCORE_NAME
from normalcy.detectors.base import as_prediction


def named_outputs(out: object) -> dict[str, torch.Tensor]:
    """A scoring module's output as graph outputs by name, in order (score, anomaly_map, then
    explanations by name); floating tensors as float32, integer and bool tensors as they are."""
    outputs = as_prediction(out).named_outputs()
    return {
        name: tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        for name, tensor in outputs.items()
    }


def check_outputs(outputs: dict[str, torch.Tensor], n_rows: int) -> None:
    """score must be [N], anomaly_map [N, H, W], every explanation [N, ...]."""
    for name, tensor in outputs.items():
        shape = list(tensor.shape)
        if name == SCORE_NAME:
            ok, expected = shape == [n_rows], f"[{n_rows}]"
        elif name == ANOMALY_MAP_NAME:
            ok, expected = len(shape) == 3 and shape[0] == n_rows, f"[{n_rows}, H, W]"
        else:
            ok, expected = len(shape) >= 1 and shape[0] == n_rows, f"[{n_rows}, ...]"
        if not ok:
            what = "a score" if name == SCORE_NAME else f"an output {name!r}"
            if name == ANOMALY_MAP_NAME:
                what = "an anomaly map"
            raise ValueError(
                f"scoring_module returned {what} of shape {shape} for {n_rows} rows; "
                f"expected {expected}"
            )


class ScorePath(nn.Module):
    """The part that is exported through torch: `scoring_module`'s `Prediction` as a tuple of
    tensors in `named_outputs` order (floats as float32)."""

    def __init__(self, scoring_module: nn.Module) -> None:
        super().__init__()
        self.scoring_module = scoring_module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(named_outputs(self.scoring_module(x)).values())


class ScoringGraph(nn.Module):
    """The whole exported computation in torch: score, is_anomaly[, p_value], then the
    module's other outputs (anomaly_map, explanations), as an ordered dict by output name.

    `is_anomaly = score > threshold` and `p_value = (1 + #{c >= score}) / (n + 1)` over the
    calibration scores `c`, counted in float32 as the ONNX head's search tree counts them
    (`normalcy.artifact.calibration_head`), so decisions and p-values are the same in torch and
    in the file. Without calibration scores there is no p_value (an export for a
    quick check; the pipeline always passes them).
    """

    def __init__(
        self,
        scoring_module: nn.Module,
        threshold: float,
        calibration_scores: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.scoring_module = scoring_module
        device = device_of(scoring_module)
        self.register_buffer(
            "threshold",
            torch.tensor(check_threshold(threshold), dtype=torch.float32, device=device),
        )
        ascending = None
        if calibration_scores is not None:
            ascending = torch.from_numpy(np.sort(calibration_array(calibration_scores))).to(device)
        self.register_buffer("calibration_scores", ascending)

    def p_value(self, score: torch.Tensor) -> torch.Tensor:
        """The conformal p-value of each score, counted as the ONNX head counts it: a binary
        search in the sorted scores; a NaN score counts nothing."""
        ascending = self.calibration_scores
        below = torch.searchsorted(ascending, score.contiguous(), side="left")  # #{c < score}
        count = torch.where(torch.isnan(score), 0, len(ascending) - below)
        return (count.to(torch.float32) + 1.0) / (len(ascending) + 1.0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = named_outputs(self.scoring_module(x))
        score = outputs.pop(SCORE_NAME)
        head = {SCORE_NAME: score, DECISION_NAME: score > self.threshold}
        if self.calibration_scores is not None:
            head[P_VALUE_NAME] = self.p_value(score)
        return {**head, **outputs}


def device_of(module: nn.Module) -> torch.device:
    """Where the module's weights live; CPU for a weightless module."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
