"""Every file the project writes, in one place: the steps, the flows and dvc.yaml agree on them.

Fixed paths are constants; paths set in params.yaml are small functions of their section, so a
step reads only its own section. MLflow run-artifact names (what train logs and monitor
downloads) are here too. Torch-free: monitor and recalibrate import it."""

from __future__ import annotations

from pathlib import Path

from normalcy.config import CleanParams, EvaluateParams, ExportParams, ValidateParams

ARTIFACTS = Path("artifacts")

# validate
VALIDATION_SPEC = ARTIFACTS / "validation_spec.json"
# clean
CLEANED_TRAIN = ARTIFACTS / "cleaned_train.npz"
# train
CANDIDATES = ARTIFACTS / "candidates.json"
WINNER = ARTIFACTS / "winner.pt"
# export
PARITY = ARTIFACTS / "parity.json"
PARITY_INT8 = ARTIFACTS / "parity_int8.json"
# the train flow
SUMMARY = ARTIFACTS / "summary.json"
DRIFT_REFERENCE = ARTIFACTS / "drift_reference.npz"
# the monitor flow
DRIFT_REPORT = ARTIFACTS / "drift_report.json"
DRIFT_PLOT = ARTIFACTS / "drift_report.png"
MONITOR_VALIDATION = ARTIFACTS / "monitor_validation.json"
DRIFT_SEQUENTIAL_STATE = ARTIFACTS / "drift_sequential_state.json"  # the CUSUM between runs
# the recalibrate flow
RECALIBRATION_LOCK = ARTIFACTS / "recalibrate.lock"
RECALIBRATED = ARTIFACTS / "model.recalibrated.onnx"
RECALIBRATED_INT8 = ARTIFACTS / "model.recalibrated.int8.onnx"

# plots, inside evaluate.plots_dir
ROC_PR_TEST_PLOT = "roc_pr_test.png"
SCORES_TEST_PLOT = "scores_test.png"
SCORES_VAL_PLOT = "scores_val.png"
OVERLAYS_DIR = "overlays"  # anomaly-map overlays of test images (image folders)

# MLflow run artifacts: folders of a training run, and the reference monitor downloads
RUN_REFERENCE_DIR = "reference"
RUN_DRIFT_REFERENCE = f"{RUN_REFERENCE_DIR}/{DRIFT_REFERENCE.name}"
RUN_VALIDATION_SPEC = f"{RUN_REFERENCE_DIR}/{VALIDATION_SPEC.name}"
RUN_PARITY_DIR = "parity"
RUN_CARD_METADATA = "model_card/metadata.json"
RUN_CARD = "model_card/model_card.md"


def validation_report(params: ValidateParams) -> Path:
    """The Great Expectations report of every split (`validate.report_path`)."""
    return Path(params.report_path)


def cleaning_log(params: CleanParams) -> Path:
    """The cleaning audit log: removed ids per iteration (`clean.log_path`)."""
    return Path(params.log_path)


def metrics(params: EvaluateParams) -> Path:
    """Threshold and test metrics (`evaluate.metrics_path`)."""
    return Path(params.metrics_path)


def calibration_scores(params: EvaluateParams) -> Path:
    """The normal validation scores the threshold came from, beside the metrics."""
    return metrics(params).with_name("calibration_scores.npy")


def plots_dir(params: EvaluateParams) -> Path:
    """ROC/PR curves and score histograms (`evaluate.plots_dir`)."""
    return Path(params.plots_dir)


def onnx_model(params: ExportParams) -> Path:
    """The exported float graph (`export.path`)."""
    return Path(params.path)


def int8_model(params: ExportParams) -> Path:
    """The INT8 twin of the float graph: model.onnx -> model.int8.onnx."""
    path = onnx_model(params)
    return path.with_name(path.stem + ".int8.onnx")


def rejected(path: Path) -> Path:
    """Where a graph that failed its gate is kept for inspection, never where a scorer would
    pick it up: model.onnx -> model.rejected.onnx."""
    return path.with_name(path.stem + ".rejected.onnx")
