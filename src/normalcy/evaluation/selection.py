"""Model selection on validation data only: AUPRC with labels, a synthetic-anomaly AUROC without."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

LABELLED_METRIC = "val_auprc"
LABEL_FREE_METRIC = "val_synthetic_auroc"

log = logging.getLogger(__name__)
FLOAT_MAX = np.finfo(np.float64).max


def shuffled_features(X: np.ndarray, seed: int) -> np.ndarray:
    """Dependency anomalies: each feature permuted independently across rows. Every marginal
    stays the same, but the dependencies between features that define normal data are gone."""
    flat = X.reshape(len(X), -1).copy()
    rng = np.random.default_rng(seed)
    for column in range(flat.shape[1]):
        flat[:, column] = flat[rng.permutation(len(flat)), column]
    return flat.reshape(X.shape)


def uniform_in_box(X: np.ndarray, seed: int, widen: float = 0.1) -> np.ndarray:
    """Global anomalies: uniform in the rows' bounding box widened by `widen` of each range
    (in float64, like `locally_spread`: a float32 range or variance can overflow)."""
    flat = X.reshape(len(X), -1).astype(np.float64)
    low, high = flat.min(axis=0), flat.max(axis=0)
    margin = widen * (high - low)
    rng = np.random.default_rng(seed)
    return rng.uniform(low - margin, high + margin, size=flat.shape).reshape(X.shape)


def locally_spread(X: np.ndarray, seed: int, variance_factor: float = 5.0) -> np.ndarray:
    """Local anomalies: each row plus Gaussian noise, so a feature's variance grows about
    `variance_factor`-fold; close to normal data, but off its typical spread. In float64: the
    float32 variance of a feature with values near 1e20 is infinite."""
    flat = X.reshape(len(X), -1).astype(np.float64)
    scale = np.sqrt(variance_factor - 1.0) * flat.std(axis=0)
    rng = np.random.default_rng(seed)
    return (flat + rng.normal(size=flat.shape) * scale).reshape(X.shape)


# ADBench's synthetic anomaly types (Han et al., NeurIPS 2022, section 3.2): no single kind of
# anomaly can stand for the unknown real ones, so the criterion averages over three of them.
SYNTHETIC_ANOMALIES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "dependency": shuffled_features,
    "global": uniform_in_box,
    "local": locally_spread,
}


def synthetic_auroc(
    score: Callable[[np.ndarray], np.ndarray],
    val_X: np.ndarray,
    seed: int,
    kind: str,
    val_scores: np.ndarray | None = None,
) -> float:
    """AUROC of telling held-out validation rows from synthetic anomalies of one `kind`;
    `val_scores` are `score(val_X)` when the caller already has them (several kinds or draws
    against the same rows need them once)."""
    synthetic = SYNTHETIC_ANOMALIES[kind](val_X, seed).astype(val_X.dtype)
    real = score(val_X) if val_scores is None else val_scores
    scores = np.concatenate([real, score(synthetic)]).astype(np.float64)
    if np.isnan(scores).any():
        return float("nan")
    labels = np.concatenate([np.zeros(len(val_X)), np.ones(len(synthetic))])
    # +-inf ranks above (below) every number, as an overflowing score of a far-out row should
    return float(roc_auc_score(labels, np.clip(scores, -FLOAT_MAX, FLOAT_MAX)))


def label_free_score(
    score: Callable[[np.ndarray], np.ndarray],
    val_X: np.ndarray,
    seed: int,
    val_scores: np.ndarray | None = None,
) -> float:
    """Mean AUROC of telling held-out validation rows from dependency, global and local
    synthetic anomalies made from them. It uses no labels, so it works when validation has no
    labelled anomalies; a detector must model both the structure and the spread of normal data
    to rank all three kinds above the real rows."""
    real = score(val_X) if val_scores is None else val_scores
    aurocs = [synthetic_auroc(score, val_X, seed, k, real) for k in SYNTHETIC_ANOMALIES]
    return float(np.mean(aurocs))


def validation_metric(
    score: Callable[[np.ndarray], np.ndarray],
    val_X: np.ndarray,
    val_y: np.ndarray | None,
    seed: int,
    trains_on_synthetic_anomalies: bool = False,
    candidate: str = "a candidate",
) -> tuple[str, float]:
    """(metric name, value): AUPRC when validation has both classes labelled, else label-free.
    `candidate` names it in the warning below.

    A method trained against synthetic outliers (outlier exposure) gets NaN from the label-free
    criterion, which would only replay its training task and always rank it first; NaN makes
    it ineligible to win (and to join the ensemble) when validation has no labels. So does a
    NaN or infinite score on a validation row: no threshold or p-value can be set on it."""
    labelled = val_y is not None and 0 < int(np.sum(val_y)) < len(val_y)
    name = LABELLED_METRIC if labelled else LABEL_FREE_METRIC
    if trains_on_synthetic_anomalies and not labelled:
        return name, float("nan")
    val_scores = np.asarray(score(val_X), dtype=np.float64)
    broken = int((~np.isfinite(val_scores)).sum())
    if broken:
        log.warning(
            "%s: %d of %d validation scores are NaN or infinite: it cannot win",
            candidate,
            broken,
            len(val_scores),
        )
        return name, float("nan")
    if labelled:
        return name, float(average_precision_score(val_y, val_scores))
    return name, label_free_score(score, val_X, seed, val_scores)


@dataclass
class CandidateResult:
    name: str
    metric_name: str
    metric: float
    exportable: bool
    fit_seconds: float
    extra: dict = field(default_factory=dict)


def select_winner(results: list[CandidateResult]) -> CandidateResult:
    """Best validation metric among exportable candidates; config order breaks ties.

    A non-exportable method (inference that is not a graph) can never be the registered winner."""
    eligible = [r for r in results if r.exportable and np.isfinite(r.metric)]
    if not eligible:
        names = [r.name for r in results]
        raise ValueError(
            f"no exportable candidate with a finite validation metric among {names} (without "
            "labelled validation anomalies, methods trained on synthetic outliers cannot be "
            "judged; add another candidate)"
        )
    return max(eligible, key=lambda r: (r.metric, -results.index(r)))


# --- label-free selection: a robust default, left only on evidence beyond noise ------------------

CONSENSUS = "consensus"
EVIDENCE_SEEDS = (0, 1, 2)  # synthetic draws per type: their spread is the criterion's noise


def synthetic_evidence(
    score: Callable[[np.ndarray], np.ndarray], val_X: np.ndarray, seed: int
) -> dict[str, np.ndarray]:
    """AUROC against each synthetic anomaly type, once per synthetic draw (`EVIDENCE_SEEDS`
    offset by `seed`), so a difference between candidates can be set against the draw noise."""
    real = score(val_X)
    return {
        kind: np.array(
            [synthetic_auroc(score, val_X, seed + s, kind, real) for s in EVIDENCE_SEEDS]
        )
        for kind in SYNTHETIC_ANOMALIES
    }


def beats_beyond_noise(
    challenger: dict[str, np.ndarray], default: dict[str, np.ndarray], margin: float
) -> bool:
    """True when, on every synthetic type, the challenger's paired gain over the default (same
    draws) exceeds `margin` by two standard errors of the draws."""
    for kind, values in challenger.items():
        gain = values - default[kind]
        noise = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else 0.0
        if not gain.mean() - 2.0 * noise > margin:
            return False
    return True


def choose_label_free(
    results: list[CandidateResult],
    evidence: dict[str, dict[str, np.ndarray]],
    margin: float,
) -> tuple[CandidateResult, str]:
    """The `consensus` candidate, unless exportable candidates beat it on every synthetic type
    beyond noise (`beats_beyond_noise`); then the one of those with the best mean criterion.

    An argmax of the synthetic criterion alone is no better than a random pick on real
    anomalies (Ma, Zhao, Zhang and Akoglu, SIGKDD Explorations 2023; ADBench section 4.3: it
    favours the methods that fit the synthetic types), so a fixed diverse ensemble is the
    default, and the criterion may only overrule it where it is unanimous and clear."""
    default = next(r for r in results if r.name == CONSENSUS)
    challengers = [
        r
        for r in results
        if r.name in evidence
        and r is not default
        and r.exportable
        and beats_beyond_noise(evidence[r.name], evidence[CONSENSUS], margin)
    ]
    if not challengers:
        return default, (
            f"label-free validation: no candidate beats the consensus of "
            f"{default.extra.get('members')} on every synthetic anomaly type beyond the noise of "
            f"{len(EVIDENCE_SEEDS)} synthetic draws (margin {margin}), so the consensus is kept"
        )
    best = max(challengers, key=lambda r: (r.metric, -results.index(r)))
    others = [r.name for r in challengers if r is not best]
    return best, (
        f"label-free validation: {best.name} beats the consensus of "
        f"{default.extra.get('members')} on every synthetic anomaly type beyond the noise of "
        f"{len(EVIDENCE_SEEDS)} synthetic draws (margin {margin})"
        + (f"; so did {others}" if others else "")
    )
