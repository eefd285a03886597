"""Step 6, export: the winner as one ONNX graph (threshold and calibration scores inside),
checked against torch on the test split before anything may be registered; optionally an INT8
twin under its own gate, which never blocks the float model.

`export_and_gate` is the one place this happens, for the train flow and `normalcy stage export`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import normalcy
from normalcy.artifact.calibration_head import subsample_calibration
from normalcy.calibration import OperatingPoint
from normalcy.config import ExportParams
from normalcy.data.splits import Splits
from normalcy.detectors import Detector, accepted_params
from normalcy.export import (
    FloatTolerance,
    Int8Tolerance,
    ParityReport,
    TolerancePolicy,
    compare,
    export_onnx,
    quantize_int8,
    require_parity,
)
from normalcy.jsonio import write_json
from normalcy.pipeline import artifacts

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


def detector_params(detector: Detector) -> dict:
    """The detector's constructor arguments as set, for the metadata and the model card."""
    return {
        name: getattr(detector, name)
        for name in accepted_params(detector.name)
        if hasattr(detector, name)
    }


def model_metadata(
    detector: Detector,
    feature_names: list[str],
    example: np.ndarray,
    threshold: float,
    target_fpr: float,
    n_calibration: int,
    opset: int,
    extra: dict | None = None,
) -> dict:
    """What an ops team needs to know about the graph, stored inside it.

    `export_onnx` adds `outputs` (name, dtype, shape of each, read from the graph) and
    `n_p_value_scores`; the registry writes `model_version` in at registration, so a file that
    was never registered says `null` there. The flow passes model_name, data_version and
    mlflow_run_id in `extra`."""
    return {
        "model_name": None,
        "model_version": None,
        "detector": detector.name,
        "detector_params": detector_params(detector),
        "input": {
            "name": "input",
            "dtype": "float32",
            "shape": ["N", *example.shape[1:]],
            "feature_names": feature_names if example.ndim == 2 else [],
        },
        "decision_rule": "is_anomaly = score > threshold",
        "p_value_rule": "p_value = (1 + #{calibration scores >= score}) / (n_p_value_scores + 1)",
        "threshold": threshold,
        "target_fpr": target_fpr,
        "n_calibration_scores": n_calibration,
        "data_version": None,
        "mlflow_run_id": None,
        "normalcy_version": normalcy.__version__,
        "opset": opset,
        **(extra or {}),
    }


@dataclass(frozen=True)
class TorchReference:
    """What an exported graph is compared with: the torch module it came from, its threshold,
    the rows and calibration scores to compare on, and the rows per run (the detector's
    scoring batch: an image graph's activations for a whole test split at once exhausted 23 GB
    at 448 px)."""

    module: nn.Module
    threshold: float
    test_X: np.ndarray
    calibration_scores: np.ndarray
    batch_size: int


def _gate(
    graph: Path, reference: TorchReference, policy: TolerancePolicy, report_path: Path, label: str
) -> tuple[Path, ParityReport]:
    """The gate every exported graph (float or INT8) passes: `compare` with the torch
    `reference` under `policy`, the report written to `report_path` and logged; a graph that
    fails is renamed `.rejected.onnx`. Returns (path of the graph, report)."""
    report = compare(
        reference.module,
        reference.threshold,
        graph,
        reference.test_X,
        policy,
        reference.calibration_scores,
        reference.batch_size,
    )
    write_json(report.to_dict(), report_path)
    log.info("%s: %s", label, report.message())
    if not report.passed:
        graph = graph.replace(artifacts.rejected(graph))
    return graph, report


def export(
    detector: Detector,
    threshold: float,
    test_X: np.ndarray,
    params: ExportParams,
    metadata: dict,
    calibration_scores: np.ndarray,
) -> tuple[Path, ParityReport]:
    """(path, parity report) of the float graph, every output compared with torch on test_X.

    At most `params.max_calibration_scores` calibration scores go into the graph (a seeded
    subsample). An INT8 file from an earlier export is removed: it is no twin of this graph.
    A graph that fails parity is renamed `.rejected.onnx`; the caller gates on the report."""
    if not detector.exportable:
        raise ValueError(f"detector {detector.name!r} is not exportable; it cannot be the winner")
    module = detector.scoring_module()
    stored = subsample_calibration(calibration_scores, params.max_calibration_scores)
    path = export_onnx(
        module,
        threshold,
        test_X[:2],
        artifacts.onnx_model(params),
        params.opset,
        metadata,
        calibration_scores=stored,
    )
    artifacts.int8_model(params).unlink(missing_ok=True)
    policy = FloatTolerance(
        params.parity_max_abs, params.parity_max_rel, params.parity_min_agreement
    )
    reference = TorchReference(module, threshold, test_X, stored, detector.scoring_batch_size)
    return _gate(path, reference, policy, artifacts.PARITY, "parity")


def quantize(
    detector: Detector,
    threshold: float,
    test_X: np.ndarray,
    params: ExportParams,
    calibration_scores: np.ndarray,
    onnx_path: Path,
) -> tuple[Path, ParityReport]:
    """(path, report) of the INT8 twin of `onnx_path`, compared with torch under the
    `quantized_*` tolerances. A twin that fails is renamed `.rejected.onnx`."""
    module = detector.scoring_module()
    stored = subsample_calibration(calibration_scores, params.max_calibration_scores)
    path = quantize_int8(onnx_path, artifacts.int8_model(params))
    policy = Int8Tolerance(
        params.quantized_max_rel, params.quantized_min_spearman, params.quantized_min_agreement
    )
    reference = TorchReference(module, threshold, test_X, stored, detector.scoring_batch_size)
    return _gate(path, reference, policy, artifacts.PARITY_INT8, "INT8 parity")


@dataclass
class Exported:
    """What `export_and_gate` produced: the float graph that passed parity, and the INT8 twin
    when one was asked for (`int8_path` only when it passed its own gate)."""

    onnx_path: Path
    parity: ParityReport
    int8_path: Path | None = None
    int8_parity: ParityReport | None = None
    int8_status: str | None = None  # None (not asked), "passed", "rejected" or "failed: why"


def export_and_gate(
    detector: Detector,
    splits: Splits,
    point: OperatingPoint,
    params: ExportParams,
    extra: dict | None = None,
) -> Exported:
    """Metadata, ONNX export of the winner at `point` and the parity gate on the test split
    (raises `ParityError`, which carries the report, so nothing is registered); then, with
    `export.quantize`, the INT8 twin, whose failed gate or quantizer error is reported and never
    blocks the float model."""
    test_X, threshold, calibration_scores = splits.test.X, point.threshold, point.calibration_scores
    metadata = model_metadata(
        detector,
        splits.feature_names,
        test_X,
        threshold,
        point.target_fpr,
        len(calibration_scores),
        params.opset,
        extra,
    )
    if splits.train.defects is not None:  # an image folder: files are resized on loading
        metadata["input"]["image_resize"] = "bilinear"
    path, report = export(detector, threshold, test_X, params, metadata, calibration_scores)
    require_parity(report)
    exported = Exported(path, report)
    if not params.quantize:
        return exported
    try:
        int8_path, int8_report = quantize(
            detector, threshold, test_X, params, calibration_scores, path
        )
    except Exception as exc:  # e.g. an operator the quantizer cannot handle: float model only
        log.warning("INT8 quantization failed, the float model stands alone: %s", exc)
        exported.int8_status = f"failed: {exc}"[:500]
        return exported
    exported.int8_parity = int8_report
    exported.int8_status = "passed" if int8_report.passed else "rejected"
    if int8_report.passed:
        exported.int8_path = int8_path
    else:
        log.warning("%s; only the float model is registered", int8_report.message())
    return exported
