"""Quality benchmark on ADBench-style tables: normalcy's pipeline against IForest and PyOD.

ADBench's unsupervised protocol: per seed, a stratified 70/30 split; everything trains on the
*contaminated* 70% and no label is used anywhere (cleaning, early stopping and model selection are
label-free); AUROC/AUPRC are measured once on the 30%.

The pipeline path is the one `normalcy train` runs: the 70% is split 80/20 into fit/validation
rows, the fit rows are cleaned (`clean.*`), every candidate (`train.*`) is fitted, and the winner
is chosen by the label-free validation criterion. `oracle` is the best candidate in hindsight
(per seed, by test AUROC) and `selection_regret` is oracle minus selected. IForest (and PyOD's
AutoEncoder/DeepSVDD when pyod is installed) train on the same 70% and are scored on the same 30%.

    python benchmarks/quality_tabular.py --data-dir ../shared/data/tabular
        [--datasets NAME,NAME] [--seeds 0,1,2] [--detectors NAME,NAME] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.model_selection import train_test_split

from normalcy.config import CleanParams, TrainParams, load_params
from normalcy.data.splits import Split
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.pipeline.clean import cleaning_detector
from normalcy.pipeline.train import fit_candidates
from normalcy.validation.cleaning import clean_training_split

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHORS = REPO.parent / "shared" / "anchors" / "adbench_unsupervised_tables_D4_D5.csv"
SELECTED, ORACLE, IFOREST = "selected", "oracle", "iforest"
PYOD_AE, PYOD_SVDD = "pyod_AutoEncoder", "pyod_DeepSVDD"
VAL_FRACTION = 0.2
MAX_TRAIN_ROWS = 10_000


@dataclass
class Scores:
    """Per-seed figures of one column of the table."""

    auroc: list[float] = field(default_factory=list)
    auprc: list[float] = field(default_factory=list)
    fit_seconds: list[float] = field(default_factory=list)
    selection_metric: list[float] = field(default_factory=list)  # label-free, validation only
    note: str = ""

    def add(self, labels: np.ndarray, scores: np.ndarray, seconds: float) -> None:
        metrics = ranking_metrics(labels, scores)
        self.auroc.append(metrics["auroc"])
        self.auprc.append(metrics["auprc"])
        self.fit_seconds.append(seconds)

    def to_dict(self) -> dict:
        out = {"auroc": self.auroc, "auprc": self.auprc, "fit_seconds": self.fit_seconds}
        if self.selection_metric:
            out["selection_metric"] = self.selection_metric
        return {**out, "note": self.note} if self.note else out


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """X float `[n, d]` and y 0/1 `[n]`, or a ValueError naming the file and the problem."""
    try:
        with np.load(path, allow_pickle=False) as data:
            X, y = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"]).astype(int)
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: expected an .npz with arrays X and y ({exc})") from None
    if X.ndim != 2 or y.shape != (len(X),) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{path}: expected X [n, d] and 0/1 y [n]; got {X.shape}, {y.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{path}: X contains NaN or inf")
    return X, y


def adbench_name(dataset: str) -> str:
    """'2_annthyroid' -> 'annthyroid'; 'MVTec-AD_bottle_resnet18' -> 'MVTec-AD'."""
    if dataset.startswith("MVTec-AD"):
        return "MVTec-AD"
    return re.sub(r"^\d+_", "", dataset)


def adbench_anchors(path: Path, algorithm: str = "IForest") -> dict[str, float]:
    """ADBench's published unsupervised AUROC (percent) of `algorithm`, by lower-case dataset."""
    if not path.is_file():
        return {}
    with path.open() as handle:
        return {
            row["dataset"].lower(): float(row["value_percent"])
            for row in csv.DictReader(handle)
            if row["metric"] == "AUCROC" and row["algorithm"] == algorithm
        }


@dataclass(frozen=True)
class LabelledSplit:
    """One seed's rows as this benchmark's pipeline path uses them, with the labels kept for the
    benchmarks' own figures. The pipeline gets only `fit` and `val`, Splits without labels;
    every benchmark that measures something on those rows (trimming, cleaning) takes them from
    here, so they all see the same rows."""

    train_X: np.ndarray  # the contaminated 70% (capped): the reference methods train on it
    fit: Split
    fit_y: np.ndarray
    val: Split
    val_y: np.ndarray
    test_X: np.ndarray
    test_y: np.ndarray


def labelled_split(
    X: np.ndarray, y: np.ndarray, seed: int, max_train_rows: int = MAX_TRAIN_ROWS
) -> LabelledSplit:
    """Stratified 70/30; the 70% keeps its contamination and is randomly subsampled to
    `max_train_rows` when larger, then split (1 - VAL_FRACTION) / VAL_FRACTION into fit and
    validation rows, as `normalcy train` splits its training data."""
    train_X, test_X, train_y, test_y = train_test_split(
        X, y, test_size=0.3, stratify=y, random_state=seed
    )
    if len(train_X) > max_train_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(train_X), max_train_rows, False))
        train_X, train_y = train_X[keep], train_y[keep]
    train_X = train_X.astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(train_X))
    n_val = max(int(round(VAL_FRACTION * len(train_X))), 2)
    fit_rows, val_rows = np.sort(order[n_val:]), np.sort(order[:n_val])
    return LabelledSplit(
        train_X=train_X,
        fit=Split(train_X[fit_rows], None, fit_rows),
        fit_y=train_y[fit_rows],
        val=Split(train_X[val_rows], None, val_rows),
        val_y=train_y[val_rows],
        test_X=test_X.astype(np.float32),
        test_y=test_y,
    )


def cleaned(fit: Split, clean: CleanParams) -> Split:
    """The fit rows after the pipeline's cleaning (unchanged when it is off)."""
    if not clean.enabled:
        return fit
    return clean_training_split(fit, cleaning_detector(clean), clean)[0]


def run_pipeline(
    fit: Split, val: Split, clean: CleanParams, train: TrainParams
) -> tuple[dict, list, str]:
    """Cleaning, candidates and label-free selection exactly as the train flow does them.

    Returns (fitted detectors by name, candidate results, winner name). No label is passed."""
    detectors, results, winner = fit_candidates(cleaned(fit, clean), val, train)
    return detectors, results, winner.name


def reference_methods(n_features: int, seed: int) -> dict[str, Callable[[], object]]:
    """Baselines in the same harness: sklearn IsolationForest, and PyOD when installed."""
    methods: dict[str, Callable[[], object]] = {
        IFOREST: lambda: IsolationForest(random_state=seed),
    }
    try:
        from pyod.models.auto_encoder import AutoEncoder
        from pyod.models.deep_svdd import DeepSVDD
    except ImportError:
        return methods
    methods[PYOD_AE] = lambda: AutoEncoder(random_state=seed, verbose=0)
    methods[PYOD_SVDD] = lambda: DeepSVDD(n_features=n_features, random_state=seed, verbose=0)
    return methods


def reference_scores(model: object, test_X: np.ndarray) -> np.ndarray:
    """Higher = more anomalous for both sklearn (score_samples is lower for outliers) and PyOD."""
    if isinstance(model, IsolationForest):
        return -model.score_samples(test_X)
    return model.decision_function(test_X)


def candidate_column(name: str) -> str:
    """A candidate's column; `iforest` as a pipeline candidate is kept apart from the reference
    IsolationForest, which trains on the whole 70% without cleaning."""
    return f"{name}_candidate" if name in (IFOREST, PYOD_AE, PYOD_SVDD) else name


def benchmark_dataset(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    seeds: list[int],
    clean: CleanParams,
    train: TrainParams,
    max_train_rows: int,
    fit_budget: float,
    progress: Callable[[str], None],
) -> dict[str, Scores]:
    """Every column of one table row, over the seeds."""
    columns: dict[str, Scores] = {}

    def column(key: str) -> Scores:
        return columns.setdefault(key, Scores())

    too_slow: dict[str, str] = {}
    for seed in seeds:
        split = labelled_split(X, y, seed, max_train_rows)
        train_X, test_X, test_y = split.train_X, split.test_X, split.test_y
        seeded = train.model_copy(update={"seed": seed})
        started = time.perf_counter()
        detectors, results, winner = run_pipeline(split.fit, split.val, clean, seeded)
        pipeline_seconds = time.perf_counter() - started
        test_auroc = {}
        for result in results:
            key = candidate_column(result.name)
            column(key).add(test_y, detectors[result.name].score(test_X), result.fit_seconds)
            column(key).selection_metric.append(result.metric)
            test_auroc[result.name] = column(key).auroc[-1]
        column(SELECTED).auroc.append(column(candidate_column(winner)).auroc[-1])
        column(SELECTED).auprc.append(column(candidate_column(winner)).auprc[-1])
        column(SELECTED).fit_seconds.append(pipeline_seconds)
        column(SELECTED).note = ",".join(filter(None, [column(SELECTED).note, winner]))
        best = max((r.name for r in results if r.exportable), key=lambda n: test_auroc[n])
        column(ORACLE).auroc.append(test_auroc[best])
        column(ORACLE).auprc.append(column(candidate_column(best)).auprc[-1])
        column(ORACLE).fit_seconds.append(0.0)
        line = f"{name} seed {seed}: selected {winner} {test_auroc[winner]:.3f}"
        for key, make in reference_methods(X.shape[1], seed).items():
            if key in too_slow:
                continue
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = make()
                model.fit(train_X)
            seconds = time.perf_counter() - started
            column(key).add(test_y, reference_scores(model, test_X), seconds)
            line += f", {key} {column(key).auroc[-1]:.3f}"
            if seconds > fit_budget:
                too_slow[key] = f"too slow: {seconds:.0f} s > budget {fit_budget:.0f} s"
                column(key).note = too_slow[key] + f" on {len(train_X)} rows; later seeds skipped"
                progress(f"{name}: {key} {column(key).note}")
        progress(line + f" ({pipeline_seconds:.1f} s pipeline)")
    return columns


def mean_or_nan(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def markdown_table(
    results: dict[str, dict[str, Scores]], columns: list[str], anchors: dict[str, float]
) -> str:
    """One row per dataset, mean AUROC x 100 over seeds; a final row of means."""
    header = ["dataset", *columns, "adbench_iforest", "winners"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    column_means: dict[str, list[float]] = {c: [] for c in [*columns, "adbench_iforest"]}
    for dataset, row in results.items():
        cells = [dataset]
        for c in columns:
            value = mean_or_nan(row[c].auroc) if c in row else float("nan")
            column_means[c].append(value)
            cells.append("-" if not np.isfinite(value) else f"{100 * value:.1f}")
            if c in row and row[c].note.startswith("too slow"):
                cells[-1] += " (slow)"
        anchor = anchors.get(adbench_name(dataset).lower(), float("nan"))
        column_means["adbench_iforest"].append(anchor / 100)
        cells.append("-" if not np.isfinite(anchor) else f"{anchor:.1f}")
        cells.append(row[SELECTED].note if SELECTED in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    means = ["**mean**"]
    for c in [*columns, "adbench_iforest"]:
        value = mean_or_nan(column_means[c])
        means.append("-" if not np.isfinite(value) else f"**{100 * value:.1f}**")
    lines.append("| " + " | ".join(means) + " | |")
    return "\n".join(lines)


def fit_seconds_line(results: dict[str, dict[str, Scores]], columns: list[str]) -> str:
    """Mean fit seconds per column (the pipeline's total for `selected`)."""
    parts = []
    for c in columns:
        seconds = [t for row in results.values() if c in row for t in row[c].fit_seconds]
        if c != ORACLE and seconds:
            parts.append(f"{c} {np.mean(seconds):.1f}")
    return "mean fit seconds per dataset and seed: " + ", ".join(parts)


def summarize(results: dict[str, dict[str, Scores]]) -> dict[str, float]:
    """Means over datasets of the per-dataset mean AUROC; regret = oracle - selected."""

    def overall(key: str) -> float:
        return mean_or_nan([mean_or_nan(row[key].auroc) for row in results.values() if key in row])

    selected, oracle = overall(SELECTED), overall(ORACLE)
    return {
        "selected_mean_auroc": selected,
        "iforest_mean_auroc": overall(IFOREST),
        "oracle_mean_auroc": oracle,
        "selection_regret": oracle - selected,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="folder of *.npz (X, y)")
    parser.add_argument("--datasets", default=None, help="comma-separated file stems")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--detectors", default=None, help="candidates (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--max-train-rows", type=int, default=MAX_TRAIN_ROWS)
    parser.add_argument(
        "--fit-budget",
        type=float,
        default=300.0,
        help="seconds; a reference method slower than this skips its later seeds (and says so)",
    )
    parser.add_argument("--anchors", type=Path, default=DEFAULT_ANCHORS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    files = sorted(args.data_dir.glob("*.npz"))
    if args.datasets:
        wanted = args.datasets.split(",")
        missing = sorted(set(wanted) - {f.stem for f in files})
        if missing:
            sys.exit(f"--datasets: {missing} not found in {args.data_dir}")
        files = [f for f in files if f.stem in wanted]
    if not files:
        sys.exit(f"{args.data_dir}: no *.npz files")
    params = load_params(args.params)
    train = params.train
    if args.detectors:
        train = train.model_copy(update={"candidates": args.detectors.split(",")})
        load_params(args.params, [f"train.candidates=[{args.detectors}]"])  # validates names
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"# quality_tabular: {len(files)} datasets x {len(seeds)} seeds; candidates "
        f"{train.candidates}; cleaning {'on' if params.clean.enabled else 'off'}; training "
        f"rows capped at {args.max_train_rows}",
        flush=True,
    )
    started = time.perf_counter()
    results: dict[str, dict[str, Scores]] = {}
    for i, path in enumerate(files, start=1):
        X, y = load_npz(path)
        results[path.stem] = benchmark_dataset(
            path.stem,
            X,
            y,
            seeds,
            params.clean,
            train,
            args.max_train_rows,
            args.fit_budget,
            lambda line, i=i: print(f"[{i}/{len(files)}] {line}", flush=True),
        )
    columns = [*map(candidate_column, train.candidates), SELECTED, ORACLE, IFOREST]
    columns += [c for c in (PYOD_AE, PYOD_SVDD) if any(c in row for row in results.values())]
    anchors = adbench_anchors(args.anchors)
    summary = summarize(results)
    print()
    print(markdown_table(results, columns, anchors))
    print()
    print(fit_seconds_line(results, columns))
    print(
        "summary: "
        + ", ".join(f"{k} {100 * v:.1f}" for k, v in summary.items())
        + f" (AUROC x 100; {time.perf_counter() - started:.0f} s total)"
    )
    if args.out:
        payload = {
            "protocol": "ADBench unsupervised: stratified 70/30, contaminated unlabelled 70%",
            "seeds": seeds,
            "candidates": train.candidates,
            "max_train_rows": args.max_train_rows,
            "results": {d: {c: s.to_dict() for c, s in row.items()} for d, row in results.items()},
            "summary": summary,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
