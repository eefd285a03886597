"""The alert-rate family: is the batch's share of alerts what the champion was calibrated for?"""

from __future__ import annotations

import numpy as np
from scipy import stats

from normalcy.checks import check_rate


def alert_rate_test(
    n_alerts: int, n_batch: int, target_rate: float, n_calibration: int | None = None
) -> tuple[float, float]:
    """(alert rate of the batch, exact two-sided p-value of its alert count at `target_rate`).

    Under no drift each row is an alert with probability about the champion's target FPR. That
    probability is itself an estimate: the threshold is a quantile of `n_calibration` scores, so
    the champion's true rate is Beta-distributed around the target (the conformal argument: the
    chance that a new normal score exceeds the k-th largest of n is Beta(k, n + 1 - k)). The count
    is then Beta-Binomial(n_batch, target * (n + 1), (1 - target) * (n + 1)); ignoring this makes
    a plain binomial flag a well-calibrated champion whenever its threshold came out a little low.
    Without `n_calibration` the count is Binomial(n_batch, target_rate).

    Two-sided, because both directions are failures: too many alerts is drift or an attack, and
    too few (down to none) is a broken scorer, a sensor stuck at a normal value or scores that
    shrank; the price is half the level on each side. The p-value sums the probabilities of every
    count no more likely than the observed one. With few expected alerts (n_batch * target below
    about 5) even zero alerts is not significant: only the upper side has power.
    """
    rate = check_rate(target_rate, "target_rate")
    if isinstance(n_batch, bool) or int(n_batch) != n_batch or n_batch < 1:
        raise ValueError(f"n_batch must be a positive integer, got {n_batch!r}")
    if int(n_alerts) != n_alerts or not 0 <= n_alerts <= n_batch:
        raise ValueError(f"n_alerts must be an integer in [0, n_batch={n_batch}], got {n_alerts!r}")
    counts = np.arange(int(n_batch) + 1)
    if n_calibration is None:
        pmf = stats.binom.pmf(counts, int(n_batch), rate)
    elif int(n_calibration) != n_calibration or n_calibration < 1:
        raise ValueError(f"n_calibration must be a positive integer, got {n_calibration!r}")
    else:
        weight = int(n_calibration) + 1
        pmf = stats.betabinom.pmf(counts, int(n_batch), rate * weight, (1 - rate) * weight)
    observed = pmf[int(n_alerts)]
    p_value = float(pmf[pmf <= observed * (1 + 1e-7)].sum())
    return int(n_alerts) / int(n_batch), min(p_value, 1.0)


def count_alerts(
    batch_alerts: np.ndarray | None, batch_scores: np.ndarray, threshold: float | None
) -> int:
    """The batch's alerts: the graph's `is_anomaly` when given, else `score > threshold`."""
    if batch_alerts is not None:
        alerts = np.asarray(batch_alerts).ravel()
        if alerts.dtype != bool or alerts.size != batch_scores.size:
            raise ValueError(
                f"batch_alerts must be {batch_scores.size} booleans (one per batch score), "
                f"got {alerts.size} of dtype {alerts.dtype}"
            )
        return int(alerts.sum())
    if threshold is None:
        raise ValueError("the alert-rate test needs the batch's alerts or the threshold")
    return int(np.count_nonzero(batch_scores > threshold))
