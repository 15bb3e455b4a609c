"""Open Inference Protocol datatypes and their numpy and ONNX counterparts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# OIP datatype -> numpy dtype (BYTES is carried as an object array of bytes).
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


@dataclass(frozen=True)
class TensorSpec:
    """A model's input or output as the protocol describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension
    # (axis, name) of each dynamic dimension the model names (ONNX dim_param: `batch`,
    # `sequence`): inputs that name a dimension alike take the same size in a request.
    named_dims: tuple[tuple[int, str], ...] = ()

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def fits(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        for d, g in zip(self.shape, shape):  # noqa: B905, SIM110 - lengths checked; a plain loop is faster
            if d != -1 and d != g:
                return False
        return True


NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}

# onnxruntime's type strings for tensor inputs and outputs.
ONNX_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def oip_datatype(array: np.ndarray) -> str:
    """The OIP datatype of an array; strings and bytes are BYTES."""
    if array.dtype.kind in {"O", "U", "S"}:
        return "BYTES"
    try:
        return NUMPY_TO_OIP[array.dtype]
    except KeyError:
        raise ValueError(f"unsupported numpy dtype {array.dtype}") from None
