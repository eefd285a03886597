"""What a registered model is, in words: a markdown model card and a readable metadata summary.

Pure functions of the 'normalcy' metadata stored in the ONNX file (plus, for the card, the run's
metrics and a description of its data), so the card, `normalcy inspect` and the registry say the
same thing. Keys a file lacks (an older export, a file never registered) are shown as unknown.
"""

from __future__ import annotations

import math
from typing import Any

from normalcy.artifact.names import (
    ANOMALY_MAP_NAME,
    CONTRIBUTIONS_NAMES,
    ROW_OUTPUTS,
    TRANSFORMATION_LOG_PROBS_NAME,
)

UNKNOWN = "unknown"
# What one feature's contribution measures, by detector (README, "Explanations").
CONTRIBUTION_MEANINGS = {
    "autoencoder": "its squared reconstruction error in standardized units (the score is "
    "their mean)",
    "memae": "its squared reconstruction error through the memory, in standardized units (the "
    "score is their mean)",
    "vae": "its reconstruction term of the negative ELBO, squared residual / (2 variance) "
    "(for the likelihood ratio: the model's term minus the background model's)",
}
LEAVE_FEATURE_OUT_MEANING = (
    "how much the score drops when this feature alone is set to its training mean, in score "
    "units (negative: the feature's value makes the row look more normal)"
)
OTHER_EXPLANATIONS = {
    "nearest_row": "index of the nearest stored normal row (kNN: its position in the memory "
    "bank; the lowest one among equally near rows), the normal example this row is closest to",
    TRANSFORMATION_LOG_PROBS_NAME: "log p(m | T_m x) for each random transformation m (GOAD): "
    "how surely the network recognizes the transformation it was given; the score is minus "
    "their sum, so the most negative ones are the transformations the row fails under",
}
_SHOWN_FEATURES = 8


def _fmt(value: Any) -> str:
    """A number in a few significant digits; anything else as text; None as 'unknown'."""
    if value is None:
        return UNKNOWN
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return UNKNOWN
    return f"{value:.2%}"


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if isinstance(shape, list) else UNKNOWN


def _outputs(meta: dict) -> list[dict]:
    """Outputs as dicts; an older file lists bare names."""
    outputs = meta.get("outputs") or []
    return [o if isinstance(o, dict) else {"name": str(o)} for o in outputs]


def _output_names(meta: dict) -> list[str]:
    return [o["name"] for o in _outputs(meta)]


def _features(names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:_SHOWN_FEATURES])
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN_FEATURES else ""
    return shown + more


def _title(meta: dict) -> str:
    name = meta.get("model_name") or "unregistered model"
    version = meta.get("model_version")
    title = f"{name} v{version}" if version is not None else f"{name} (no registry version)"
    return title + (" (INT8)" if meta.get("quantized") else "")


def _params(params: Any) -> str:
    if not isinstance(params, dict) or not params:
        return ""
    return ", ".join(f"{key}={_fmt(value)}" for key, value in params.items())


def _smallest_p_value(meta: dict) -> str:
    n = meta.get("n_p_value_scores")
    return f"{1 / (n + 1):.2g}" if isinstance(n, int) and n > 0 else UNKNOWN


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return lines


def _data_section(meta: dict, data: dict) -> list[str]:
    rows: list[tuple[str, str]] = []
    if data.get("source"):
        source = str(data["source"]) + (f" (`{data['path']}`)" if data.get("path") else "")
        rows.append(("source", source))
    rows.append(("data version (DVC md5)", f"`{_fmt(meta.get('data_version'))}`"))
    split_rows = data.get("rows") or {}
    anomaly_share = data.get("anomaly_share") or {}
    for split, n in split_rows.items():
        share = anomaly_share.get(split)
        known = f", {share:.1%} labelled anomalous" if isinstance(share, (int, float)) else ""
        rows.append((f"{split} rows", f"{n}{known}"))
    if data.get("removed_by_cleaning") is not None:
        rows.append(("training rows removed by cleaning", _fmt(data["removed_by_cleaning"])))
    spec = meta.get("input") or {}
    rows.append(("input shape", _shape(spec.get("shape"))))
    features = _features(spec.get("feature_names") or [])
    if features:
        rows.append(("features", features))
    if data.get("description"):
        rows.append(("notes", str(data["description"])))
    return ["## Data", "", *_table(rows, ("what", "value"))]


def _metrics_section(metrics: dict) -> list[str]:
    lines = ["## Metrics", ""]
    shown = [(k, _fmt(v)) for k, v in metrics.items() if v is not None]
    if not shown:
        return [*lines, "No metrics were recorded for this version."]
    return [
        *lines,
        "Test metrics are measured once on the held-out test split and were not used to choose "
        "anything; parity figures compare onnxruntime with torch on the same rows.",
        "",
        *_table(shown, ("metric", "value")),
    ]


def _promotion_section(promotion: dict) -> list[str]:
    """The promotion decision with its reason and evidence (registry tags of the same names)."""
    evidence = [(key.removeprefix("promotion_"), value) for key, value in promotion.items()]
    return [
        "## Promotion",
        "",
        'Decided on the holdout split, which chose nothing else (see README, "Promotion"); '
        "intervals are paired bootstrap intervals, differences are this version minus the "
        "champion.",
        "",
        *_table(evidence, ("evidence", "value")),
    ]


def _limits_section(meta: dict) -> list[str]:
    target = _percent(meta.get("target_fpr"))
    lines = [
        "## Limits",
        "",
        "- It knows only the normal it was trained on: a new but legitimate kind of normal looks "
        "anomalous. The monitor flow checks for drift; retrain when normality itself moves.",
        f"- The threshold flags about {target} of normal data only while normal scores stay "
        "distributed as at calibration; recalibration re-estimates it (and the calibration "
        "scores) on a new batch.",
        "- Scores are not probabilities and are comparable only within this model version; use "
        "`p_value` for a scale that means the same across versions.",
        f"- `p_value` is valid for rows exchangeable with the calibration data; its smallest "
        f"possible value is {_smallest_p_value(meta)}.",
        "- Inputs must be float32 in the training data's units, with the shape and feature order "
        "below, and finite: the graph does not check for NaN.",
    ]
    if meta.get("quantized"):
        lines.append(
            "- This is the INT8 version: its scores approximate the float model's, and a few "
            "decisions near the threshold may differ (see its parity report)."
        )
    return lines


def _how_to_score(meta: dict) -> list[str]:
    spec = meta.get("input") or {}
    names = _output_names(meta) or ["score", "is_anomaly"]
    outputs = _outputs(meta)
    rows = [
        (f"`{o['name']}`", f"{o.get('dtype', '')} {_shape(o['shape']) if 'shape' in o else ''}")
        for o in outputs
    ]
    input_name = spec.get("name", "input")
    return [
        "## How to score it",
        "",
        f"Input `{input_name}`: {spec.get('dtype', 'float32')} {_shape(spec.get('shape'))} "
        "(N = any batch size). No torch is needed, only onnxruntime:",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
        f"{', '.join(names)} = session.run(",
        f"    {names!r}, {{{input_name!r}: np.asarray(X, dtype=np.float32)}}",
        ")",
        "```",
        "",
        "or `normalcy.scoring.score_onnx(path, X)` for `(score, is_anomaly)` in batches.",
        "",
        *_table(rows, ("output", "type")),
    ]


def _explanations_section(meta: dict) -> list[str]:
    """How to read each explanation output the graph has; empty when it has none."""
    explanations = [
        name for name in _output_names(meta) if name not in (*ROW_OUTPUTS, ANOMALY_MAP_NAME)
    ]
    if not explanations:
        return []
    lines = ["## Explanations", ""]
    for name in explanations:
        if name in CONTRIBUTIONS_NAMES:
            meaning = CONTRIBUTION_MEANINGS.get(meta.get("detector"), LEAVE_FEATURE_OUT_MEANING)
            lines.append(
                f"- `{name}` [N, d]: one value per input feature, in the feature order above; "
                f"larger = more responsible for the row's score. Each is {meaning}. Read the "
                "largest first: they are the features to check for a flagged row. "
                '`normalcy score --explain K` (or `"explain": K` in `POST /score`) adds each '
                "row's top K as `top1_feature, top1_contribution, ...`."
            )
        else:
            meaning = OTHER_EXPLANATIONS.get(name, "an explanation the detector gives per row")
            lines.append(f"- `{name}`: {meaning}.")
    return lines


def model_card(
    meta: dict, metrics: dict | None = None, data: dict | None = None, promotion: dict | None = None
) -> str:
    """A short markdown model card: what the model is for, its data, its metrics, its limits and
    how to score it. `meta` is the ONNX file's 'normalcy' metadata, `metrics` a flat name ->
    value dict, `data` a description of the training data (source, path, rows and
    anomaly_share per split, removed_by_cleaning, description; all optional), `promotion` the
    decision and its evidence as tags (`PromotionDecision.tags`)."""
    metrics, data = metrics or {}, data or {}
    detector = meta.get("detector", UNKNOWN)
    intro = [
        f"# Model card: {_title(meta)}",
        "",
        f"An anomaly detector (`{detector}`), exported by normalcy "
        f"{_fmt(meta.get('normalcy_version'))} as one ONNX graph "
        f"(opset {_fmt(meta.get('opset'))}), from MLflow run "
        f"`{_fmt(meta.get('mlflow_run_id'))}`.",
        "",
        "## What it is for",
        "",
        "It learned what normal rows look like and flags the ones that do not belong. `score`: "
        "higher is more anomalous. `is_anomaly`: score > "
        f"{_fmt(meta.get('threshold'))}, a threshold set on "
        f"{_fmt(meta.get('n_calibration_scores'))} held-out normal scores so that about "
        f"{_percent(meta.get('target_fpr'))} of normal rows are flagged.",
    ]
    if "p_value" in _output_names(meta):
        intro += [
            "",
            "`p_value`: (1 + number of calibration scores >= score) / (n + 1), with n = "
            f"{_fmt(meta.get('n_p_value_scores'))}; flagging rows with p_value <= a flags at "
            "most a fraction a of normal rows.",
        ]
    if "anomaly_map" in _output_names(meta):
        intro += ["", "`anomaly_map`: where in the image the anomaly is, per pixel."]
    if meta.get("recalibrated_from_version") is not None:
        intro += [
            "",
            f"Recalibrated from version {meta['recalibrated_from_version']}: same network, new "
            "threshold and calibration scores.",
        ]
    params = _params(meta.get("detector_params"))
    if params:
        intro += ["", f"Detector parameters: {params}."]
    explanations = _explanations_section(meta)
    sections = [
        intro,
        _data_section(meta, data),
        _metrics_section(metrics),
        *([_promotion_section(promotion)] if promotion else []),
        _limits_section(meta),
        _how_to_score(meta),
        *([explanations] if explanations else []),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"
