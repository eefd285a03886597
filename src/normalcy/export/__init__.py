"""ONNX export of a detector's scoring path (torch), the parity gate of the file against torch,
and INT8 quantization.

The exported file has one input and these outputs (names in `normalcy.artifact.names`):

    input        float32 [N, d] or [N, C, H, W]   raw rows in the training data's units
    score        float32 [N]        higher is more anomalous
    is_anomaly   bool    [N]        score > threshold
    p_value      float32 [N]        (1 + #{calibration scores >= score}) / (n + 1)
    anomaly_map  float32 [N, H, W]  when the scoring module's Prediction has one
    <name>       [N, ...]           each explanation of the Prediction, sorted by name

The torch-free side of the file (metadata, the calibration head, recalibration) lives in
`normalcy.artifact`; this package needs torch.
"""

from normalcy.export.graph import ScorePath, ScoringGraph
from normalcy.export.int8 import quantize_int8
from normalcy.export.onnx_export import export_onnx
from normalcy.export.parity import compare, parity_check, quantized_parity_check
from normalcy.export.report import OutputParity, ParityError, ParityReport, require_parity
from normalcy.export.tolerance import FloatTolerance, Int8Tolerance, TolerancePolicy

__all__ = [
    "FloatTolerance",
    "Int8Tolerance",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "ScorePath",
    "ScoringGraph",
    "TolerancePolicy",
    "compare",
    "export_onnx",
    "parity_check",
    "quantize_int8",
    "quantized_parity_check",
    "require_parity",
]
