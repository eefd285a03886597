"""Names every normalcy graph and its readers agree on: the metadata key and the output names.

Kept in this one module so that the artifact side and the scoring side cannot drift apart."""

from __future__ import annotations

METADATA_KEY = "normalcy"  # custom metadata key of the JSON the exporter writes
SCORE_NAME = "score"
DECISION_NAME = "is_anomaly"
P_VALUE_NAME = "p_value"
ANOMALY_MAP_NAME = "anomaly_map"
# Per-row outputs written to tables and returned by the service, in this order when present;
# any other output (a named explanation) follows them in graph order.
ROW_OUTPUTS = (SCORE_NAME, DECISION_NAME, P_VALUE_NAME)
