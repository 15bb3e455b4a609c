"""JSON tensor data for the float datatypes (and the integer ones, for booleans and nulls): what
the decode accepts, what it refuses, and the values it makes. Each case runs on a short list
(the codec checks up to 32 numbers one by one) and on longer ones (a convnet image is 3,072), so
a faster path for either is held to the same answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from kubeonnx_runtime.codec import decode_request
from kubeonnx_runtime.errors import InvalidRequest

LENGTHS = [8, 40, 3072]
FLOATS = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def decode(datatype: str, data: Any, shape: list[int] | None = None) -> np.ndarray:
    tensor = {"name": "x", "datatype": datatype, "data": data}
    tensor["shape"] = shape if shape is not None else [len(data)]
    return decode_request(orjson.dumps({"inputs": [tensor]}), None).inputs["x"]


def padded(n: int, *items: Any) -> list[Any]:
    """`items` first, then plain floats up to `n` elements."""
    return [*items, *(0.25 * i for i in range(n - len(items)))]


def as_float64(data: list[Any]) -> np.ndarray:
    """Each JSON number exactly as a double, the one rounding from it to the datatype left."""
    return np.array([float(v) for v in data], dtype=np.float64)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("datatype", FLOATS)
def test_floats_are_rounded_once_to_the_datatype(datatype: str, n: int) -> None:
    rng = np.random.default_rng(n)
    data = padded(n, -0.0, 5e-324, 1e-45, 65504.0, -65504.0, 1 / 3)
    data[6:] = (rng.standard_normal(n - 6) * 10.0 ** rng.integers(-8, 4, n - 6)).tolist()
    got = decode(datatype, data)
    want = as_float64(data).astype(FLOATS[datatype])
    assert got.dtype == FLOATS[datatype] and got.shape == (n,)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays negative


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("datatype", FLOATS)
def test_integers_are_accepted_alone_or_among_floats(datatype: str, n: int) -> None:
    dtype = FLOATS[datatype]
    large = [2**53 + 1, 2**63, 2**64 - 1, -(2**63)] if datatype != "FP16" else [65504]
    mixed = padded(n, 0.5, 1, -2, 0, *large)
    np.testing.assert_array_equal(decode(datatype, mixed), as_float64(mixed).astype(dtype))
    first = padded(n, 3, 0.5, -7)  # an integer first, as JavaScript writes 3.0
    np.testing.assert_array_equal(decode(datatype, first), as_float64(first).astype(dtype))
    ints = [(i * 1009) % 60001 - 30000 for i in range(n)]
    np.testing.assert_array_equal(decode(datatype, ints), np.array(ints).astype(dtype))


def with_item(data: list[Any], at: int, item: Any) -> list[Any]:
    data = list(data)
    data[at] = item
    return data


def nested(data: list[Any]) -> list[Any]:
    """`data` as rows of two, as a [n/2, 2] tensor is often sent."""
    return [data[i : i + 2] for i in range(0, len(data), 2)]


# Where a boolean sits decides which path of the decode meets it.
WITH_BOOLEANS = {
    "only booleans": lambda numbers: [i % 2 == 0 for i in range(len(numbers))],
    "second": lambda numbers: with_item(numbers, 1, True),  # after a float: a long list's fast path
    "last": lambda numbers: with_item(numbers, -1, False),
    "first": lambda numbers: with_item(numbers, 0, True),  # numpy's path
    "among integers": lambda numbers: [True, 2] * (len(numbers) // 2),
    "nested": lambda numbers: nested(with_item(numbers, len(numbers) // 2, False)),
}


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("case", WITH_BOOLEANS)
@pytest.mark.parametrize("datatype", [*FLOATS, "INT8", "INT32", "INT64", "UINT8", "UINT64"])
def test_booleans_are_refused_alone_or_among_numbers(datatype: str, case: str, n: int) -> None:
    numbers = padded(n) if datatype in FLOATS else [i % 5 for i in range(n)]
    with pytest.raises(InvalidRequest, match=f"booleans given for datatype {datatype}"):
        decode(datatype, WITH_BOOLEANS[case](numbers), shape=[n])


@pytest.mark.parametrize("n", LENGTHS)
def test_booleans_among_integers_beyond_64_bits_are_refused(n: int) -> None:
    # Integers of both signs beyond int64 make numpy keep the Python objects.
    data = with_item(with_item([2**63 + i for i in range(n)], 0, -1), -1, True)
    with pytest.raises(InvalidRequest, match="booleans given for datatype INT64"):
        decode("INT64", data)


@pytest.mark.parametrize("n", LENGTHS)
def test_numbers_among_booleans_are_refused_for_bool(n: int) -> None:
    flags = [i % 3 == 0 for i in range(n)]
    for item in (1, 0, 0.5, 1.0, None):
        for data in (with_item(flags, -1, item), with_item(flags, 0, item)):
            with pytest.raises(InvalidRequest, match="BOOL data must be true or false"):
                decode("BOOL", data)
            with pytest.raises(InvalidRequest, match="BOOL data must be true or false"):
                decode("BOOL", nested(data), shape=[n])
    np.testing.assert_array_equal(decode("BOOL", nested(flags), shape=[n]), flags)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("datatype", [*FLOATS, "INT8", "INT32", "INT64", "UINT64"])
def test_null_is_refused_as_not_a_number(datatype: str, n: int) -> None:
    numbers = padded(n) if datatype in FLOATS else [i % 5 for i in range(n)]
    message = f"'data' holds null, which is not a number of datatype {datatype}"
    for data in (
        with_item(numbers, 1, None),
        with_item(numbers, 0, None),
        with_item(numbers, -1, None),
        [None] * n,
        nested(with_item(numbers, n // 2, None)),
    ):
        with pytest.raises(InvalidRequest, match=message):
            decode(datatype, data, shape=[n])
    with pytest.raises(InvalidRequest, match=message):
        decode(datatype, None, shape=[])  # "data": null


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize(
    ("where", "item", "message"),
    [
        (0, "1.5", "non-numeric values for datatype FP32"),  # a number as text is not read
        (-1, "1.5", "non-numeric values for datatype FP32"),
        (-1, "a", "non-numeric values for datatype FP32"),
        (-1, {}, "non-numeric values for datatype FP32"),
        (-1, None, "holds null, which is not a number of datatype FP32"),
        (-1, [1.0], "ragged nested list"),
    ],
)
def test_values_that_are_not_numbers_are_refused(
    n: int, where: int, item: Any, message: str
) -> None:
    data = padded(n)
    data[where] = item
    with pytest.raises(InvalidRequest, match=message):
        decode("FP32", data)


@pytest.mark.parametrize("n", LENGTHS)
def test_the_count_is_checked_before_any_value(n: int) -> None:
    with pytest.raises(InvalidRequest, match=f"{n - 1} elements of data for a shape of {n}"):
        decode("FP32", padded(n - 1, "a", None, True), shape=[n])
    with pytest.raises(InvalidRequest, match=f"{n + 1} elements of data for a shape of {n}"):
        decode("FP32", padded(n + 1), shape=[n])


def test_nesting_is_counted_and_its_depth_bounded() -> None:
    nested = [[0.25 * i] for i in range(40)]  # deeper than the shape, the same elements
    np.testing.assert_array_equal(decode("FP32", nested), np.arange(40, dtype=np.float32) / 4)
    deep: Any = 0.5
    for _ in range(70):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="ragged nested list"):
        decode("FP32", deep, shape=[1])
    assert decode("FP32", 0.5, shape=[]).shape == ()  # a bare number is one element


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize(
    ("datatype", "item"),
    [
        ("FP32", 3.5e38),
        ("FP32", -1e39),
        ("FP32", 1e300),
        ("FP16", 70000.0),
        ("FP16", 70000),
        ("FP16", -(2**63)),
    ],
)
def test_values_beyond_the_datatype_are_refused(n: int, datatype: str, item: Any) -> None:
    with pytest.raises(InvalidRequest, match=f"out of range for datatype {datatype}"):
        decode(datatype, padded(n, 0.5, item))


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize(
    ("datatype", "fits", "overflows"),
    [
        # The largest values that round to the datatype's largest, and the smallest that
        # round to infinity: the server's own FP32 maximum, printed, is the first.
        ("FP32", 3.4028235e38, float(2**128 - 2**103)),
        ("FP16", 65519.0, 65520.0),
    ],
)
def test_a_value_that_rounds_to_the_largest_is_taken_and_one_that_rounds_past_it_refused(
    n: int, datatype: str, fits: float, overflows: float
) -> None:
    largest = np.finfo(FLOATS[datatype]).max
    for sign in (1, -1):
        got = decode(datatype, padded(n, 0.5, sign * fits))
        assert got[1] == sign * largest, (got[1], sign * largest)
        with pytest.raises(InvalidRequest, match=f"out of range for datatype {datatype}"):
            decode(datatype, padded(n, 0.5, sign * overflows))
    # Nested, the same answers.
    assert decode(datatype, [[0.5, fits]], [1, 2]).ravel()[1] == largest


def test_json_cannot_carry_nan_or_infinity() -> None:
    for number in (b"NaN", b"Infinity", b"1e400", b"-1e400"):
        body = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [0.5, %s]}]}'
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            decode_request(body % number, None)


@pytest.mark.parametrize("n", LENGTHS)
def test_an_integer_past_any_double_is_refused_by_name(n: int) -> None:
    """orjson refuses such an integer in a body today; the codec does not count on it."""
    from kubeonnx_runtime.codec import _decode_json_data

    with pytest.raises(InvalidRequest, match="out of range for datatype FP64"):
        _decode_json_data(padded(n, 1.5, 10**400), "FP64", n, "input 'x'")
