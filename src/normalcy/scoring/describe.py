"""`normalcy inspect`'s account of a model for a person: detector, input, every output with
its role, threshold, registry and versions, read from the metadata and the graph."""

from __future__ import annotations

import json
from collections.abc import Iterator

import onnxruntime as ort

from normalcy.artifact.names import (
    ANOMALY_MAP_NAME,
    CONTRIBUTIONS_NAMES,
    DECISION_NAME,
    P_VALUE_NAME,
    SCORE_NAME,
)
from normalcy.scoring.inputs import input_spec
from normalcy.scoring.session import onnx_type_name


def output_descriptions(metadata: dict, session: ort.InferenceSession) -> list[str]:
    """One line per model output, e.g. `contributions float32 [N, 64] (explanation)`: from the
    metadata's output list (what the exporter recorded), else from the graph itself; an output
    the graph has but the metadata does not list is shown and marked."""
    roles = {
        SCORE_NAME: "anomaly score",
        DECISION_NAME: "score > threshold",
        P_VALUE_NAME: "conformal p-value",
        ANOMALY_MAP_NAME: "per-pixel scores, not written to tables",
        **dict.fromkeys(
            CONTRIBUTIONS_NAMES, "per-feature contributions; score --explain K ranks them"
        ),
    }
    graph = {
        o.name: (onnx_type_name(o.type), ["N" if not isinstance(d, int) else d for d in o.shape])
        for o in session.get_outputs()
    }
    listed = [o for o in metadata.get("outputs") or [] if isinstance(o, dict) and "name" in o]
    rows = []
    for output in listed:
        note = "" if output["name"] in graph else "; not in the graph"
        rows.append((output["name"], output.get("dtype", "?"), output.get("shape") or [], note))
    names_listed = {output["name"] for output in listed}
    for name, (dtype, shape) in graph.items():
        if name not in names_listed:
            rows.append((name, dtype, shape, "; not in the metadata" if listed else ""))
    return [
        f"{name} {dtype} [{', '.join(map(str, shape))}] ({roles.get(name, 'explanation')}{note})"
        for name, dtype, shape, note in rows
    ]


def model_description(metadata: dict, session: ort.InferenceSession) -> Iterator[tuple[str, str]]:
    """(label, text) pairs describing a model for a person; unknown keys come last, raw."""
    meta = dict(metadata)
    used = {"input", "outputs"}
    if "detector" in meta:
        params = meta.get("detector_params") or {}
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        yield "detector", f"{meta['detector']}" + (f" ({shown})" if shown else "")
        used |= {"detector", "detector_params"}
    spec = input_spec(session, meta)
    yield "input", f"'{spec.name}' {spec.describe()}"
    if spec.id_column:
        yield "id column", spec.id_column
    for text in output_descriptions(meta, session):
        yield "output", text
    if "threshold" in meta:
        text = f"{meta['threshold']:.6g} (is_anomaly = score > threshold)"
        extra = []
        if "target_fpr" in meta:
            extra.append(f"target false-positive rate {meta['target_fpr']}")
        if "n_calibration_scores" in meta:
            extra.append(f"from {meta['n_calibration_scores']} calibration scores")
        yield "threshold", text + (f"; {', '.join(extra)}" if extra else "")
        used |= {"threshold", "target_fpr", "n_calibration_scores"}
    if "n_p_value_scores" in meta:
        yield "p-values", f"conformal, against {meta['n_p_value_scores']} calibration scores"
        used.add("n_p_value_scores")
    if meta.get("model_name"):
        version = meta.get("model_version")
        registered = f" version {version}" if version is not None else " (never registered)"
        yield "registered as", f"{meta['model_name']}{registered}"
        used |= {"model_name", "model_version"}
    for key, label in (("data_version", "data version"), ("mlflow_run_id", "MLflow run")):
        if key in meta:
            yield label, str(meta[key])
            used.add(key)
    versions = [
        f"{label} {meta[key]}"
        for key, label in (("normalcy_version", "normalcy"), ("opset", "ONNX opset"))
        if key in meta
    ]
    used |= {"normalcy_version", "opset"}
    producer = session.get_modelmeta().producer_name
    if producer:
        versions.append(f"exported by {producer}")
    if versions:
        yield "versions", ", ".join(versions)
    for key, value in meta.items():
        if key not in used:
            yield key, json.dumps(value, default=str)
