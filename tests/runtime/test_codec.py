"""OIP codecs: JSON and binary tensors both ways, and the errors a bad body gets."""

from __future__ import annotations

import json
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


def _json_request(*inputs: dict, parameters: dict | None = None) -> bytes:  # type: ignore[type-arg]
    return json.dumps({"inputs": list(inputs), "parameters": parameters or {}}).encode()


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("UINT64", [1, 2**63, 2**64 - 1]),  # numpy reads these as floats: exactness matters
        ("INT64", [-(2**63), 2**63 - 1, 0]),
        ("INT32", []),  # zero rows: numpy calls an empty list float64
        ("UINT8", []),
        ("FP32", []),
    ],
)
def test_integers_are_decoded_exactly_and_empty_tensors_are_fine(
    datatype: str, data: list[int]
) -> None:
    shape = [len(data)] if data else [0, 4]
    req = decode_request(
        _json_request({"name": "x", "shape": shape, "datatype": datatype, "data": data}), None
    )
    assert req.inputs["x"].shape == tuple(shape)
    assert [int(v) for v in req.inputs["x"].ravel()] == data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            _json_request({"name": "x", "shape": [1], "datatype": "UINT64", "data": [2**64]}),
            "out of range",
        ),
        (
            _json_request({"name": "x", "shape": [2], "datatype": "UINT64", "data": [-1, 2**63]}),
            "out of range",
        ),
        (
            _json_request({"name": "x", "shape": [2], "datatype": "INT64", "data": [1, 2.5]}),
            "fractional",
        ),
        (
            _json_request({"name": "x", "shape": [1], "datatype": "FP32", "data": [1e39]}),
            "out of range for datatype FP32",
        ),
        (
            _json_request({"name": "x", "shape": [1], "datatype": "FP16", "data": [70000]}),
            "out of range for datatype FP16",
        ),
        (
            _json_request(
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                parameters={"binary_data_output": "false"},
            ),
            "'binary_data_output' must be true or false",
        ),
        (
            orjson.dumps(
                {
                    "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                    "outputs": [{"name": "y", "parameters": {"binary_data": 1}}],
                }
            ),
            "'binary_data' must be true or false",
        ),
        (
            _json_request({"name": "x", "shape": [1] * 70, "datatype": "FP32", "data": [1]}),
            "70 dimensions",
        ),
        (
            _json_request({"name": "x", "shape": [0, 2**62], "datatype": "FP32", "data": []}),
            "too large",
        ),
        (
            _json_request({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [0] * 10**6}),
            "1000000 elements of data for a shape of 4",
        ),
    ],
)
def test_values_that_do_not_fit_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_request(body, None)


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    body, n = binary_body(
        {
            "inputs": [
                {
                    "name": "b",
                    "shape": [2],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 2},
                }
            ]
        },
        b"\x01\x02",
    )
    with pytest.raises(InvalidRequest, match="BOOL bytes must be 0 or 1"):
        decode_request(body, n)


def test_inputs_are_checked_against_the_model_before_their_data_is_read() -> None:
    from kubeonnx_runtime.datatypes import TensorSpec

    model = {"x": TensorSpec("x", "FP32", (-1, 4)), "y": TensorSpec("y", "INT64", (-1,))}
    # The data is not even numbers: only the datatype check can have refused it.
    wrong_type = {"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": ["a"] * 4}
    wrong_shape = {"name": "x", "shape": [1, 5], "datatype": "FP32", "data": "junk"}
    unknown = {"name": "z", "shape": [1], "datatype": "FP32", "data": "junk"}
    for tensor, message in [
        (wrong_type, "has datatype BYTES; the model takes FP32"),
        (wrong_shape, r"has shape \[1, 5\]; the model takes \[-1, 4\]"),
        (unknown, "unknown input 'z'; the model's inputs are x, y"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            decode_request(_json_request(tensor), None, model)
    only_x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    with pytest.raises(InvalidRequest, match="missing input 'y'"):
        decode_request(_json_request(only_x), None, model)


def test_dimensions_the_model_names_alike_take_one_size_across_inputs() -> None:
    from kubeonnx_runtime.datatypes import TensorSpec

    named = ((0, "batch"), (1, "seq"))
    model = {
        "ids": TensorSpec("ids", "INT64", (-1, -1), named),
        "mask": TensorSpec("mask", "INT64", (-1, -1), named),
    }

    def request(ids_shape: list[int], mask_shape: list[int]) -> bytes:
        ids = list(range(ids_shape[0] * ids_shape[1]))
        return _json_request(
            {"name": "ids", "shape": ids_shape, "datatype": "INT64", "data": ids},
            {"name": "mask", "shape": mask_shape, "datatype": "INT64", "data": "junk"},
        )

    # Refused before the mask's data (not numbers) is read.
    for ids_shape, mask_shape, message in [
        ([1, 3], [1, 1], "input 'mask' has 1 in dimension 1 and input 'ids' has 3 in dimension 1"),
        ([1, 3], [1, 0], "input 'mask' has 0 in dimension 1 and input 'ids' has 3"),
        ([2, 3], [1, 3], "input 'mask' has 1 in dimension 0 and input 'ids' has 2"),
    ]:
        with pytest.raises(InvalidRequest, match=message + ".*dimension '(seq|batch)'"):
            decode_request(request(ids_shape, mask_shape), None, model)
    ok = _json_request(
        {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
        {"name": "mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 0]},
    )
    assert decode_request(ok, None, model).inputs["mask"].shape == (1, 2)
