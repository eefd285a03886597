"""A sequential test across batches: a one-sided CUSUM on each batch's standardized score shift.

Every single-batch test asks "is this batch different?" at a small level, so a shift too small to
show in one batch goes unseen batch after batch. A CUSUM adds up the evidence: with `z_t` the
batch's standardized rank shift of its scores against the reference (about N(0, 1) when nothing
changed, positive when scores rise), `S_t = max(0, S_{t-1} + z_t - k)` stays near zero while the
scores are stationary and climbs by about `shift - k` per batch under a persistent shift `shift`;
it alarms when `S_t > h`, then restarts from zero. One-sided (upwards) because rising scores are
what turns into alerts; falling scores show in the two-sided alert-rate and score KS tests.

`h` is set by simulation so that the in-control probability of an alarm in a batch is the
family's share of the overall level. The simulation keeps what a plain formula misses: every
batch is compared with the same finite reference, so the `z_t` share a common term, with
correlation `n_batch / (n_batch + n_reference)` between two batches. The rate holds on average
over references; with one unlucky reference the CUSUM alarms more often, and a reference of few
scores against large batches needs a high `h` (less power), so keep the calibration set large.
With independent `z_t` (correlation 0) the simulation agrees with Siegmund's approximation of the
in-control average run length, `ARL0 = (exp(2 k b) - 2 k b - 1) / (2 k^2)` with `b = h + 1.166`,
alarm rate `1 / ARL0`.

The state (running sum, batch count, alarms) lives in a small JSON file between monitor runs,
keyed by the champion version: a new champion (retrained or recalibrated) starts from zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import stats

from normalcy.checks import as_scores, check_rate
from normalcy.jsonio import write_json

# Batches per simulated stream and the fewest alarms the simulation should see at the level.
CALIBRATION_HORIZON = 500
MIN_SIMULATED_ALARMS = 4000
MAX_SIMULATED_STREAMS = 10000


@dataclass
class SequentialState:
    """The CUSUM between monitor runs of one champion version."""

    champion_version: str
    cusum: float = 0.0
    n_batches: int = 0
    n_alarms: int = 0


def batch_correlation(n_batch: int, n_reference: int) -> float:
    """Correlation of two batches' standardized shifts against one reference of `n_reference`
    scores: the reference's own sampling error is a term they share."""
    if n_batch < 1 or n_reference < 1:
        raise ValueError(
            f"need at least one batch and one reference score, got {n_batch} and {n_reference}"
        )
    return n_batch / (n_batch + n_reference)


def cusum_alarm_rate(
    threshold: float, allowance: float, correlated: np.ndarray, horizon: int
) -> float:
    """Fraction of simulated batches with an alarm: `correlated` is `[streams, horizon]` of
    in-control statistics; the sum restarts at zero after each alarm, as in the monitor."""
    running = np.zeros(correlated.shape[0])
    alarms = 0
    for t in range(horizon):
        running = np.maximum(0.0, running + correlated[:, t] - allowance)
        fired = running > threshold
        alarms += int(fired.sum())
        running[fired] = 0.0
    return alarms / correlated.size


@lru_cache(maxsize=64)
def cusum_threshold(level: float, correlation: float, allowance: float, seed: int = 0) -> float:
    """`h` with an in-control alarm probability of about `level` per batch, by simulation
    (bisection on `h`, the same random numbers throughout, so the rate only falls as `h` rises).

    The batches' statistics are `sqrt(c) * shared + sqrt(1 - c) * own`, both N(0, 1), with `c`
    the `correlation`; the shared term is drawn once per simulated stream (one reference)."""
    level = check_rate(level, "level")
    if not (0.0 <= correlation < 1.0):
        raise ValueError(f"correlation must be in [0, 1), got {correlation!r}")
    if allowance <= 0:
        raise ValueError(f"allowance must be positive, got {allowance!r}")
    horizon = CALIBRATION_HORIZON
    streams = min(
        MAX_SIMULATED_STREAMS, max(1000, math.ceil(MIN_SIMULATED_ALARMS / (level * horizon)))
    )
    rng = np.random.default_rng(seed)
    correlated = math.sqrt(correlation) * rng.standard_normal((streams, 1)) + math.sqrt(
        1.0 - correlation
    ) * rng.standard_normal((streams, horizon))
    low, high = 0.0, 2.0
    while cusum_alarm_rate(high, allowance, correlated, horizon) > level:
        low, high = high, 2 * high
    for _ in range(30):
        middle = (low + high) / 2
        if cusum_alarm_rate(middle, allowance, correlated, horizon) > level:
            low = middle
        else:
            high = middle
    return high


def siegmund_alarm_rate(threshold: float, allowance: float) -> float:
    """In-control alarm rate per batch, `1 / ARL0`, of a CUSUM on independent N(0, 1) batches
    (Siegmund's approximation): the check on the simulation for correlation 0."""
    b = threshold + 1.166
    arl0 = (math.exp(2 * allowance * b) - 2 * allowance * b - 1) / (2 * allowance**2)
    return 1.0 / arl0


def cusum_step(
    state: SequentialState, statistic: float, allowance: float, threshold: float
) -> tuple[SequentialState, float, bool]:
    """(next state, the sum before any restart, alarm): one batch's `statistic` added to the sum."""
    if not math.isfinite(statistic):
        raise ValueError(f"the per-batch statistic must be finite, got {statistic!r}")
    running = max(0.0, state.cusum + statistic - allowance)
    alarm = running > threshold
    after = SequentialState(
        state.champion_version,
        0.0 if alarm else running,
        state.n_batches + 1,
        state.n_alarms + int(alarm),
    )
    return after, running, alarm


def load_sequential_state(path: str | Path, champion_version: str) -> SequentialState:
    """The saved state of `champion_version`; a fresh one when there is none or it belongs to
    another version (a new champion starts from zero)."""
    path = Path(path)
    if not path.exists():
        return SequentialState(str(champion_version))
    try:
        saved = SequentialState(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a sequential drift state ({exc}); delete it to start the CUSUM afresh"
        ) from None
    if saved.champion_version != str(champion_version):
        return SequentialState(str(champion_version))
    return saved


def save_sequential_state(state: SequentialState, path: str | Path) -> Path:
    """Write the state atomically for the next monitor run."""
    return write_json(asdict(state), path)


def rank_shift(reference_scores: np.ndarray, batch_scores: np.ndarray) -> float:
    """The batch's scores against the reference as a standardized Mann-Whitney statistic: about
    N(0, 1) when both come from one distribution, positive when the batch's scores are higher.

    Ranks, not means: anomaly scores are skewed and heavy-tailed, and one extreme row must not
    look like a shift of the whole batch. Ties get mid-ranks and the tie-corrected variance; all
    scores tied is no evidence (0)."""
    ref = as_scores(reference_scores, "reference_scores")
    new = as_scores(batch_scores, "batch_scores")
    n_ref, n_new = ref.size, new.size
    n = n_ref + n_new
    pooled = np.concatenate([new, ref])
    ranks = stats.rankdata(pooled)
    u = ranks[:n_new].sum() - n_new * (n_new + 1) / 2
    _, tie_counts = np.unique(pooled, return_counts=True)
    ties = float(np.sum(tie_counts.astype(np.float64) ** 3 - tie_counts))
    variance = n_new * n_ref / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return 0.0
    return float((u - n_new * n_ref / 2.0) / math.sqrt(variance))
