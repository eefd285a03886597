"""Champion or challenger: measure both graphs on the same data with the same code, and move the
`champion` alias only when the challenger is strictly better. Torch-free: onnxruntime scores
both graphs, so the measure cannot depend on how a model was trained."""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from onnxruntime import InferenceSession

from normalcy import registry
from normalcy.data.splits import Split
from normalcy.evaluation.selection import validation_metric
from normalcy.scoring import load_session, read_metadata, score_onnx

log = logging.getLogger(__name__)


def promotion_metric(session: InferenceSession, test: Split, seed: int) -> tuple[str, float]:
    """The promotion metric of a graph on the test split, from onnxruntime alone, so the
    challenger and the champion are measured by exactly the same code."""
    name, value = validation_metric(lambda X: score_onnx(session, X)[0], test.X, test.y, seed)
    return name.replace("val_", "test_"), value


@dataclass
class Comparison:
    """The challenger's metric and the champion's on the same data (None: no champion;
    inf: a champion with another input schema, which therefore stays)."""

    metric_name: str
    challenger_metric: float
    champion_metric: float | None


def compare_with_champion(
    onnx_path: str | Path, test: Split, model_name: str, seed: int
) -> Comparison:
    """Measure the challenger graph and, when one is registered, the current champion on `test`."""
    challenger = load_session(onnx_path)
    metric_name, challenger_metric = promotion_metric(challenger, test, seed)
    champion_metric = None
    with tempfile.TemporaryDirectory() as tmp:
        champion = registry.load_champion(model_name, tmp)
        if champion is not None:
            incumbent = load_session(champion.onnx_path)
            # same input name, dtype, shape and feature names: the same test data fits both
            if read_metadata(challenger).get("input") == read_metadata(incumbent).get("input"):
                _, champion_metric = promotion_metric(incumbent, test, seed)
            else:  # another schema: no fair comparison, so the champion stays
                log.warning(
                    "champion v%s expects another input; it is kept (use another "
                    "mlflow.model_name for a new data schema)",
                    champion.version,
                )
                champion_metric = float("inf")
    return Comparison(metric_name, challenger_metric, champion_metric)


@dataclass
class PromotionDecision:
    """Whether the challenger became champion, and why, in a sentence for people."""

    promoted: bool
    reason: str
    challenger_metric: float
    champion_metric: float | None
    metric_name: str


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def decide_promotion(
    challenger_version: str,
    metric_name: str,
    challenger_metric: float,
    champion_metric: float | None,
    champion_version: str | None,
) -> PromotionDecision:
    """The promotion rule, free of MLflow: the challenger wins when there is no champion, or its
    metric is strictly higher on the same test data; ties and NaN keep what is served."""
    ch = f"challenger version {challenger_version} ({metric_name}={_fmt(challenger_metric)})"

    def decide(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promoted, reason, challenger_metric, champion_metric, metric_name)

    if champion_version is not None and champion_version == str(challenger_version):
        return decide(False, f"Version {challenger_version} already is the champion.")
    if math.isnan(challenger_metric):
        return decide(False, f"The {ch} has no usable metric (NaN); the champion is kept.")
    if champion_version is None:
        return decide(True, f"There is no champion yet, so the {ch} becomes champion.")
    cv = f"champion version {champion_version}"
    if champion_metric is None or math.isnan(champion_metric):
        return decide(True, f"The {cv} has no usable {metric_name}, so the {ch} replaces it.")
    if challenger_metric > champion_metric:
        return decide(
            True,
            f"The {ch} beats the {cv} ({metric_name}={_fmt(champion_metric)}) on the same test "
            "data and becomes champion.",
        )
    return decide(
        False,
        f"The {ch} is not better than the {cv} ({metric_name}={_fmt(champion_metric)}) on the "
        "same test data; the champion is kept.",
    )


def promote_if_better(
    model_name: str,
    challenger_version: str,
    metric_name: str,
    challenger_metric: float,
    champion_metric: float | None,
) -> PromotionDecision:
    """Move the `champion` alias to the challenger when `decide_promotion` says so, and record
    the decision as tags on the challenger version so the registry explains itself.

    `champion_metric` is the current champion's metric on the challenger's test data, computed
    by the caller (None when there is no champion). If the registry has no champion alias the
    challenger is promoted whatever `champion_metric` says, so a model is always served.
    """
    client = MlflowClient()
    challenger_version = str(challenger_version)
    current = registry._alias_version(client, model_name, registry.CHAMPION)
    decision = decide_promotion(
        challenger_version, metric_name, challenger_metric, champion_metric, current
    )
    if decision.promoted:
        client.set_registered_model_alias(model_name, registry.CHAMPION, challenger_version)
    tags = {
        "promotion_decision": "promoted" if decision.promoted else "not_promoted",
        "promotion_reason": decision.reason,
        "promotion_metric": metric_name,
        "challenger_metric": _fmt(challenger_metric),
        "champion_metric": "none" if champion_metric is None else _fmt(champion_metric),
        "champion_version_before": current or "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, challenger_version, key, value)
    log.info("%s: %s", model_name, decision.reason)
    return decision


def promote(registered: registry.Registered, comparison: Comparison) -> PromotionDecision:
    """`promote_if_better` for a just-registered challenger; its metric is logged in the run."""
    decision = promote_if_better(
        registered.name,
        registered.version,
        comparison.metric_name,
        comparison.challenger_metric,
        comparison.champion_metric,
    )
    mlflow.log_metric(f"promotion_{comparison.metric_name}", comparison.challenger_metric)
    return decision
