"""Drift between a reference sample and a new batch, decided at one overall level `alpha`.

Several families of tests look at the batch: per-feature Kolmogorov-Smirnov tests (with a
Benjamini-Hochberg correction inside the family), a KS test on the detector's scores, and, when
the monitor has them, an alert-rate test and a sequential test across batches. Each holds its own
level, so "drift when any family fires" would add up their false alarms (two families at 1% and 5%
flagged 4-6.5% of stationary batches). Instead the families share `alpha` by Bonferroni: each is
tested at `alpha / n_families`, so a stationary batch is flagged with probability at most `alpha`
whatever the dependence between the families (they all look at the same batch, so they are not
independent, which Bonferroni does not need). Holm would need a p-value from every family, and
the sequential CUSUM is a threshold test without one.

Inside the feature family BH bounds the expected fraction of false discoveries among the flagged
features; when nothing has drifted, the chance of flagging any feature at all is at most the
family's level (for independent or positively dependent tests). The family's p-value is the
smallest BH-adjusted p-value (Simes' p-value of the global null), so the family rejects exactly
when BH flags a feature.

KS assumes continuous data. On discrete features (e.g. the 0..16 integer pixels of sklearn digits)
ties make it conservative: the p-values are too large, never too small, so false alarms stay within
the nominal rate, at the cost of some power.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from normalcy.checks import as_matrix, as_scores, check_rate
from normalcy.drift_alerts import alert_rate_test, count_alerts
from normalcy.drift_mmd import DEFAULT_PERMUTATIONS, mmd_test
from normalcy.drift_sequential import (
    SequentialState,
    batch_correlation,
    cusum_step,
    cusum_threshold,
    rank_shift,
)


@dataclass
class FeatureDrift:
    """KS result for one feature; `drifted` is the BH decision on `adjusted_p_value`."""

    feature: str
    statistic: float
    p_value: float
    adjusted_p_value: float
    drifted: bool


@dataclass
class FamilyTest:
    """One family's verdict at its share of the overall level; `p_value` is None for a threshold
    test (the CUSUM), whose `critical_value` is the threshold its statistic is compared with."""

    family: str
    statistic: float
    p_value: float | None
    level: float
    rejected: bool
    critical_value: float | None = None


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
    alpha: float
    family_level: float
    tests: list[FamilyTest] = field(default_factory=list)
    alert_rate_target: float | None = None
    sequential_state: SequentialState | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only, so `json.dumps` works and the report can be logged as-is."""
        return asdict(self)

    def test(self, family: str) -> FamilyTest | None:
        """The named family's result, or None when it did not run on this batch."""
        return next((t for t in self.tests if t.family == family), None)

    def fired(self) -> list[str]:
        """The families that rejected, in the order they ran."""
        return [t.family for t in self.tests if t.rejected]

    def drifted_features(self) -> list[FeatureDrift]:
        """Drifted features, most significant first."""
        return sorted(
            (f for f in self.features if f.drifted),
            key=lambda f: (f.adjusted_p_value, -f.statistic),
        )

    def summary(self, top: int = 10) -> str:
        """A few lines for a log or an alert: verdict, each family, top drifted features."""
        verdict = f"DRIFT ({', '.join(self.fired())})" if self.drifted else "No drift"
        lines = [
            f"{verdict}: reference n={self.n_reference}, batch n={self.n_batch}, overall alpha "
            f"{self.alpha:g} = {len(self.tests)} families x {self.family_level:.3g} (Bonferroni)",
            f"features drifted: {self.n_features_drifted}/{len(self.features)} (BH inside)",
        ]
        drifted = self.drifted_features()
        for f in drifted[:top]:
            lines.append(
                f"  {f.feature}: KS={f.statistic:.3f} p={f.p_value:.3g} "
                f"adjusted p={f.adjusted_p_value:.3g}"
            )
        if len(drifted) > top:
            lines.append(f"  ... and {len(drifted) - top} more")
        shifted = "shifted" if self.score_shifted else "not shifted"
        lines.append(
            f"score distribution: {shifted}, KS={self.score_statistic:.3f} "
            f"p={self.score_p_value:.3g}"
        )
        if self.alert_rate_batch is not None:
            reference = (
                f"reference {self.alert_rate_reference:.2%}, "
                if self.alert_rate_reference is not None
                else ""
            )
            target = (
                f", target {self.alert_rate_target:.2%}"
                if self.alert_rate_target is not None
                else ""
            )
            lines.append(f"alert rate: {reference}batch {self.alert_rate_batch:.2%}{target}")
        for t in self.tests:
            evidence = (
                f"p={t.p_value:.3g}"
                if t.p_value is not None
                else (f"statistic {t.statistic:.3g} vs {t.critical_value:.3g}")
            )
            lines.append(
                f"  {t.family}: {'fired' if t.rejected else 'quiet'} ({evidence}, "
                f"level {t.level:.3g})"
            )
        return "\n".join(lines)


def benjamini_hochberg(p_values: np.ndarray, fdr: float) -> tuple[np.ndarray, np.ndarray]:
    """BH step-up: (rejected, adjusted p-values), both in the input order.

    Adjusted p of the i-th smallest is `min over j >= i of m * p_(j) / j`, capped at 1; it is
    monotone in p, and rejecting `adjusted <= fdr` is the step-up rule (reject the k smallest,
    k the largest with `p_(k) <= k * fdr / m`), so a p-value above its own line is still rejected
    when a larger one is below its line.
    """
    q = check_rate(fdr, "fdr")
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
    q = check_rate(fdr, "fdr")
    ref = as_matrix(reference, "reference")
    new = as_matrix(batch, "batch")
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


def score_shift(reference_scores: np.ndarray, batch_scores: np.ndarray) -> tuple[float, float]:
    """(KS statistic, p-value) between the reference and batch score distributions."""
    ref = as_scores(reference_scores, "reference_scores")
    new = as_scores(batch_scores, "batch_scores")
    res = stats.ks_2samp(ref, new)
    return float(res.statistic), float(min(max(res.pvalue, 0.0), 1.0))


def sequential_test(
    state: SequentialState,
    reference_scores: np.ndarray,
    batch_scores: np.ndarray,
    level: float,
    allowance: float,
) -> tuple[SequentialState, FamilyTest]:
    """(next state, the CUSUM family's verdict) after adding this batch's `rank_shift`; its
    threshold is calibrated for `level` at this batch's correlation with the others."""
    correlation = batch_correlation(batch_scores.size, reference_scores.size)
    threshold = cusum_threshold(level, round(correlation, 3), allowance)
    z = rank_shift(reference_scores, batch_scores)
    next_state, running, alarm = cusum_step(state, z, allowance, threshold)
    return next_state, FamilyTest("sequential", running, None, level, alarm, threshold)


def p_value_test(family: str, statistic: float, p_value: float, level: float) -> FamilyTest:
    """A family that rejects when its p-value is at most its share of the level."""
    return FamilyTest(family, float(statistic), float(p_value), level, bool(p_value <= level))


def detect_drift(
    reference: np.ndarray,
    batch: np.ndarray,
    feature_names: Sequence[str] | None,
    reference_scores: np.ndarray,
    batch_scores: np.ndarray,
    alpha: float,
    threshold: float | None = None,
    target_alert_rate: float | None = None,
    batch_alerts: np.ndarray | None = None,
    calibrated_on: int | None = None,
    sequential_state: SequentialState | None = None,
    cusum_allowance: float = 0.5,
    mmd_rows: int | None = None,
    mmd_permutations: int = DEFAULT_PERMUTATIONS,
) -> DriftReport:
    """Feature drift (KS + BH), score shift (KS), given `target_alert_rate` the alert rate
    (beta-binomial), given `sequential_state` the CUSUM across batches, and given `mmd_rows` the
    MMD on whole rows (permutations), sharing `alpha` by Bonferroni.

    `drifted` is true when any family rejects at `alpha / n_families`. With a `threshold`, the
    fraction of scores above it in each sample is reported: a rising alert rate is what users see.
    The alert-rate test counts `batch_alerts` (the graph's is_anomaly) or, without them, the
    scores above `threshold`; `calibrated_on` is the number of scores the threshold was set on.
    `n_reference`/`n_batch` count feature rows; the score samples may differ in size. The CUSUM
    adds this batch's `rank_shift` to `sequential_state`; the report's `sequential_state` is the
    state to keep for the next batch.
    """
    overall = check_rate(alpha, "alpha")
    ref_scores = as_scores(reference_scores, "reference_scores")
    new_scores = as_scores(batch_scores, "batch_scores")
    rate_ref = rate_new = None
    if threshold is not None:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        rate_ref = float(np.mean(ref_scores > threshold))
        rate_new = float(np.mean(new_scores > threshold))
    n_families = 2 + sum(x is not None for x in (target_alert_rate, sequential_state, mmd_rows))
    level = overall / n_families
    if mmd_rows is not None and 1 / (1 + mmd_permutations) > level:
        raise ValueError(
            f"mmd_permutations={mmd_permutations} cannot reach the MMD's level {level:.3g}: "
            f"need at least {math.ceil(1 / level) - 1}"
        )
    features = feature_drift(reference, batch, feature_names, level)
    score_stat, score_p = score_shift(ref_scores, new_scores)
    tests = [
        p_value_test(
            "features",
            max((f.statistic for f in features), default=0.0),
            min((f.adjusted_p_value for f in features), default=1.0),  # Simes' p-value
            level,
        ),
        p_value_test("scores", score_stat, score_p, level),
    ]
    if target_alert_rate is not None:
        n_alerts = count_alerts(batch_alerts, new_scores, threshold)
        rate_new, rate_p = alert_rate_test(
            n_alerts, new_scores.size, target_alert_rate, calibrated_on
        )
        tests.append(p_value_test("alert_rate", rate_new, rate_p, level))
    next_state = None
    if sequential_state is not None:
        next_state, cusum_test = sequential_test(
            sequential_state, ref_scores, new_scores, level, cusum_allowance
        )
        tests.append(cusum_test)
    if mmd_rows is not None:
        ref_rows, new_rows = as_matrix(reference, "reference"), as_matrix(batch, "batch")
        mmd, mmd_p = mmd_test(ref_rows, new_rows, mmd_rows, mmd_permutations)
        tests.append(p_value_test("mmd", mmd, mmd_p, level))
    return DriftReport(
        features=features,
        n_features_drifted=int(sum(f.drifted for f in features)),
        score_statistic=score_stat,
        score_p_value=score_p,
        score_shifted=tests[1].rejected,
        alert_rate_reference=rate_ref,
        alert_rate_batch=rate_new,
        drifted=any(t.rejected for t in tests),
        n_reference=int(np.shape(reference)[0]),
        n_batch=int(np.shape(batch)[0]),
        alpha=overall,
        family_level=level,
        tests=tests,
        alert_rate_target=None if target_alert_rate is None else float(target_alert_rate),
        sequential_state=next_state,
    )
