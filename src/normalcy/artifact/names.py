"""Names of the exported graph's input, outputs, head constants and metadata key.

One place for the names that the exporter writes and every reader (scorer, server, registry,
recalibration) looks up, so they cannot drift apart."""

from __future__ import annotations

INPUT_NAME = "input"
SCORE_NAME = "score"
DECISION_NAME = "is_anomaly"
P_VALUE_NAME = "p_value"
ANOMALY_MAP_NAME = "anomaly_map"
# Per-feature contributions `[N, d]` (input-feature order, larger = more responsible for the
# score): the one explanation that `normalcy score --explain K` and `POST /score` rank. Files
# exported before the name existed call the reconstruction errors `feature_errors`.
FEATURE_CONTRIBUTIONS_NAME = "feature_contributions"
LEGACY_CONTRIBUTIONS_NAMES = ("feature_errors",)
CONTRIBUTIONS_NAMES = (FEATURE_CONTRIBUTIONS_NAME, *LEGACY_CONTRIBUTIONS_NAMES)
# An image model's backbone features averaged over positions, per stage, concatenated `[N, D]`:
# what drift compares for images (pixels moved by a shifted camera say little; these say what
# the detector sees). Not written to tables or responses unless asked for by name.
EMBEDDING_NAME = "embedding"
# GOAD's log p(m | T_m x) per random transformation `[N, M]`: the score is minus their sum.
TRANSFORMATION_LOG_PROBS_NAME = "transformation_log_probs"
HEAD_OUTPUTS = (DECISION_NAME, P_VALUE_NAME)  # written by the calibration head, not by torch

THRESHOLD_NAME = "threshold"
HEAD_PREFIX = "normalcy_head/"  # names of the calibration head's nodes and constants
# The p-value head's binary search tree is an ONNX-ML TreeEnsembleRegressor, an operator of
# versions 1-4 of that domain (version 5 replaces it with TreeEnsemble).
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 3

METADATA_KEY = "normalcy"  # the model's metadata_props key holding the JSON metadata

# Per-row outputs written to tables and returned by the service, in this order when present;
# any other output (a named explanation) follows them in graph order.
ROW_OUTPUTS = (SCORE_NAME, DECISION_NAME, P_VALUE_NAME)
