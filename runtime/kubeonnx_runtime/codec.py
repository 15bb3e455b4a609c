"""Open Inference Protocol v2 codecs: JSON tensors and the binary tensor extension, both ways.

Pure functions from bytes to numpy arrays and back; the HTTP layer only passes bodies through.
"""

from __future__ import annotations

import gc
import itertools
import math
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from .datatypes import OIP_TO_NUMPY, TensorSpec, oip_datatype
from .errors import InvalidRequest, PayloadTooLarge

HEADER_LENGTH = "inference-header-content-length"
# A value too large for its float datatype is refused by name (_decode_json_data); numpy's
# warning about the cast that found it would only repeat that, outside the log's format. The
# search for booleans squares the values, which may overflow too, to no harm (_may_hold_booleans).
warnings.filterwarnings(
    "ignore", "overflow encountered in (cast|multiply)", RuntimeWarning, __name__
)


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


# The least magnitude that rounds to infinity in each float datatype (its largest value plus
# half a unit in the last place; round-half-even takes that to infinity): what the cast
# refuses, so the short lists' check in Python refuses exactly the same.
_ROUNDS_TO_INF = {"FP16": 65520.0, "FP32": float(2**128 - 2**103), "FP64": math.inf}
# numpy's limit on dimensions; no model takes more.
MAX_RANK = 32


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise InvalidRequest(f"{where}: 'shape' must be a list of non-negative integers")
    if len(raw) > MAX_RANK:
        raise InvalidRequest(f"{where}: 'shape' has {len(raw)} dimensions; at most {MAX_RANK}")
    return tuple(raw)


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{where}: '{key}' must be true or false, not {value!r}")
    return value


def _check_against_model(
    spec: TensorSpec, datatype: str, shape: tuple[int, ...], where: str
) -> None:
    """The cheap checks, made before any tensor data is read."""
    if datatype != spec.datatype:
        raise InvalidRequest(f"{where} has datatype {datatype}; the model takes {spec.datatype}")
    if not spec.fits(shape):
        raise InvalidRequest(
            f"{where} has shape {list(shape)}; the model takes {list(spec.shape)} (-1 is any size)"
        )


def _check_named_dims(
    spec: TensorSpec,
    shape: tuple[int, ...],
    seen: dict[str, tuple[str, int, int]],
    where: str,
) -> None:
    """A dimension the model names (`batch`, `sequence`) has one size in a request: the
    first input with it sets the size (`seen`: name -> input, axis, size), the others match.
    Otherwise a model that broadcasts would run an input of size 1 against another's whole
    length (an `attention_mask` of [1,1] over `input_ids` of [1,1000])."""
    for axis, dim in spec.named_dims:
        size = shape[axis]
        first = seen.setdefault(dim, (spec.name, axis, size))
        if first[2] != size:
            raise InvalidRequest(
                f"{where} has {size} in dimension {axis} and input '{first[0]}' has "
                f"{first[2]} in dimension {first[1]}: the model names both dimension "
                f"'{dim}', so they must be equal"
            )


def _decode_bytes_tensor(buf: memoryview, count: int, where: str) -> np.ndarray:
    items: list[bytes] = []
    offset = 0
    while offset < len(buf):
        if len(items) == count:
            raise InvalidRequest(f"{where}: more BYTES elements than its shape's {count}")
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


def _decode_binary(buf: memoryview, datatype: str, count: int, where: str) -> np.ndarray:
    if datatype == "BYTES":
        return _decode_bytes_tensor(buf, count, where)
    dtype = OIP_TO_NUMPY[datatype]
    if len(buf) != count * dtype.itemsize:
        raise InvalidRequest(
            f"{where}: {len(buf)} bytes of binary data for {count} elements of {datatype} "
            f"(expected {count * dtype.itemsize})"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidRequest(f"{where}: BOOL bytes must be 0 or 1")
    return np.frombuffer(buf, dtype=dtype)


def _flat_count(data: list[Any]) -> int | None:
    """Elements of a flat list, or None when it nests (numpy counts those)."""
    return None if data and isinstance(data[0], list) else len(data)


# Lists of numbers up to this length are checked for overflow one by one, in Python; longer
# ones after their conversion, by numpy.
FEW_NUMBERS = 32
# struct's native codes for the float datatypes. FP16 goes through doubles, as numpy's path
# does: struct's own half-float code would round and refuse on its own terms.
_STRUCT_CODE = {"FP16": "d", "FP32": "f", "FP64": "d"}


def _plain_floats(data: list[Any], datatype: str) -> np.ndarray | None:
    """A flat list of JSON numbers with a float in it, converted to the datatype in one C pass;
    None when an element is not a number (numpy's path then refuses it by name).

    numpy's path (np.asarray, then astype) walks the list once to find its shape and type
    and again to convert it: with a float in the list, it makes a double of every number (and
    of a boolean, 1 or 0), then rounds each to the datatype. struct.pack does just that
    (PyFloat_AsDouble, then C's cast), refusing strings, nulls, objects and lists, for about a
    quarter of the instructions. Like the binary extension's arrays, the one it gives is a
    read-only view of its bytes."""
    code = _STRUCT_CODE[datatype]
    try:
        packed = struct.pack(f"{len(data)}{code}", *data)
    except (struct.error, OverflowError):
        return None
    arr = np.frombuffer(packed, np.float32 if code == "f" else np.float64)
    return arr.astype(np.float16) if datatype == "FP16" else arr


def _may_hold_booleans(values: np.ndarray) -> bool:
    """Whether JSON numbers, converted, hold a 0 or a 1 (x * x == x), what numpy and struct make
    of a boolean among them. A pass of C over the array; the JSON values' types, the answer
    itself, cost a Python call each, and are only looked up after a yes."""
    return bool((values * values == values).any())


def _flattened(data: list[Any], depth: int) -> Iterable[Any]:
    """The values of `data`, a list nested `depth` deep (1: a flat list)."""
    items: Iterable[Any] = data
    for _ in range(depth - 1):
        items = itertools.chain.from_iterable(items)
    return items


def _decode_json_data(data: Any, datatype: str, count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    flat_count = _flat_count(data)
    if flat_count is not None and flat_count != count:  # before any conversion
        raise InvalidRequest(f"{where}: {flat_count} elements of data for a shape of {count}")
    if datatype == "BYTES":
        try:
            flat = np.array(data, dtype=np.object_).ravel()
        except ValueError:  # nested deeper than numpy's dimensions
            raise InvalidRequest(f"{where}: 'data' is nested too deeply") from None
        if flat.size != count:
            raise InvalidRequest(f"{where}: {flat.size} elements of data for a shape of {count}")
        out = np.empty(count, dtype=np.object_)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidRequest(f"{where}: BYTES data must be strings")
            out[i] = item.encode()
        return out
    dtype = OIP_TO_NUMPY[datatype]
    # The common case, an image's thousands of floats, without numpy's walk over the list. A
    # float first is what makes the answers numpy's: a list of integers numpy would round once
    # from int64 (struct twice, through a double), a list of booleans it refuses. Short lists
    # stay on numpy's path, whose overflow check reads their Python values; a long one is
    # checked as numpy's path checks it, after the conversion. struct, like numpy, makes 1 or 0
    # of a boolean, and a boolean is not a number of these datatypes.
    if (
        datatype in _STRUCT_CODE
        and flat_count is not None
        and flat_count > FEW_NUMBERS
        and type(data[0]) is float
    ):
        floats = _plain_floats(data, datatype)
        if floats is not None:
            _refuse_nulls_and_booleans(floats, data, datatype, where)
            if not np.isfinite(floats).all():
                raise InvalidRequest(f"{where}: a value is out of range for datatype {datatype}")
            return floats
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InvalidRequest(f"{where}: 'data' is a ragged nested list") from None
    if arr.size != count:
        raise InvalidRequest(f"{where}: {arr.size} elements of data for a shape of {count}")
    if count == 0:
        return np.empty(0, dtype)
    if arr.dtype.kind in {"U", "S"}:
        raise InvalidRequest(f"{where}: 'data' holds non-numeric values for datatype {datatype}")
    if datatype == "BOOL":
        if arr.dtype != np.bool_:
            raise InvalidRequest(f"{where}: BOOL data must be true or false")
        return arr.ravel()
    _refuse_nulls_and_booleans(arr, data, datatype, where)
    if dtype.kind in {"i", "u"}:
        return _integers(arr, data, datatype, where)
    try:
        out = arr.astype(dtype).ravel()  # an overflow is refused below, by name
    except (TypeError, ValueError):  # objects that are not numbers
        raise InvalidRequest(
            f"{where}: 'data' holds non-numeric values for datatype {datatype}"
        ) from None
    except OverflowError:  # an integer past any double (orjson gives none today)
        raise InvalidRequest(f"{where}: a value is out of range for datatype {datatype}") from None
    # JSON cannot carry inf or NaN, so a non-finite value here overflowed the datatype. A
    # few plain numbers are checked in Python, faster than a numpy reduction's set-up.
    if flat_count is not None and flat_count <= FEW_NUMBERS and arr.dtype.kind in {"i", "u", "f"}:
        past = _ROUNDS_TO_INF[datatype]
        overflow = any(v >= past or v <= -past for v in data)
    else:
        overflow = not np.isfinite(out).all()
    if overflow:
        raise InvalidRequest(f"{where}: a value is out of range for datatype {datatype}")
    return out


def _refuse_nulls_and_booleans(arr: np.ndarray, data: list[Any], datatype: str, where: str) -> None:
    """numpy makes NaN of a null among numbers and 1 or 0 of a boolean: neither is a number of
    `datatype`, and each is named, not taken for an overflow or a number."""
    kind = arr.dtype.kind
    if kind == "b":
        raise InvalidRequest(f"{where}: booleans given for datatype {datatype}")
    if kind == "O":  # numpy kept the JSON values: a null is among them, or a non-number
        types = set(map(type, arr.ravel().tolist()))
    elif arr.size <= FEW_NUMBERS or _may_hold_booleans(arr):  # numbers, booleans as 1 or 0
        types = set(map(type, data if arr.ndim == 1 else _flattened(data, arr.ndim)))
    else:
        return
    if type(None) in types:
        raise InvalidRequest(
            f"{where}: 'data' holds null, which is not a number of datatype {datatype}"
        )
    if bool in types:
        raise InvalidRequest(f"{where}: booleans given for datatype {datatype}")


def _integers(arr: np.ndarray, data: list[Any], datatype: str, where: str) -> np.ndarray:
    """Integers exactly as sent: no fractions, nothing wrapped around or rounded."""
    dtype = OIP_TO_NUMPY[datatype]
    info = np.iinfo(dtype)
    if arr.dtype.kind in {"i", "u"}:
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise InvalidRequest(f"{where}: a value is out of range for datatype {datatype}")
        return arr.astype(dtype).ravel()
    # numpy made floats or objects of the JSON values (integers of both signs beyond int64
    # mixed, or fractions): the parsed values themselves are exact, so check them one by one.
    values = list(_flatten(data))
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidRequest(
                f"{where}: 'data' holds non-numeric values for datatype {datatype}"
            )
        if isinstance(v, float) and not v.is_integer():
            raise InvalidRequest(f"{where}: fractional numbers given for datatype {datatype}")
        if not info.min <= v <= info.max:
            raise InvalidRequest(f"{where}: a value is out of range for datatype {datatype}")
        if isinstance(v, float):  # integral but written as a float: its digits may be lost
            raise InvalidRequest(f"{where}: {v!r} is not an integer, as datatype {datatype} needs")
    return np.array(values, dtype=dtype)


def _flatten(data: list[Any]) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def json_limit_message(limit: int) -> str:
    return (
        f"the request's JSON is over the limit of {limit} bytes (--max-json-bytes); send large "
        "tensors as binary data (the binary tensor extension)"
    )


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False
# Bodies from this size on are decoded with the garbage collector held off; below it, too few
# objects to matter, and holding it off costs 3 us, on a tiny model's 7 us decode.
GC_PAUSE_FROM = 64 * 1024


def _pause_gc() -> None:
    """Hold the cyclic garbage collector off while a request is decoded (from any number of
    threads at once). Parsed JSON is acyclic and is freed by reference counting when the
    decode ends; but each of its lists counts towards the collector's thresholds, and the
    collections they set off, passes over every tracked object of the process holding the
    GIL, took 1.8 s of a 0.2 s parse of 2 MB of nested lists."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1


def _resume_gc() -> None:
    global _gc_pausers
    with _gc_lock:
        _gc_pausers -= 1
        if _gc_pausers == 0 and _gc_was_enabled:
            gc.enable()


def decode_request(
    body: bytes,
    header_length: int | None,
    model_inputs: Mapping[str, TensorSpec] | None = None,
    max_json_bytes: int | None = None,
) -> InferRequest:
    """Decode an infer request body; `header_length` is the binary extension's JSON length.

    With `model_inputs`, every input's name, datatype and shape is checked against the model
    before its data is read (dimensions the model names alike, equal across inputs), and a
    missing input is refused. `max_json_bytes` bounds what
    becomes Python objects, ten to twenty times its size in memory and all of it decoded
    holding the GIL: the JSON, and BYTES tensors sent as binary data (413 beyond)."""
    if len(body) < GC_PAUSE_FROM:
        return _decode_request(body, header_length, model_inputs, max_json_bytes)
    _pause_gc()
    try:
        return _decode_request(body, header_length, model_inputs, max_json_bytes)
    finally:
        _resume_gc()


def _decode_request(
    body: bytes,
    header_length: int | None,
    model_inputs: Mapping[str, TensorSpec] | None,
    max_json_bytes: int | None,
) -> InferRequest:
    if header_length is None:
        header_bytes, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {header_length} does not fit a body of "
                f"{len(body)} bytes"
            )
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    objects_limit = max_json_bytes if max_json_bytes is not None else len(body)
    if len(header_bytes) > objects_limit:
        raise PayloadTooLarge(json_limit_message(objects_limit))
    objects = len(header_bytes)
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
    named_sizes: dict[str, tuple[str, int, int]] = {}
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
        if not isinstance(datatype, str) or datatype not in OIP_TO_NUMPY:
            raise InvalidRequest(
                f"{where}: unknown datatype {datatype!r}; expected one of "
                + ", ".join(OIP_TO_NUMPY)
            )
        shape = _shape(raw.get("shape"), where)
        if model_inputs is not None:
            spec = model_inputs.get(name)
            if spec is None:
                raise InvalidRequest(
                    f"unknown input '{name}'; the model's inputs are " + ", ".join(model_inputs)
                )
            _check_against_model(spec, datatype, shape, where)
            if spec.named_dims:
                _check_named_dims(spec, shape, named_sizes, where)
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
            if datatype == "BYTES":  # each element becomes a Python object
                objects += size
                if objects > objects_limit:
                    raise PayloadTooLarge(
                        f"{where}: the request's JSON and BYTES tensors are over the limit of "
                        f"{objects_limit} bytes (--max-json-bytes)"
                    )
            arr = _decode_binary(binary[offset : offset + size], datatype, count, where)
            offset += size
        else:
            if "data" not in raw:
                raise InvalidRequest(f"{where} has neither 'data' nor binary_data_size")
            arr = _decode_json_data(raw["data"], datatype, count, where)
        try:
            inputs[name] = arr.reshape(shape)
        except ValueError:  # a zero-element shape too large for numpy
            raise InvalidRequest(f"{where}: shape {list(shape)} is too large") from None
    if offset != len(binary):
        raise InvalidRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    if model_inputs is not None:
        for name in model_inputs:
            if name not in inputs:
                raise InvalidRequest(f"missing input '{name}'")

    request_params = _parameters(header, "request")
    outputs: list[RequestedOutput] | None = None
    raw_outputs = header.get("outputs")
    default_binary = _flag(request_params, "binary_data_output", False, "request parameters")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidRequest("'outputs' must be a list")
        outputs = []
        for i, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise InvalidRequest(f"outputs[{i}] must be an object with a 'name'")
            where = f"output '{raw['name']}'"
            params = _parameters(raw, where)
            outputs.append(
                RequestedOutput(raw["name"], _flag(params, "binary_data", default_binary, where))
            )
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise InvalidRequest("an output is requested twice")
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
        # The model's strings are text (see _as_strings), so bytes here are UTF-8.
        return [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
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
