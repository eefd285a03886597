"""Champion or challenger, decided on the holdout split alone.

The holdout (`prepare.holdout_fraction`, chosen by row hash, see `data.splits.in_holdout`) chose
nothing: no fit, no model selection, no threshold saw it, and it holds no row of the champion's
training data either. Both graphs are scored on it by the same onnxruntime code. The challenger
becomes champion when (1) its ranking metric beats the champion's by more than
`promotion.min_gain` at the lower end of a paired bootstrap interval, (2) its alert rate on
holdout normals is compatible with the target rate, and (3) its recall at its threshold is not
significantly below the champion's. Test metrics are reported, never used here. Torch-free."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from onnxruntime import InferenceSession
from sklearn.metrics import average_precision_score, roc_auc_score

from normalcy import registry
from normalcy.config import Params, PromotionParams
from normalcy.data.splits import Split
from normalcy.evaluation.bootstrap import (
    paired_bootstrap_deltas,
    percentile_interval,
    wilson_interval,
)
from normalcy.evaluation.selection import SYNTHETIC_ANOMALIES
from normalcy.scoring import load_session, read_metadata, score_onnx

log = logging.getLogger(__name__)

LABELLED_METRIC = "holdout_auprc"
LABEL_FREE_METRIC = "holdout_synthetic_auroc"
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    LABELLED_METRIC: average_precision_score,
    LABEL_FREE_METRIC: roc_auc_score,
}


@dataclass(frozen=True)
class HoldoutSet:
    """Rows both graphs are scored on, labelled: the holdout's own labels when it has both
    classes, else its rows as normal against synthetic anomalies made from them (the three
    kinds of `evaluation.selection`, pooled into one set so that it can be resampled)."""

    X: np.ndarray
    y: np.ndarray
    metric_name: str
    real_labels: bool

    @property
    def normal(self) -> np.ndarray:
        """Rows the alert rate is measured on: labelled normals, or every real holdout row."""
        return self.y == 0

    @property
    def n_real_rows(self) -> int:
        return len(self.y) if self.real_labels else int(self.normal.sum())


def holdout_set(holdout: Split, seed: int) -> HoldoutSet:
    if len(holdout) == 0:
        raise ValueError("the holdout split is empty; there is nothing to decide promotion on")
    if holdout.has_both_classes:
        return HoldoutSet(holdout.X, holdout.y.astype(int), LABELLED_METRIC, True)
    synthetic = [
        make(holdout.X, seed).astype(holdout.X.dtype) for make in SYNTHETIC_ANOMALIES.values()
    ]
    X = np.concatenate([holdout.X, *synthetic])
    y = np.r_[np.zeros(len(holdout), dtype=int), np.ones(len(X) - len(holdout), dtype=int)]
    return HoldoutSet(X, y, LABEL_FREE_METRIC, False)


def _recall(y: np.ndarray, alerts: np.ndarray) -> float:
    """Share of the anomalies flagged: a `METRICS`-style (labels, decisions) function."""
    return float(alerts[y == 1].mean())


@dataclass
class Evidence:
    """What the decision rests on, all measured on the holdout. Intervals are (low, high) at
    `promotion.confidence`; deltas are challenger minus champion. `champion_version` None: no
    champion yet; `same_input` False: the champion reads another input schema."""

    metric_name: str
    n_rows: int
    n_normal_rows: int
    challenger_metric: float
    target_rate: float
    alert_rate: float
    alert_rate_interval: tuple[float, float]
    champion_version: str | None = None
    same_input: bool = True
    champion_metric: float | None = None
    metric_delta_interval: tuple[float, float] | None = None
    recall_delta_interval: tuple[float, float] | None = None

    def tags(self) -> dict[str, str]:
        """The evidence as registry tags (strings), one per figure."""
        tags = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple | list):
                value = f"{value[0]:.6g}..{value[1]:.6g}"
            elif isinstance(value, float):
                value = f"{value:.6g}"
            tags[f"promotion_{key}"] = "none" if value is None else str(value)
        return tags


def measure(
    challenger: InferenceSession,
    champion: InferenceSession | None,
    data: HoldoutSet,
    target_rate: float,
    params: PromotionParams,
    seed: int,
) -> dict:
    """The challenger's metric and alert rate, and with a champion the paired intervals."""
    metric = METRICS[data.metric_name]
    scores, alerts = score_onnx(challenger, data.X)
    normal_alerts = alerts[data.normal]
    usable = bool(np.isfinite(scores).all())  # NaN scores: no metric, never promoted
    found = {
        "metric_name": data.metric_name,
        "n_rows": data.n_real_rows,
        "n_normal_rows": int(data.normal.sum()),
        "challenger_metric": float(metric(data.y, scores)) if usable else float("nan"),
        "target_rate": target_rate,
        "alert_rate": float(normal_alerts.mean()),
        "alert_rate_interval": wilson_interval(
            int(normal_alerts.sum()), len(normal_alerts), params.confidence
        ),
    }
    if champion is None or not usable:
        return found
    champion_scores, champion_alerts = score_onnx(champion, data.X)
    if not np.isfinite(champion_scores).all():  # a broken champion must not block its successor
        found["champion_metric"] = float("nan")
        return found
    found["champion_metric"] = float(metric(data.y, champion_scores))
    deltas = paired_bootstrap_deltas(
        metric, data.y, scores, champion_scores, params.n_bootstrap, seed
    )
    found["metric_delta_interval"] = percentile_interval(deltas, params.confidence)
    if data.real_labels:
        recall_deltas = paired_bootstrap_deltas(
            _recall, data.y, alerts, champion_alerts, params.n_bootstrap, seed
        )
        found["recall_delta_interval"] = percentile_interval(recall_deltas, params.confidence)
    return found


def gather_evidence(
    onnx_path: str | Path,
    holdout: Split,
    model_name: str,
    default_target_rate: float,
    params: PromotionParams,
    seed: int,
) -> Evidence:
    """Score the challenger graph and, when one is registered, the champion on the holdout.
    The alert rate is checked against the false-positive rate the challenger's threshold was
    set for (its `target_fpr` metadata, whatever `calibration.mode` chose it by), else
    `default_target_rate`."""
    data = holdout_set(holdout, seed)
    challenger = load_session(onnx_path)
    target_rate = float(read_metadata(challenger).get("target_fpr", default_target_rate))
    with tempfile.TemporaryDirectory() as tmp:
        champion = registry.load_champion(model_name, tmp)
        if champion is None:
            return Evidence(**measure(challenger, None, data, target_rate, params, seed))
        incumbent = load_session(champion.onnx_path)
        # same input name, dtype, shape and feature names: the same holdout fits both
        same_input = read_metadata(challenger).get("input") == read_metadata(incumbent).get("input")
        found = measure(
            challenger, incumbent if same_input else None, data, target_rate, params, seed
        )
    return Evidence(**found, champion_version=str(champion.version), same_input=same_input)


@dataclass
class PromotionDecision:
    """Whether the challenger becomes champion, why (a sentence for people), and the evidence."""

    promoted: bool
    reason: str
    evidence: Evidence

    def tags(self) -> dict[str, str]:
        """Decision, reason and evidence as the registry tags (and model card rows) show them."""
        return {
            "promotion_decision": "promoted" if self.promoted else "not_promoted",
            "promotion_reason": self.reason,
            **self.evidence.tags(),
        }


def plan_promotion(onnx_path: str | Path, holdout: Split, params: Params) -> PromotionDecision:
    """The decision for a challenger graph before it is registered: evidence, then the rule."""
    evidence = gather_evidence(
        onnx_path,
        holdout,
        params.mlflow.model_name,
        params.calibration.target_fpr,
        params.promotion,
        params.prepare.seed,
    )
    return decide_promotion(evidence, params.promotion)


def _interval(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:.3g}, {bounds[1]:.3g}]"


def _alert_rate_problem(evidence: Evidence, tolerance: float) -> str | None:
    """Why the challenger's alert rate is incompatible with the target, or None: its interval
    must reach into target x (1 +- tolerance), so a handful of rows does not fail it by chance."""
    low, high = evidence.alert_rate_interval
    allowed = (evidence.target_rate * (1 - tolerance), evidence.target_rate * (1 + tolerance))
    if high >= allowed[0] and low <= allowed[1]:
        return None
    return (
        f"its alert rate on {evidence.n_normal_rows} holdout normal rows is "
        f"{evidence.alert_rate:.3g} (interval {_interval(evidence.alert_rate_interval)}), "
        f"incompatible with the target {evidence.target_rate:.3g} +- {tolerance:.0%}"
    )


def decide_promotion(
    evidence: Evidence, params: PromotionParams, challenger_version: str | None = None
) -> PromotionDecision:
    """The rule of the module docstring, free of MLflow; a first model is always served."""

    def decide(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promoted, reason, evidence)

    ch = f"challenger ({evidence.metric_name}={evidence.challenger_metric:.4g})"
    cv = f"champion version {evidence.champion_version}"
    alert_problem = _alert_rate_problem(evidence, params.alert_rate_tolerance)
    if challenger_version is not None and challenger_version == evidence.champion_version:
        return decide(False, f"Version {challenger_version} already is the champion.")
    if math.isnan(evidence.challenger_metric):
        return decide(False, f"The {ch} has no usable metric (NaN); the champion is kept.")
    if evidence.champion_version is None:
        warning = f" Note: {alert_problem}." if alert_problem else ""
        return decide(True, f"There is no champion yet, so the {ch} becomes champion.{warning}")
    if not evidence.same_input:
        return decide(
            False,
            f"The {cv} reads another input schema, so the two cannot be compared; it is kept "
            "(use another mlflow.model_name for a new data schema).",
        )
    if evidence.champion_metric is None or math.isnan(evidence.champion_metric):
        return decide(
            True, f"The {cv} scores the holdout with non-finite values, so the {ch} replaces it."
        )
    delta = evidence.metric_delta_interval
    versus = (
        f"the {cv} ({evidence.metric_name}={evidence.champion_metric:.4g}); difference "
        f"{_interval(delta)} at {params.confidence:.0%} on {evidence.n_rows} holdout rows"
    )
    if delta[0] <= params.min_gain:
        return decide(
            False,
            f"The {ch} does not beat {versus}, which must exceed {params.min_gain:g}; the "
            "champion is kept.",
        )
    if alert_problem:
        return decide(False, f"The {ch} beats {versus}, but is not promoted: {alert_problem}.")
    recall = evidence.recall_delta_interval
    if recall is not None and recall[1] < 0:
        return decide(
            False,
            f"The {ch} beats {versus}, but is not promoted: its recall at its threshold is "
            f"below the {cv}'s (difference {_interval(recall)}).",
        )
    return decide(True, f"The {ch} beats {versus}, and becomes champion.")


def apply_promotion(
    registered: registry.Registered, decision: PromotionDecision
) -> PromotionDecision:
    """Move `champion` to the just-registered challenger when the decision says so, and tag the
    decision, its reason and its evidence on the version. The alias moves only if it still
    names the version the evidence was measured against (another run may have moved it); the
    decision as applied is returned."""
    client = MlflowClient()
    current = registry._alias_version(client, registered.name, registry.CHAMPION)
    promoted = decision.promoted and current == decision.evidence.champion_version
    reason = decision.reason
    if decision.promoted and not promoted:
        reason = (
            f"The champion moved to version {current} while this run compared with version "
            f"{decision.evidence.champion_version}; nothing was promoted. ({decision.reason})"
        )
    if promoted:
        client.set_registered_model_alias(registered.name, registry.CHAMPION, registered.version)
    applied = replace(decision, promoted=promoted, reason=reason)
    tags = {**applied.tags(), "champion_version_before": current or "none"}
    _tag_version(client, registered.name, registered.version, tags)
    evidence = decision.evidence
    mlflow.log_metric(f"promotion_{evidence.metric_name}", evidence.challenger_metric)
    log.info("%s v%s: %s", registered.name, registered.version, reason)
    return applied


def _tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def promote_version(model_name: str, version: str, reason: str) -> str | None:
    """Make `version` champion outside the holdout gate (a person's decision, or a
    recalibration that passed its guards), remembering the champion it replaces so that
    `rollback` can return to it. Returns that previous champion (None: there was none)."""
    client = MlflowClient()
    try:
        found = client.get_model_version(model_name, str(version))
    except MlflowException as error:
        raise ValueError(f"model {model_name!r} has no version {version!r}") from error
    if found.tags.get(registry.STATUS_TAG) == registry.FAILED:
        raise ValueError(
            f"{model_name} v{version} never finished registering (tag "
            f"{registry.STATUS_TAG}={registry.FAILED}); promote a version that did"
        )
    previous = registry._alias_version(client, model_name, registry.CHAMPION)
    if previous == str(version):  # already served: its record of what it replaced stays
        log.info("%s: v%s already is the champion", model_name, version)
        return previous
    client.set_registered_model_alias(model_name, registry.CHAMPION, str(version))
    tags = {
        "promotion_decision": "promoted",
        "promotion_reason": reason,
        "champion_version_before": previous or "none",
    }
    _tag_version(client, model_name, str(version), tags)
    log.info("%s: champion v%s -> v%s (%s)", model_name, previous, version, reason)
    return previous


def rollback(model_name: str) -> str:
    """Move `champion` back to the version it replaced (its `champion_version_before` tag);
    the version left is tagged `rolled_back`. Returns the new champion's version."""
    client = MlflowClient()
    current = registry._alias_version(client, model_name, registry.CHAMPION)
    if current is None:
        raise ValueError(f"model {model_name!r} has no champion to roll back")
    before = client.get_model_version(model_name, current).tags.get("champion_version_before")
    if before in (None, "none"):
        raise ValueError(
            f"champion v{current} of {model_name!r} replaced no earlier champion; there is "
            "nothing to roll back to"
        )
    client.set_registered_model_alias(model_name, registry.CHAMPION, before)
    _tag_version(client, model_name, current, {"rolled_back": f"champion returned to v{before}"})
    log.info("%s: rolled back from v%s to v%s", model_name, current, before)
    return before
