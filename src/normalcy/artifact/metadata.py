"""Loading and saving model protos, and the 'normalcy' JSON metadata stored inside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from normalcy.artifact.names import METADATA_KEY
from normalcy.atomic import atomic_path
from normalcy.jsonio import json_default

_ONNX_DTYPES = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.BOOL: "bool",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
}


def load_model(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """The model proto, or an error that names the file instead of protobuf's wire format."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file; expected an .onnx file")
    try:
        return onnx.load_model(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a loadable ONNX model ({exc})") from None


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check, then write as one self-contained file, atomically: a failure leaves the previous
    file (or none) in place."""
    path = Path(path)
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return path


def get_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The 'normalcy' metadata of a loaded proto; {} when there is none."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Store `metadata` as one JSON string under the 'normalcy' key, replacing any previous one."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata, default=json_default))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The 'normalcy' metadata of an ONNX file, read with onnx (no session); {} when none."""
    return get_metadata(load_model(path, load_external_data=False))


def update_metadata(path: str | Path, updates: dict[str, Any], out_path: str | Path) -> Path:
    """Write a copy of the model at `out_path` with `updates` merged into its 'normalcy'
    metadata; the graph is untouched. `out_path` may equal `path` (replaced atomically)."""
    model = load_model(path)
    set_metadata(model, {**get_metadata(model), **updates})
    return save_model(model, out_path)


def output_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Name, dtype and shape of each graph output, for the metadata ('N' = the batch)."""
    specs = []
    for output in model.graph.output:
        tensor = output.type.tensor_type
        shape: list[str | int] = []
        for i, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            else:
                shape.append("N" if i == 0 else dim.dim_param or "?")
        dtype = _ONNX_DTYPES.get(tensor.elem_type, TensorProto.DataType.Name(tensor.elem_type))
        specs.append({"name": output.name, "dtype": dtype, "shape": shape})
    return specs
