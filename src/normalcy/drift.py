"""Drift between a reference sample and a new batch: per-feature and on the anomaly scores.

Each feature gets a two-sample Kolmogorov-Smirnov test, and the p-values are corrected with
Benjamini-Hochberg: with hundreds of features (or thousands of pixels) uncorrected tests at 0.05
would flag about 5% of them on every batch even without any drift. BH bounds the expected fraction
of false discoveries among the flagged features at `fdr`; when nothing has drifted, the chance of
flagging any feature at all is at most `fdr` (for independent or positively dependent tests).

KS assumes continuous data. On discrete features (e.g. the 0..16 integer pixels of sklearn digits)
ties make it conservative: the p-values are too large, never too small, so false alarms stay within
the nominal rate, at the cost of some power.

A separate KS test on the detector's scores asks whether what the model sees has changed, which is
the shift that matters for the threshold; the alert rate above the threshold is reported alongside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass
class FeatureDrift:
    """KS result for one feature; `drifted` is the BH decision on `adjusted_p_value`."""

    feature: str
    statistic: float
    p_value: float
    adjusted_p_value: float
    drifted: bool


@dataclass
class DriftReport:
    """Everything the monitoring flow needs to decide, log and explain a drift alert."""

    features: list[FeatureDrift]
    n_features_drifted: int
    score_statistic: float
    score_p_value: float
    score_shifted: bool
    alert_rate_reference: float | None
    alert_rate_batch: float | None
    drifted: bool
    n_reference: int
    n_batch: int
    fdr: float | None = None
    score_shift_alpha: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, so `json.dumps` works and the report can be logged as-is."""
        return asdict(self)

    def drifted_features(self) -> list[FeatureDrift]:
        """Drifted features, most significant first."""
        return sorted(
            (f for f in self.features if f.drifted),
            key=lambda f: (f.adjusted_p_value, -f.statistic),
        )

    def summary(self, top: int = 10) -> str:
        """A few lines for a log or an alert: verdict, counts, top drifted features, score shift."""
        fdr = f" (BH FDR {self.fdr:g})" if self.fdr is not None else ""
        alpha = f" < alpha {self.score_shift_alpha:g}" if self.score_shift_alpha is not None else ""
        lines = [
            f"{'DRIFT' if self.drifted else 'No drift'}: reference n={self.n_reference}, "
            f"batch n={self.n_batch}",
            f"features drifted: {self.n_features_drifted}/{len(self.features)}{fdr}",
        ]
        drifted = self.drifted_features()
        for f in drifted[:top]:
            lines.append(
                f"  {f.feature}: KS={f.statistic:.3f} p={f.p_value:.3g} "
                f"adjusted p={f.adjusted_p_value:.3g}"
            )
        if len(drifted) > top:
            lines.append(f"  ... and {len(drifted) - top} more")
        verdict = f"shifted (p{alpha})" if self.score_shifted else "not shifted"
        lines.append(
            f"score distribution: {verdict}, KS={self.score_statistic:.3f} "
            f"p={self.score_p_value:.3g}"
        )
        if self.alert_rate_reference is not None and self.alert_rate_batch is not None:
            lines.append(
                f"alert rate: reference {self.alert_rate_reference:.2%}, "
                f"batch {self.alert_rate_batch:.2%}"
            )
        return "\n".join(lines)


def _check_rate(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    if not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return float(value)


def benjamini_hochberg(p_values: np.ndarray, fdr: float) -> tuple[np.ndarray, np.ndarray]:
    """BH step-up: (rejected, adjusted p-values), both in the input order.

    Adjusted p of the i-th smallest is `min over j >= i of m * p_(j) / j`, capped at 1; it is
    monotone in p, and rejecting `adjusted <= fdr` is the step-up rule (reject the k smallest,
    k the largest with `p_(k) <= k * fdr / m`), so a p-value above its own line is still rejected
    when a larger one is below its line.
    """
    q = _check_rate(fdr, "fdr")
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    if p.size == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p_values must all be finite and in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = adjusted_sorted
    return adjusted <= q, adjusted


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """`[n, ...]` -> `[n, d]` float64; images `[n, c, h, w]` become `[n, c*h*w]`."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"{name} must be [n, d] (or [n, c, h, w]), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    arr = arr.reshape(arr.shape[0], -1)
    n_bad = int(np.count_nonzero(~np.isfinite(arr)))
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def feature_drift(
    reference: np.ndarray,
    batch: np.ndarray,
    feature_names: Sequence[str] | None,
    fdr: float,
) -> list[FeatureDrift]:
    """Per-feature two-sample KS tests, BH-corrected at `fdr`, one `FeatureDrift` per feature.

    A feature constant at the same value in both samples carries no evidence and gets statistic 0,
    p = 1 (constant at different values is maximal drift, statistic 1). `feature_names=None`
    names features `feature_<i>` (useful for flattened images).
    """
    q = _check_rate(fdr, "fdr")
    ref = _as_matrix(reference, "reference")
    new = _as_matrix(batch, "batch")
    d = ref.shape[1]
    if new.shape[1] != d:
        raise ValueError(
            f"batch has {new.shape[1]} features but reference has {d}: expected {d}, "
            f"got {new.shape[1]} (shapes {np.shape(reference)} vs {np.shape(batch)})"
        )
    names = [f"feature_{i}" for i in range(d)] if feature_names is None else list(feature_names)
    if len(names) != d:
        raise ValueError(f"feature_names has {len(names)} names but the data has {d} features")

    statistic = np.zeros(d, dtype=np.float64)
    p_value = np.ones(d, dtype=np.float64)
    lo = np.minimum(ref.min(axis=0), new.min(axis=0))
    hi = np.maximum(ref.max(axis=0), new.max(axis=0))
    informative = lo != hi  # not constant-and-identical in both samples
    if informative.any():
        res = stats.ks_2samp(ref[:, informative], new[:, informative], axis=0)
        statistic[informative] = res.statistic
        p_value[informative] = np.clip(res.pvalue, 0.0, 1.0)
    rejected, adjusted = benjamini_hochberg(p_value, q)
    return [
        FeatureDrift(
            feature=str(names[i]),
            statistic=float(statistic[i]),
            p_value=float(p_value[i]),
            adjusted_p_value=float(adjusted[i]),
            drifted=bool(rejected[i]),
        )
        for i in range(d)
    ]


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def score_shift(reference_scores: np.ndarray, batch_scores: np.ndarray) -> tuple[float, float]:
    """(KS statistic, p-value) between the reference and batch score distributions."""
    ref = _as_scores(reference_scores, "reference_scores")
    new = _as_scores(batch_scores, "batch_scores")
    res = stats.ks_2samp(ref, new)
    return float(res.statistic), float(min(max(res.pvalue, 0.0), 1.0))


def detect_drift(
    reference: np.ndarray,
    batch: np.ndarray,
    feature_names: Sequence[str] | None,
    reference_scores: np.ndarray,
    batch_scores: np.ndarray,
    fdr: float,
    score_shift_alpha: float,
    threshold: float | None = None,
) -> DriftReport:
    """Feature drift (KS + BH at `fdr`) and score shift (KS at `score_shift_alpha`) in one report.

    `drifted` is true when any feature drifted or the scores shifted. With a `threshold`, the
    fraction of scores above it in each sample is reported: a rising alert rate is what users see.
    `n_reference`/`n_batch` count feature rows; the score samples may differ in size.
    """
    alpha = _check_rate(score_shift_alpha, "score_shift_alpha")
    features = feature_drift(reference, batch, feature_names, fdr)
    ref_scores = _as_scores(reference_scores, "reference_scores")
    new_scores = _as_scores(batch_scores, "batch_scores")
    score_stat, score_p = score_shift(ref_scores, new_scores)
    rate_ref = rate_new = None
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        rate_ref = float(np.mean(ref_scores > threshold))
        rate_new = float(np.mean(new_scores > threshold))
    n_drifted = sum(f.drifted for f in features)
    score_shifted = bool(score_p < alpha)
    return DriftReport(
        features=features,
        n_features_drifted=int(n_drifted),
        score_statistic=score_stat,
        score_p_value=score_p,
        score_shifted=score_shifted,
        alert_rate_reference=rate_ref,
        alert_rate_batch=rate_new,
        drifted=bool(n_drifted > 0 or score_shifted),
        n_reference=int(np.shape(reference)[0]),
        n_batch=int(np.shape(batch)[0]),
        fdr=float(fdr),
        score_shift_alpha=alpha,
    )
