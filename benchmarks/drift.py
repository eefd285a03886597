"""Drift benchmark: false alarms on stationary batches and detection delay under drift.

Streams of batches are simulated on the normal rows of real tables (ADBench `*.npz` with `X`, `y`)
and on generated data, without training any deep model: the scorer is a fixed Mahalanobis
distance to the reference rows, computed in numpy, and the drift decision is
`normalcy.drift.detect_drift` with every family the monitor runs (features, scores, alert rate,
the CUSUM across batches, MMD unless `--no-mmd`) at one overall level `--alpha`.

Per dataset the normal rows are shuffled into a reference (the scorer's rows and the drift
reference), calibration rows (the reference scores; the threshold is their `--target-fpr`
quantile) and a pool. Batches are drawn from the pool without replacement, so they are disjoint
from each other and from the reference, as fresh production batches are (batches drawn again and
again from one finite pool share its sampling error, which inflates the CUSUM's false alarms). A
stream of stationary batches lasts at most `--stationary-batches / --references` batches or until
its pool is used up; then a new reference is drawn, so the false-alarm rate is an average over
references, as the level is. Drift scenarios, `--drift-streams` streams each (own reference, own
drifted features, a fresh CUSUM, batch 1 = the first drifted batch; a pool used up is reused):
- gradual: +0.1 sd per batch on 10% of the features (at least one), held at 0.5 sd from batch 5;
- abrupt: +0.5 sd on 10% of the features from batch 1;
- slow: +0.02 sd per batch, held at 0.5 sd from batch 25;
- scale: the batch's scores times `--score-scale`, the features unchanged.
`--drift-model offset` adds the offset (reference sd) to the drifted features; `tilt` reweights
the pool's real rows instead (see `tilt_weights`). The delay is the first batch flagged.

    python benchmarks/drift.py [--out FILE] [--data-dir DIR] [--datasets NAME,NAME]
        [--drift-model offset|tilt] [--stationary-batches 200] [--batch-rows 200]
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from normalcy.calibration import threshold_at_fpr
from normalcy.config import RecalibrateParams, ValidateParams
from normalcy.drift import DriftReport, detect_drift
from normalcy.drift_sequential import SequentialState
from normalcy.recalibration import refusals, shift_with_contamination
from normalcy.validation.suite import build_suite_spec, validate_batch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "tabular"
DRIFT_SCENARIOS = {  # name: (sd per batch, largest offset in sd)
    "gradual": (0.1, 0.5),
    "abrupt": (0.5, 0.5),
    "slow": (0.02, 0.5),
}
SCALE = "scale"


def feature_names(rows: np.ndarray) -> list[str]:
    return [f"f{j}" for j in range(rows.shape[1])]


DRIFTED_FEATURE_SHARE = 0.1
WITHIN = 5  # the goal: gradual drift flagged within 5 batches


@dataclass
class Stream:
    """One reference draw: scorer, reference rows and scores, threshold, and the rows batches are
    drawn from, each row at most once (see `draw`)."""

    reference: np.ndarray
    reference_scores: np.ndarray
    threshold: float
    pool: np.ndarray
    mean: np.ndarray
    precision: np.ndarray
    unused: np.ndarray

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the reference rows."""
        centred = rows - self.mean
        return np.einsum("ij,jk,ik->i", centred, self.precision, centred)

    def batches_left(self, rows: int) -> int:
        return int(self.unused.sum()) // rows

    def draw(
        self, rng: np.random.Generator, rows: int, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """`rows` pool rows never drawn before (chosen with probability ~ `weights`), so batches
        are disjoint from each other as well as from the reference: batches from one finite pool
        would share its sampling error, which fresh production batches do not. When the pool
        runs out, every row is available again."""
        if self.unused.sum() < rows:
            self.unused[:] = True
        candidates = np.flatnonzero(self.unused)
        p = None if weights is None else weights[candidates] / weights[candidates].sum()
        chosen = rng.choice(candidates, rows, replace=False, p=p)
        self.unused[chosen] = False
        return self.pool[chosen]


def make_stream(normal: np.ndarray, reference_rows: int, target_fpr: float, seed: int) -> Stream:
    """Shuffle the normal rows into reference, calibration and pool; fit the scorer on the
    reference and set the threshold at `target_fpr` on the calibration scores."""
    rows = np.random.default_rng(seed).permutation(len(normal))
    n_ref = min(reference_rows, len(normal) // 4)
    reference, calibration = normal[rows[:n_ref]], normal[rows[n_ref : 2 * n_ref]]
    covariance = np.atleast_2d(np.cov(reference, rowvar=False))
    ridge = 1e-6 * max(float(np.trace(covariance)) / len(covariance), 1e-12)
    precision = np.linalg.pinv(covariance + ridge * np.eye(len(covariance)))
    pool = normal[rows[2 * n_ref :]]
    unused = np.ones(len(pool), dtype=bool)
    stream = Stream(reference, np.zeros(0), 0.0, pool, reference.mean(0), precision, unused)
    stream.reference_scores = stream.score(calibration)
    stream.threshold = threshold_at_fpr(stream.reference_scores, target_fpr)
    return stream


def tilt_weights(stream: Stream, columns: np.ndarray, offset: float) -> np.ndarray:
    """Row weights `exp(lam * s)`, `s` the row's mean standardized value on `columns`, with `lam`
    set (bisection) so that the weighted pool is `offset` reference sd higher on them. Reweighting
    real rows shifts the features with their correlations and keeps every value on the data's
    own grid: adding an offset to integer features would put every value off the grid, which a
    KS test sees at once however small the offset."""
    sd = stream.reference.std(0)[columns]
    s = ((stream.pool[:, columns] - stream.reference.mean(0)[columns]) / sd).mean(1)
    target = s.mean() + offset

    def weighted_mean(lam: float) -> float:
        w = np.exp(lam * (s - s.max()))
        return float((w * s).sum() / w.sum())

    low, high = 0.0, 50.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if weighted_mean(middle) < target else (low, middle)
    return np.exp(high * (s - s.max())) + 1e-300


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson interval of a binomial proportion."""
    interval = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [float(interval.low), float(interval.high)]


def check(
    stream: Stream, batch: np.ndarray, scores: np.ndarray, state: SequentialState, args: Namespace
) -> DriftReport:
    """Every family the monitor runs, on one batch."""
    return detect_drift(
        stream.reference,
        batch,
        None,
        stream.reference_scores,
        scores,
        args.alpha,
        threshold=stream.threshold,
        target_alert_rate=args.target_fpr,
        calibrated_on=len(stream.reference_scores),
        sequential_state=state,
        mmd_rows=None if args.no_mmd else args.mmd_rows,
    )


def stationary(normal: np.ndarray, args: Namespace, rng: np.random.Generator, name: str) -> dict:
    """False alarms over `--stationary-batches` batches: streams of disjoint batches, each on
    its own reference draw, at most `--stationary-batches / --references` batches a stream."""
    alarms, by_family, n, draw = 0, {}, 0, 0
    per_stream = -(-args.stationary_batches // args.references)
    while n < args.stationary_batches:
        stream = make_stream(normal, args.reference_rows, args.target_fpr, args.seed + draw)
        draw += 1
        state = SequentialState(str(draw))
        length = min(per_stream, stream.batches_left(args.batch_rows), args.stationary_batches - n)
        for _ in range(length):
            batch = stream.draw(rng, args.batch_rows)
            report = check(stream, batch, stream.score(batch), state, args)
            state = report.sequential_state
            alarms += report.drifted
            for family in report.fired():
                by_family[family] = by_family.get(family, 0) + 1
            n += 1
            if n % 50 == 0:
                print(
                    f"  {name}: stationary batch {n}/{args.stationary_batches}, {alarms} alarms",
                    file=sys.stderr,
                )
    return {
        "n_stationary_batches": n,
        "reference_draws": draw,
        "false_alarms": alarms,
        "false_alarm_rate": alarms / n,
        "false_alarm_interval": wilson(alarms, n),
        "false_alarms_by_family": by_family,
    }


def first_alarm(
    stream: Stream, scenario: str, columns: np.ndarray, args: Namespace, rng: np.random.Generator
) -> tuple[int | None, list[str]]:
    """(first flagged batch, the families that flagged it) of one drifted stream."""
    state = SequentialState("drift")
    stream.unused[:] = True
    for t in range(1, args.max_batches + 1):
        if scenario == SCALE:
            batch = stream.draw(rng, args.batch_rows)
            scores = stream.score(batch) * args.score_scale
        else:
            step, largest = DRIFT_SCENARIOS[scenario]
            offset = min(step * t, largest)
            if args.drift_model == "tilt":
                batch = stream.draw(rng, args.batch_rows, tilt_weights(stream, columns, offset))
            else:
                batch = stream.draw(rng, args.batch_rows).copy()
                batch[:, columns] += offset * stream.reference.std(0)[columns]
            scores = stream.score(batch)
        report = check(stream, batch, scores, state, args)
        state = report.sequential_state
        if report.drifted:
            return t, report.fired()
    return None, []


def drifted(normal: np.ndarray, args: Namespace, rng: np.random.Generator, name: str) -> dict:
    """Detection delay of each scenario over `--drift-streams` streams, each on its own
    reference draw and its own drifted features."""
    streams = [
        make_stream(normal, args.reference_rows, args.target_fpr, args.seed + 1000 + i)
        for i in range(args.drift_streams)
    ]
    n_columns = max(1, round(DRIFTED_FEATURE_SHARE * normal.shape[1]))
    result = {}
    for scenario in [*DRIFT_SCENARIOS, SCALE]:
        delays, families = [], {}
        for stream in streams:
            varying = np.flatnonzero(stream.reference.std(0) > 0)
            columns = rng.choice(varying, min(n_columns, len(varying)), replace=False)
            delay, fired = first_alarm(stream, scenario, columns, args, rng)
            delays.append(delay)
            for family in fired:
                families[family] = families.get(family, 0) + 1
        found = [d for d in delays if d is not None]
        median = float(np.median([d if d is not None else np.inf for d in delays]))
        result[scenario] = {
            "median_delay": median if np.isfinite(median) else None,
            "detected": len(found) / len(delays),
            f"detected_within_{WITHIN}": sum(d <= WITHIN for d in found) / len(delays),
            "delays": delays,
            "families_at_detection": families,
        }
        print(
            f"  {name}: {scenario} median delay {result[scenario]['median_delay']}", file=sys.stderr
        )
    return result


def recalibration_trials(
    normal: np.ndarray, args: Namespace, rng: np.random.Generator, name: str
) -> dict:
    """The recalibration guard rails and estimate, with the monitor's own functions
    (`normalcy.recalibration`), on this table:
    - scale: every score times `--recal-scale`; the alert rate on held-out normal rows at the
      old threshold before and after the change, then at the threshold recalibrated on one
      clean batch (the champion's own rate before the change is what recalibration can
      restore: its threshold came from a finite calibration set);
    - invalid batches, which must be refused: values far out of the training range (the
      reference's Great Expectations suite fails) and half anomalies (+5 sd on every feature)."""
    stream = make_stream(normal, args.reference_rows, args.target_fpr, args.seed)
    rows = min(args.recal_rows, len(stream.pool) // 4)  # four disjoint batches from the pool
    params = RecalibrateParams(min_rows=min(200, rows))
    names = feature_names(normal)
    spec = build_suite_spec(stream.reference, names, ValidateParams())

    def guard_problems(batch: np.ndarray, scores: np.ndarray) -> tuple[list[str], float]:
        shift, threshold, contamination = shift_with_contamination(
            stream.reference_scores, scores, stream.threshold, args.target_fpr
        )
        report = validate_batch(pd.DataFrame(batch, columns=names), spec, "batch")
        return refusals(len(batch), report, shift, contamination, params), threshold

    batch, held_out = stream.draw(rng, rows), stream.draw(rng, rows)
    scale = args.recal_scale
    problems, threshold = guard_problems(batch, scale * stream.score(batch))
    unscaled = stream.score(held_out)
    held_scores = scale * unscaled
    sd = stream.reference.std(axis=0) + 1e-12
    far = stream.draw(rng, rows) + 50 * sd
    half = stream.draw(rng, rows)
    half[: len(half) // 2] += 5 * sd
    invalid = {
        "out_of_range": guard_problems(far, stream.score(far))[0],
        "half_anomalies": guard_problems(half, stream.score(half))[0],
    }
    print(f"  {name}: recalibration trials done", file=sys.stderr)
    return {
        "rows": rows,
        "alert_rate_before_change": float(np.mean(unscaled > stream.threshold)),
        "alert_rate_before": float(np.mean(held_scores > stream.threshold)),
        "alert_rate_after": float(np.mean(held_scores > threshold)),
        "clean_batch_refused": problems,
        "invalid_refused": {kind: bool(reasons) for kind, reasons in invalid.items()},
        "invalid_reasons": invalid,
    }


def pooled_recalibration(recals: list[dict], args: Namespace) -> dict:
    """Alert rates over every table's held-out rows together: one table's few hundred rows
    cannot resolve +-30% of a 1% rate (its binomial error alone is about that), the pool can."""
    rows = sum(r["rows"] for r in recals)

    def alerts(key: str) -> int:
        return sum(round(r[key] * r["rows"]) for r in recals)

    unchanged, before, after = (
        alerts(k) for k in ("alert_rate_before_change", "alert_rate_before", "alert_rate_after")
    )
    return {
        "alert_rate_before_change": unchanged / rows,  # the champion's own rate, unscaled
        "alert_rate_before": before / rows,
        "alert_rate_after": after / rows,
        "alert_rate_after_interval": wilson(after, rows),
        "held_out_rows": rows,
        "target": args.target_fpr,
        "score_scale": args.recal_scale,
    }


def recalibration_by_seed(datasets: dict[str, np.ndarray], args: Namespace) -> list[dict]:
    """`pooled_recalibration` again with seeds 1..`--recalibration-seeds` (fresh reference and
    batch draws): one draw's pooled rate moves by a few tenths of a percent, so whether
    recalibration is biased shows only across draws (compare `alert_rate_before_change`)."""
    pooled = []
    for seed in range(1, args.recalibration_seeds + 1):
        seeded = Namespace(**{**vars(args), "seed": args.seed + seed})
        trials = [
            recalibration_trials(normal, seeded, np.random.default_rng(seeded.seed), name)
            for name, normal in datasets.items()
        ]
        pooled.append({"seed": seeded.seed, **pooled_recalibration(trials, seeded)})
    return pooled


def generated_normals(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Correlated Gaussian rows (bell-shaped scores) and their exponential (skewed features)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(20, 20)) / np.sqrt(20)
    gaussian = rng.normal(size=(rows, 20)) @ mixing
    return {"generated_gaussian": gaussian, "generated_skewed": np.exp(gaussian / 2)}


def real_normals(data_dir: Path, names: list[str] | None, min_rows: int) -> dict[str, np.ndarray]:
    if not data_dir.is_dir():
        print(f"{data_dir} not found: real tables skipped (generated data only)", file=sys.stderr)
        return {}
    tables = {}
    for path in sorted(data_dir.glob("*.npz")):
        if names and path.stem not in names:
            continue
        with np.load(path) as data:
            normal = np.asarray(data["X"], dtype=np.float64)[np.asarray(data["y"]) == 0]
        if len(normal) < min_rows:
            print(f"{path.stem}: {len(normal)} normal rows < {min_rows}, skipped", file=sys.stderr)
            continue
        tables[path.stem] = normal
    return tables


def summary_table(results: dict) -> str:
    header = "| dataset | d | stationary batches | false alarms | rate [95% CI] |"
    header += "".join(f" {s} delay (within {WITHIN}) |" for s in [*DRIFT_SCENARIOS, SCALE])
    lines = [header, "|" + "---|" * (5 + len(DRIFT_SCENARIOS) + 1)]
    for name, r in results.items():
        low, high = r["false_alarm_interval"]
        cells = [name, str(r["d"]), str(r["n_stationary_batches"]), str(r["false_alarms"])]
        cells.append(f"{r['false_alarm_rate']:.4f} [{low:.4f}, {high:.4f}]")
        for s in [*DRIFT_SCENARIOS, SCALE]:
            delay = r["detection_delay"][s]
            cells.append(f"{delay['median_delay']} ({delay[f'detected_within_{WITHIN}']:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--datasets", help="comma-separated table names (default: every table)")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--stationary-batches", type=int, default=200)
    parser.add_argument("--drift-streams", type=int, default=10)
    parser.add_argument("--max-batches", type=int, default=40)
    parser.add_argument("--batch-rows", type=int, default=200)
    parser.add_argument("--reference-rows", type=int, default=1000)
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--score-scale", type=float, default=1.2)
    parser.add_argument("--mmd-rows", type=int, default=300, help="as monitor.mmd_max_rows")
    parser.add_argument("--no-mmd", action="store_true", help="leave the MMD family out")
    parser.add_argument(
        "--drift-model",
        choices=["offset", "tilt"],
        default="offset",
        help="offset: add the sd offset to the drifted features; tilt: reweight real rows",
    )
    parser.add_argument("--recal-scale", type=float, default=1.5, help="recalibration trial")
    parser.add_argument("--recal-rows", type=int, default=1000, help="rows per recalibration batch")
    parser.add_argument("--recalibration-seeds", type=int, default=4, help="more seeds of it")
    parser.add_argument("--generated-rows", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.datasets.split(",") if args.datasets else None
    min_rows = 4 * args.batch_rows
    datasets = real_normals(args.data_dir, names, min_rows)
    if names and set(names) - set(datasets):
        parser.error(
            f"{sorted(set(names) - set(datasets))} not found or too small in {args.data_dir}"
        )
    if not names:
        datasets.update(generated_normals(args.generated_rows, args.seed))
    results = {}
    for name, normal in datasets.items():
        print(f"{name}: {len(normal)} normal rows x {normal.shape[1]} features", file=sys.stderr)
        rng = np.random.default_rng(args.seed)
        results[name] = {"d": normal.shape[1], **stationary(normal, args, rng, name)}
        results[name]["detection_delay"] = drifted(normal, args, rng, name)
        results[name]["recalibration"] = recalibration_trials(normal, args, rng, name)
    n = sum(r["n_stationary_batches"] for r in results.values())
    alarms = sum(r["false_alarms"] for r in results.values())
    delays = {
        s: [d for r in results.values() for d in r["detection_delay"][s]["delays"]]
        for s in [*DRIFT_SCENARIOS, SCALE]
    }
    medians = {
        s: float(np.median([x if x is not None else np.inf for x in v])) for s, v in delays.items()
    }
    recals = [r["recalibration"] for r in results.values()]
    payload = {
        "false_alarm_rate": alarms / n,
        "false_alarm_interval": wilson(alarms, n),
        "n_stationary_batches": n,
        "alpha": args.alpha,
        "detection_delay": {s: (m if np.isfinite(m) else None) for s, m in medians.items()},
        f"detected_within_{WITHIN}": {
            s: sum(x is not None and x <= WITHIN for x in v) / len(v) for s, v in delays.items()
        },
        "recalibration": pooled_recalibration(recals, args),
        "recalibration_by_seed": recalibration_by_seed(datasets, args),
        "invalid_batch_promoted": not all(
            refused for r in recals for refused in r["invalid_refused"].values()
        ),
        "datasets": results,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    print(summary_table(results))
    low, high = payload["false_alarm_interval"]
    print(
        f"overall: {alarms}/{n} stationary batches flagged = {alarms / n:.4f} "
        f"[{low:.4f}, {high:.4f}] at alpha {args.alpha}; median delay "
        + ", ".join(f"{s} {m}" for s, m in payload["detection_delay"].items())
    )
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
