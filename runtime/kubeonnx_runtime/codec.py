"""Open Inference Protocol v2 codecs: JSON tensors and the binary tensor extension, both ways.

Pure functions from bytes to numpy arrays and back; the HTTP layer only passes bodies through.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from .datatypes import OIP_TO_NUMPY, oip_datatype
from .errors import InvalidRequest

HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request: inputs as numpy arrays, keyed by name, in request order."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_output: bool = False  # the request-wide default for outputs
    parameters: dict[str, Any] = field(default_factory=dict)


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}: 'parameters' must be an object")
    return params


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise InvalidRequest(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(raw)


def _decode_bytes_tensor(buf: memoryview, count: int, where: str) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(buf):
        if offset + 4 > len(buf):
            raise InvalidRequest(f"{where}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", buf, offset)
        offset += 4
        if offset + length > len(buf):
            raise InvalidRequest(f"{where}: BYTES element runs past the end of its buffer")
        items.append(bytes(buf[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidRequest(f"{where}: {len(items)} BYTES elements for a shape of {count}")
    arr = np.empty(count, dtype=np.object_)
    arr[:] = items
    return arr


def _decode_json_data(data: Any, datatype: str, count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = np.array(data, dtype=np.object_).ravel()
        if flat.size != count:
            raise InvalidRequest(f"{where}: {flat.size} elements of data for a shape of {count}")
        out = np.empty(count, dtype=np.object_)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                out[i] = item.encode()
            elif isinstance(item, bytes):
                out[i] = item
            else:
                raise InvalidRequest(f"{where}: BYTES data must be strings")
        return out
    dtype = OIP_TO_NUMPY[datatype]
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InvalidRequest(f"{where}: 'data' is a ragged nested list") from None
    if arr.dtype == np.object_ or arr.dtype.kind in {"U", "S"}:
        raise InvalidRequest(f"{where}: 'data' holds non-numeric values for datatype {datatype}")
    if datatype == "BOOL" and arr.size and arr.dtype != np.bool_:
        raise InvalidRequest(f"{where}: BOOL data must be true or false")
    if datatype != "BOOL" and arr.dtype == np.bool_ and arr.size:
        raise InvalidRequest(f"{where}: booleans given for datatype {datatype}")
    if dtype.kind in {"i", "u"} and arr.dtype.kind == "f":
        raise InvalidRequest(f"{where}: fractional numbers given for datatype {datatype}")
    if arr.size != count:
        raise InvalidRequest(f"{where}: {arr.size} elements of data for a shape of {count}")
    if dtype.kind in {"i", "u"} and arr.size:
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise InvalidRequest(f"{where}: a value is out of range for datatype {datatype}")
    return arr.astype(dtype, copy=False).ravel()


def decode_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an infer request body; `header_length` is the binary extension's JSON length."""
    if header_length is None:
        header_bytes, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {header_length} does not fit a body of "
                f"{len(body)} bytes"
            )
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidRequest("request body must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequest("'inputs' must be a non-empty list")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise InvalidRequest(f"inputs[{i}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"inputs[{i}]: 'name' must be a non-empty string")
        where = f"input '{name}'"
        if name in inputs:
            raise InvalidRequest(f"{where} is given twice")
        datatype = raw.get("datatype")
        if datatype not in OIP_TO_NUMPY:
            raise InvalidRequest(
                f"{where}: unknown datatype {datatype!r}; expected one of "
                + ", ".join(OIP_TO_NUMPY)
            )
        shape = _shape(raw.get("shape"), where)
        count = math.prod(shape)
        size = _parameters(raw, where).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidRequest(f"{where}: binary_data_size must be a non-negative integer")
            if header_length is None:
                raise InvalidRequest(
                    f"{where} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if "data" in raw:
                raise InvalidRequest(f"{where} has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidRequest(
                    f"{where}: binary_data_size {size} runs past the end of the body"
                )
            buf = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                arr = _decode_bytes_tensor(buf, count, where)
            else:
                dtype = OIP_TO_NUMPY[datatype]
                if size != count * dtype.itemsize:
                    raise InvalidRequest(
                        f"{where}: {size} bytes of binary data for shape {list(shape)} of "
                        f"{datatype} (expected {count * dtype.itemsize})"
                    )
                arr = np.frombuffer(buf, dtype=dtype)
        else:
            if "data" not in raw:
                raise InvalidRequest(f"{where} has neither 'data' nor binary_data_size")
            arr = _decode_json_data(raw["data"], datatype, count, where)
        inputs[name] = arr.reshape(shape)
    if offset != len(binary):
        raise InvalidRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )

    request_params = _parameters(header, "request")
    outputs: list[RequestedOutput] | None = None
    raw_outputs = header.get("outputs")
    default_binary = bool(request_params.get("binary_data_output", False))
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidRequest("'outputs' must be a list")
        outputs = []
        for i, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidRequest(f"outputs[{i}] must be an object with a 'name'")
            params = _parameters(raw, f"output '{raw['name']}'")
            outputs.append(
                RequestedOutput(raw["name"], bool(params.get("binary_data", default_binary)))
            )
    request_id = header.get("id")
    return InferRequest(
        inputs=inputs,
        id=request_id if isinstance(request_id, str) else None,
        outputs=outputs,
        binary_output=default_binary,
        parameters=request_params,
    )


def _bytes_tensor_buffer(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _json_data(arr: np.ndarray) -> Any:
    flat = arr.ravel()
    if flat.dtype.kind in {"O", "U", "S"}:
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in flat]
    if flat.dtype == np.float16:
        return flat.astype(np.float32)
    return flat


def encode_response(
    model_name: str,
    model_version: str | None,
    request: InferRequest,
    outputs: dict[str, np.ndarray],
) -> tuple[bytes, int | None]:
    """Encode outputs; returns the body and, when binary buffers follow, the header length."""
    wanted = request.outputs or [RequestedOutput(n, request.binary_output) for n in outputs]
    entries: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for out in wanted:
        arr = outputs[out.name]
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": oip_datatype(arr),
            "shape": list(arr.shape),
        }
        if out.binary:
            buf = (
                _bytes_tensor_buffer(arr)
                if entry["datatype"] == "BYTES"
                else np.ascontiguousarray(arr).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(buf)}
            buffers.append(buf)
        else:
            entry["data"] = _json_data(arr)
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        body["model_version"] = model_version
    if request.id is not None:
        body["id"] = request.id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)
