"""Property-based fuzz of the HTTP API against the real server: nothing answers 5xx, and the
server stays up and correct afterwards."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.conftest import Served

DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "X", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "features", "ids", "mask", "tag", "zzz"]),
        "datatype": st.sampled_from(DATATYPES),
        "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    },
    optional={
        "data": st.lists(
            st.integers(-(2**70), 2**70) | st.floats() | st.booleans() | st.text(max_size=3),
            max_size=12,
        )
        | json_values,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-5, 64) | json_values}
        ),
    },
)
bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, max_size=4) | json_values},
    optional={
        "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2)
        | json_values,
        "parameters": json_values,
        "id": json_values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies,
    tail=st.binary(max_size=48),
    header_len=st.none() | st.integers(-3, 400),
    model=st.sampled_from(["mixed", "mixed", "other"]),
)
def test_no_request_body_gets_a_5xx(
    mixed_server: Served,
    body,
    tail: bytes,  # type: ignore[no-untyped-def]
    header_len: int | None,
    model: str,
) -> None:
    raw = json.dumps(body).encode() + (tail if header_len is not None else b"")
    headers = {"Inference-Header-Content-Length": str(header_len)} if header_len is not None else {}
    r = httpx.post(f"{mixed_server.url}/v2/models/{model}/infer", content=raw, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text, raw[:300])
    assert r.status_code in (200, 400, 404), r.status_code
    if r.status_code != 200:
        assert r.json()["error"]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.binary(max_size=200),
    path=st.sampled_from(
        ["/v2/models/mixed/infer", "/v2/models/mixed/versions/1/infer", "/v2/models/%00/infer"]
    ),
)
def test_arbitrary_bytes_get_a_4xx(mixed_server: Served, raw: bytes, path: str) -> None:
    r = httpx.post(f"{mixed_server.url}{path}", content=raw)
    assert 400 <= r.status_code < 500


def test_server_is_up_and_correct_after_the_fuzz(mixed_server: Served) -> None:
    assert httpx.get(f"{mixed_server.url}/v2/health/ready").status_code == 200
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
            {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [0, 0]},
            {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, True]},
            {"name": "tag", "shape": [1, 1], "datatype": "BYTES", "data": ["ok"]},
        ]
    }
    r = httpx.post(f"{mixed_server.url}/v2/models/mixed/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0]
