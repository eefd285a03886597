"""Decision thresholds from scores of normal data, at a target false-positive rate.

A detector's scores only become decisions through a threshold; `is_anomaly = score > threshold`.
The threshold is set on held-out normal scores so that the false-positive rate on them is at most
`target_fpr`. When the score scale moves later (an unlabelled production batch that may hold
anomalies), `fit_score_shift` maps the calibration scores onto the batch by the bulk of both,
so the threshold follows the scale and not the batch's contamination.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from normalcy.checks import as_scores, check_rate

# 1 / Phi^-1(3/4): makes the MAD a consistent estimator of the standard deviation for a normal.
MAD_TO_SIGMA = 1.4826
# sqrt(pi / 2): the same for the mean absolute deviation around the median (fallback when MAD = 0).
MEANAD_TO_SIGMA = 1.2533


def threshold_at_fpr(normal_scores: np.ndarray, target_fpr: float) -> float:
    """Smallest conservative threshold with at most `target_fpr` of `normal_scores` above it.

    Uses the `(1 - target_fpr)` empirical quantile with `method="higher"` (an observed score, never
    an interpolation below one), so the realised FPR on these scores is <= `target_fpr`; ties only
    lower it. With fewer than `ceil(1 / target_fpr)` scores not even one false positive fits in the
    budget, so the threshold is the maximum score and a warning says the target is unresolvable.
    """
    scores = as_scores(normal_scores, "normal_scores")
    fpr = check_rate(target_fpr, "target_fpr")
    n = scores.size
    # The small epsilon keeps e.g. 1 / 0.1 = 10.000000000000002 from rounding up to 11.
    n_needed = math.ceil(1.0 / fpr - 1e-9)
    if n < n_needed:
        warnings.warn(
            f"target FPR {fpr:g} cannot be resolved with {n} scores (need at least {n_needed}); "
            "using the maximum score as the threshold, realised FPR on these scores is 0",
            stacklevel=2,
        )
        return float(scores.max())
    return float(np.quantile(scores, 1.0 - fpr, method="higher"))


def robust_cutoff(scores: np.ndarray, mad_threshold: float) -> float:
    """median + mad_threshold * sigma_hat: above it a score looks anomalous.

    `sigma_hat = 1.4826 * MAD` is a scale estimate that a minority of anomalies cannot inflate
    (breakdown 50%), unlike the standard deviation. Only the upper tail matters: anomalies score
    high, and low scores are not evidence of anything. When MAD is 0 (more than half of the scores
    tied, e.g. a saturated detector), `sigma_hat` falls back to `1.2533 * mean(|x - median|)`, the
    normal-consistent mean absolute deviation, which is positive whenever the scores are not all
    equal; if it too is 0 every score is equal and the cutoff is that score. The median is always
    at or below the cutoff, so at least half of the scores are kept.
    """
    arr = as_scores(scores)
    if isinstance(mad_threshold, bool) or not np.isfinite(mad_threshold) or mad_threshold <= 0:
        raise ValueError(f"mad_threshold must be a positive finite number, got {mad_threshold!r}")
    median = float(np.median(arr))
    abs_dev = np.abs(arr - median)
    sigma = MAD_TO_SIGMA * float(np.median(abs_dev))
    if sigma == 0.0:
        sigma = MEANAD_TO_SIGMA * float(np.mean(abs_dev))
    return median + float(mad_threshold) * sigma


@dataclass(frozen=True)
class ScoreShift:
    """batch score ~ offset + scale x calibration score: how the score scale moved."""

    offset: float
    scale: float
    median_move_iqrs: float  # how far the median moved, in calibration IQRs

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return self.offset + self.scale * np.asarray(scores, dtype=np.float64)


def fit_score_shift(
    calibration_scores: np.ndarray, batch_scores: np.ndarray, contamination: float = 0.0
) -> ScoreShift:
    """The location-scale map that puts the calibration scores' quartiles onto the batch's.

    A recalibration exists for a moved score scale with an unchanged shape; then the threshold
    maps like every other quantile, whatever the shape (skewed scores included), with no
    trimming rule to tune. Anomalies sit in the batch's upper tail, so with a share
    `contamination` of them the normal rows' quantile p is the batch's quantile p x (1 -
    contamination); uncorrected, they widen the spread and raise the threshold (fewer alerts,
    never more)."""
    if not 0 <= contamination < 1:
        raise ValueError(f"contamination must be in [0, 1), got {contamination!r}")
    reference = as_scores(calibration_scores, "calibration_scores")
    batch = as_scores(batch_scores, "batch_scores")
    levels = np.array([0.25, 0.5, 0.75])
    ref_q1, ref_median, ref_q3 = np.quantile(reference, levels)
    q1, median, q3 = np.quantile(batch, levels * (1 - contamination))
    if ref_q3 <= ref_q1:
        raise ValueError(
            "the calibration scores have no spread (equal quartiles); a score scale cannot be "
            "matched to them"
        )
    scale = float((q3 - q1) / (ref_q3 - ref_q1))
    offset = float(median - scale * ref_median)
    return ScoreShift(offset, scale, float(abs(median - ref_median) / (ref_q3 - ref_q1)))


def realised_fpr(normal_scores: np.ndarray, threshold: float) -> float:
    """Fraction of `normal_scores` strictly above `threshold`, the rule `is_anomaly` uses."""
    scores = as_scores(normal_scores, "normal_scores")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return float(np.mean(scores > float(threshold)))


@dataclass
class OperatingPoint:
    """A threshold, the false-positive rate it was set for, and the normal scores it came from
    (which also define a graph's p-values): what an exported graph and its drift reference hold."""

    threshold: float
    target_fpr: float
    calibration_scores: np.ndarray
