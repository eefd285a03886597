"""Leave-feature-out attribution inside the scoring graph, for any score head.

Feature j's contribution is how much the score drops when feature j alone is replaced by its
training mean: `score(x) - score(x with x_j := mean_j)`. It is exact (plain forward passes, no
gradients, so torch and onnxruntime agree to float rounding), needs nothing from the method but
its score, and exports as one batched pass over d perturbed copies of each row: it costs about
d + 1 score evaluations per row, which is why it is limited to `MAX_LEAVE_OUT_FEATURES` features.
"""

from __future__ import annotations

import torch
from torch import nn

from normalcy.artifact.names import FEATURE_CONTRIBUTIONS_NAME
from normalcy.detectors.base import Prediction, as_prediction

# Above this many features the d perturbed copies per row cost too much, and the graph has no
# contributions. onnxruntime, one thread (benchmarks/speed_explanations.py): 8 features cost
# deep_svdd, flow and dagmm 9-10x their rows/s, 32 features 39-62x (flow: 597k -> 9.6k rows/s),
# 64 features 100-150x.
MAX_LEAVE_OUT_FEATURES = 32


def left_out_copies(rows: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """`[N * d, d]`: for each row `[d]`, d copies, copy j with feature j replaced by
    `baseline[j]` (row-major: the copies of row 0 first)."""
    n_features = rows.shape[1]
    replaced = torch.eye(n_features, dtype=torch.bool, device=rows.device)
    return torch.where(replaced, baseline, rows.unsqueeze(1)).reshape(-1, n_features)


class LeaveFeatureOut(nn.Module):
    """`head`'s prediction plus `feature_contributions` `[N, d]`: the score drop when each
    feature is replaced by `baseline` (preprocessed training mean), in score units; positive =
    the feature's value raises the score. Other outputs of the head are kept."""

    def __init__(self, head: nn.Module, baseline: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("baseline", baseline.detach().flatten().to(torch.float32))

    def forward(self, x: torch.Tensor) -> Prediction:
        prediction = as_prediction(self.head(x))
        n_features = self.baseline.shape[0]
        copies = left_out_copies(x.flatten(1), self.baseline).reshape(-1, *x.shape[1:])
        left_out = as_prediction(self.head(copies)).score.reshape(-1, n_features)
        contributions = prediction.score.unsqueeze(1) - left_out
        return Prediction(
            prediction.score,
            prediction.anomaly_map,
            {**(prediction.explanations or {}), FEATURE_CONTRIBUTIONS_NAME: contributions},
        )


def explained_by_leaving_features_out(head: nn.Module, baseline: torch.Tensor | None) -> nn.Module:
    """`head` wrapped in `LeaveFeatureOut`, or `head` itself when there is no baseline (a
    detector saved before baselines existed) or too many features to afford it."""
    if baseline is None or baseline.numel() > MAX_LEAVE_OUT_FEATURES:
        return head
    return LeaveFeatureOut(head, baseline)
