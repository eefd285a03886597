"""Names of the exported graph's input, outputs, head constants and metadata key.

One place for the names that the exporter writes and every reader (scorer, server, registry,
recalibration) looks up, so they cannot drift apart."""

from __future__ import annotations

INPUT_NAME = "input"
SCORE_NAME = "score"
DECISION_NAME = "is_anomaly"
P_VALUE_NAME = "p_value"
ANOMALY_MAP_NAME = "anomaly_map"
HEAD_OUTPUTS = (DECISION_NAME, P_VALUE_NAME)  # written by the calibration head, not by torch

THRESHOLD_NAME = "threshold"
CALIBRATION_NAME = "calibration_scores"
HEAD_PREFIX = "normalcy_head/"  # names of the calibration head's nodes and constants

METADATA_KEY = "normalcy"  # the model's metadata_props key holding the JSON metadata

# Per-row outputs written to tables and returned by the service, in this order when present;
# any other output (a named explanation) follows them in graph order.
ROW_OUTPUTS = (SCORE_NAME, DECISION_NAME, P_VALUE_NAME)
