"""INT8 dynamic quantization of an exported graph (its gate is `parity.quantized_parity_check`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from normalcy.artifact.metadata import load_model, read_onnx_metadata, save_model, set_metadata
from normalcy.artifact.names import HEAD_PREFIX

log = logging.getLogger(__name__)


def quantize_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """INT8 dynamic quantization (weights QInt8, activations quantized at run time) of an
    exported graph; its metadata is copied with `"quantized": "int8"`.

    `quant_pre_process` (shape inference and basic, portable graph optimizations) runs first, as
    onnxruntime recommends; it folds part of the calibration head into constants, which
    `recalibrate_graph` handles. Should it fail on some graph, the graph is quantized as
    exported. The calibration head's nodes are excluded, so the head stays float32 and its
    p-values exact.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    metadata = read_onnx_metadata(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(onnx_path), str(source))
        except Exception as exc:  # a graph the symbolic shape inference cannot follow
            log.warning("quant_pre_process failed (%s); quantizing the graph as exported", exc)
            source = Path(onnx_path)
        head = [n.name for n in load_model(source).graph.node if n.name.startswith(HEAD_PREFIX)]
        quantized = Path(tmp) / "quantized.onnx"
        quantize_dynamic(
            str(source), str(quantized), weight_type=QuantType.QInt8, nodes_to_exclude=head
        )
        model = load_model(quantized)
    set_metadata(model, {**metadata, "quantized": "int8"})
    return save_model(model, Path(out_path))
