"""Step 5, evaluate: the threshold from validation scores as `calibration.mode` asks; test
metrics and the operating point's figures once, for the report only (nothing is chosen on
them). An image folder's test split adds the per-defect table and, when the model outputs
anomaly maps, pixel AUROC, AUPRO and overlays (`evaluation.localization`)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from normalcy.calibration import OperatingPoint
from normalcy.config import CalibrationParams, EvaluateParams
from normalcy.data.splits import Split, Splits
from normalcy.detectors import Detector
from normalcy.detectors.base import ANOMALY_MAP, SCORE
from normalcy.evaluation.localization import localization
from normalcy.evaluation.metrics import ranking_metrics
from normalcy.evaluation.operating_point import choose_threshold, operating_report
from normalcy.evaluation.plots import plot_roc_pr, plot_score_histogram
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """The winner's operating point and report: what export and the card need."""

    threshold: float
    target_fpr: float
    threshold_how: str
    n_calibration: int
    calibration_scores: np.ndarray
    val_scores: np.ndarray
    test_scores: np.ndarray
    test: dict[str, float]
    plots: list[str]
    per_defect: dict[str, dict[str, float]] = field(default_factory=dict)  # image folders
    overlays: list[str] = field(default_factory=list)  # image folders with anomaly maps

    def operating_point(self) -> OperatingPoint:
        return OperatingPoint(self.threshold, self.target_fpr, self.calibration_scores)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("calibration_scores", "val_scores", "test_scores"):
            out.pop(key)
        return out


def _plots(
    splits: Splits,
    val_scores: np.ndarray,
    test_scores: np.ndarray,
    threshold: float,
    params: EvaluateParams,
) -> list[str]:
    """ROC/PR on test (when it has both classes) and the test and validation score histograms."""
    folder = artifacts.plots_dir(params)
    test = splits.test
    plots = []
    if test.y is not None and test.has_both_classes:
        plots.append(plot_roc_pr(test.y, test_scores, "test", folder / artifacts.ROC_PR_TEST_PLOT))
    plots.append(
        plot_score_histogram(
            test_scores, test.y, threshold, "test scores", folder / artifacts.SCORES_TEST_PLOT
        )
    )
    plots.append(
        plot_score_histogram(
            val_scores,
            splits.val.y if splits.val.has_both_classes else None,  # one class: one histogram
            threshold,
            "validation scores",
            folder / artifacts.SCORES_VAL_PLOT,
        )
    )
    return [str(path) for path in plots]


def estimated_contamination(train: Split, cleaned: Split) -> float:
    """The share of the training split that cleaning removed: the best estimate of the anomaly
    share of unlabelled data drawn like it (the validation split)."""
    return 1.0 - len(cleaned) / len(train) if len(train) else 0.0


def without_top(scores: np.ndarray, share: float) -> np.ndarray:
    """`scores` less their highest `share`: where an unlabelled split's anomalies sit."""
    keep = len(scores) - int(round(share * len(scores)))
    return np.sort(scores)[: max(keep, 1)]


def _test_outputs(detector: Detector, test: Split) -> tuple[np.ndarray, np.ndarray | None]:
    """(test scores, anomaly maps or None). Maps are computed only for a test split with
    defect names (an image folder) and a model that outputs them (probed on one image); the
    scores then come from the same pass."""
    if test.defects is None or len(test) == 0 or ANOMALY_MAP not in detector.predict(test.X[:1]):
        return detector.score(test.X), None
    outputs = detector.predict(test.X)
    return outputs[SCORE].astype(np.float64), outputs[ANOMALY_MAP]


def evaluate(
    detector: Detector,
    splits: Splits,
    params: EvaluateParams,
    calibration: CalibrationParams,
    cleaned_train: Split | None = None,
) -> Evaluation:
    """The winner's threshold, test metrics and plots; writes the metrics and the calibration
    scores for the export step.

    Without validation labels, the highest share of validation scores that cleaning removed
    from `cleaned_train` (see `estimated_contamination`) is left out of the threshold and the
    calibration scores, as recalibration corrects its quantiles for a batch's estimated
    anomalies: both assume the anomalies sit in the upper tail."""
    val_scores = detector.score(splits.val.X)
    if splits.val.y is None:
        cleaned = cleaned_train if cleaned_train is not None else splits.train
        calibration_scores = without_top(val_scores, estimated_contamination(splits.train, cleaned))
        chosen = choose_threshold(calibration_scores, None, calibration)
    else:
        calibration_scores = val_scores[splits.val.y == 0]
        chosen = choose_threshold(val_scores, splits.val.y, calibration)
    threshold = chosen.value
    test_scores, test_maps = _test_outputs(detector, splits.test)
    test = operating_report(splits.test.y, test_scores, threshold, calibration)
    if splits.test.y is not None:
        test = {**ranking_metrics(splits.test.y, test_scores), **test}
    located = localization(
        splits.test, test_scores, test_maps, artifacts.plots_dir(params) / artifacts.OVERLAYS_DIR
    )
    evaluation = Evaluation(
        threshold,
        chosen.target_fpr,
        chosen.how,
        len(calibration_scores),
        calibration_scores,
        val_scores,
        test_scores,
        test,
        _plots(splits, val_scores, test_scores, threshold, params),
        located.per_defect,
        located.overlays,
    )
    evaluation.test.update(located.metrics)
    write_json(evaluation.to_dict(), artifacts.metrics(params))
    np.save(artifacts.calibration_scores(params), calibration_scores)
    log.info("threshold %.5g (%s); test %s", threshold, chosen.how, test)
    return evaluation


def load_operating_point(params: EvaluateParams) -> OperatingPoint:
    """The operating point `evaluate` wrote (metrics file and calibration scores)."""
    metrics = json.loads(artifacts.metrics(params).read_text())
    scores = np.load(artifacts.calibration_scores(params))
    return OperatingPoint(float(metrics["threshold"]), float(metrics["target_fpr"]), scores)
