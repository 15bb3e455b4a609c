"""OIP codecs: JSON and binary tensors both ways, and the errors a bad body gets."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from kubeonnx_runtime.codec import RequestedOutput, decode_request, encode_response
from kubeonnx_runtime.errors import InvalidRequest


def binary_body(header: dict, *buffers: bytes) -> tuple[bytes, int]:  # type: ignore[type-arg]
    head = orjson.dumps(header)
    return head + b"".join(buffers), len(head)


def test_json_nested_and_flat_data_decode_to_the_same_array() -> None:
    flat = decode_request(
        orjson.dumps(
            {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]}
        ),
        None,
    )
    nested = decode_request(
        orjson.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}
                ]
            }
        ),
        None,
    )
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])
    assert flat.inputs["x"].dtype == np.int64


@pytest.mark.parametrize(
    "datatype", ["FP16", "FP32", "FP64", "INT8", "UINT16", "INT32", "UINT64", "BOOL"]
)
def test_binary_tensors_round_trip(datatype: str) -> None:
    from kubeonnx_runtime.datatypes import OIP_TO_NUMPY

    arr = (np.arange(6) % 2).astype(OIP_TO_NUMPY[datatype]).reshape(2, 3)
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": arr.nbytes},
                }
            ]
        },
        arr.tobytes(),
    )
    req = decode_request(body, n)
    np.testing.assert_array_equal(req.inputs["x"], arr)
    req.outputs = [RequestedOutput("x", binary=True)]
    out, header_len = encode_response("m", "1", req, {"x": arr})
    assert header_len is not None
    header = orjson.loads(out[:header_len])
    assert header["outputs"][0]["datatype"] == datatype
    np.testing.assert_array_equal(np.frombuffer(out[header_len:], arr.dtype).reshape(2, 3), arr)


def test_bytes_tensors_are_length_prefixed() -> None:
    buf = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(buf)},
                }
            ]
        },
        buf,
    )
    assert decode_request(body, n).inputs["s"].tolist() == [b"ab", b"", b"xyz"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}], "out of range"),
        ([{"name": "x", "shape": [2], "datatype": "INT32", "data": [1.5, 2]}], "fractional"),
        ([{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}], "non-numeric"),
        ([{"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 0]}], "true or false"),
        ([{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}], "non-negative"),
        ([{"name": "x", "shape": [2], "datatype": "FP32"}], "neither 'data'"),
        (
            [
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
            ],
            "given twice",
        ),
    ],
)
def test_bad_json_tensors_are_named(inputs: list, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidRequest, match=message):
        decode_request(orjson.dumps({"inputs": inputs}), None)


def test_unclaimed_binary_bytes_are_refused() -> None:
    body, n = binary_body(
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, b"\0\0\0\0"
    )
    with pytest.raises(InvalidRequest, match="no input claims"):
        decode_request(body, n)
