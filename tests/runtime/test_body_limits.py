"""The JSON limit (KUBEONNX_MAX_JSON_BYTES), against the real server: what becomes Python
objects (a request's JSON, its BYTES tensors sent as binary data) is bounded apart from the
body; numeric tensors sent as binary data are not, so large inputs still travel."""

from __future__ import annotations

import gc
import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from kubeonnx_runtime.codec import decode_request
from kubeonnx_runtime.datatypes import TensorSpec

from tests.runtime.conftest import Served, start_server

JSON_LIMIT = 1024 * 1024
INFER = "/v2/models/mixed/infer"
NAMES_IT = "the request's JSON is over the limit of 1048576 bytes (--max-json-bytes)"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Served]:
    served = start_server(
        tmp_path_factory.mktemp("limited"),
        *("--model-uri", f"file://{models['mixed']}", "--model-name", "mixed"),
        env={"KUBEONNX_MAX_JSON_BYTES": str(JSON_LIMIT)},
    )
    yield served
    served.stop()


def json_request(rows: int) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": [rows, 4],
                    "data": [0.5] * 4 * rows,
                },
                {"name": "ids", "datatype": "INT64", "shape": [rows, 2], "data": [7] * 2 * rows},
                {"name": "mask", "datatype": "BOOL", "shape": [rows, 2], "data": [True] * 2 * rows},
                {"name": "tag", "datatype": "BYTES", "shape": [rows, 1], "data": ["t"] * rows},
            ]
        }
    ).encode()


def binary_request(rows: int, tag: bytes = b"t", pad_id: int = 0) -> tuple[bytes, int]:
    """Every input as binary data; `pad_id` characters of request id make the JSON header
    as long as wanted."""
    buffers = [
        np.full((rows, 4), 0.5, np.float32).tobytes(),
        np.full((rows, 2), 7, np.int64).tobytes(),
        np.ones((rows, 2), np.bool_).tobytes(),
        (struct.pack("<I", len(tag)) + tag) * rows,
    ]
    specs = [("features", "FP32", 4), ("ids", "INT64", 2), ("mask", "BOOL", 2), ("tag", "BYTES", 1)]
    header: dict[str, object] = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": [rows, width],
                "parameters": {"binary_data_size": len(buf)},
            }
            for (name, datatype, width), buf in zip(specs, buffers, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    if pad_id:
        header["id"] = "x" * pad_id
    head = json.dumps(header).encode()
    return head + b"".join(buffers), len(head)


def post_binary(served: Served, body: bytes, header_length: int) -> httpx.Response:
    return httpx.post(
        f"{served.url}{INFER}",
        content=body,
        headers={"Inference-Header-Content-Length": str(header_length)},
        timeout=60,
    )


def test_json_within_the_limit_is_served(limited: Served) -> None:
    body = json_request(10_000)
    assert len(body) < JSON_LIMIT
    r = httpx.post(f"{limited.url}{INFER}", content=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"][:2] == [2.0, 2.0]


def test_json_over_the_limit_is_refused(limited: Served) -> None:
    body = json_request(40_000)
    assert len(body) > JSON_LIMIT
    r = httpx.post(f"{limited.url}{INFER}", content=body, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"].startswith(NAMES_IT)


def test_gzip_json_is_refused_once_it_inflates_past_the_limit(limited: Served) -> None:
    """Tens of KB that inflate to tens of MB of JSON: refused while inflating, not parsed."""
    body = gzip.compress(json_request(1_500_000), 9)
    assert len(body) < 200_000
    r = httpx.post(
        f"{limited.url}{INFER}", content=body, headers={"Content-Encoding": "gzip"}, timeout=60
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"].startswith(NAMES_IT)
    small = gzip.compress(json_request(10))
    ok = httpx.post(f"{limited.url}{INFER}", content=small, headers={"Content-Encoding": "gzip"})
    assert ok.status_code == 200, ok.text


def test_gzip_json_inflation_stops_at_the_json_limit_not_the_body_limit(
    limited: Served,
) -> None:
    """Where inflation stops shows in the answer: a gzip stream cut short past 3 MB of JSON
    (over the 1 MiB JSON limit, far under the 64 MiB body limit) is refused as over the JSON
    limit, since no more than that is inflated; inflating on towards the body limit would
    reach the cut and answer that the body is truncated gzip."""
    whole = json_request(80_000)
    assert 3 * JSON_LIMIT < len(whole) < 64 * JSON_LIMIT
    compressed = gzip.compress(whole, 9)
    cut = compressed[: len(compressed) - 64]  # no trailer, and the last of the data gone
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert len(inflater.decompress(cut)) > 2 * JSON_LIMIT and not inflater.eof
    r = httpx.post(
        f"{limited.url}{INFER}", content=cut, headers={"Content-Encoding": "gzip"}, timeout=60
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"].startswith(NAMES_IT)


def test_a_binary_requests_json_header_is_bounded_too(limited: Served) -> None:
    body, header_length = binary_request(10, pad_id=JSON_LIMIT + 1)
    r = post_binary(limited, body, header_length)
    assert r.status_code == 413, r.text
    assert r.json()["error"].startswith(NAMES_IT)


def test_bytes_tensors_sent_as_binary_count_towards_the_json_limit(limited: Served) -> None:
    """A BYTES element becomes a Python object whatever its encoding: 300,000 empty strings
    are 1.2 MB of binary data and some 15 MB of objects."""
    body, header_length = binary_request(300_000, tag=b"")
    r = post_binary(limited, body, header_length)
    assert r.status_code == 413, r.text
    assert "input 'tag': the request's JSON and BYTES tensors are over the limit" in r.text


def test_numeric_binary_tensors_are_not_bound_by_the_json_limit(limited: Served) -> None:
    rows = 150_000  # 5.4 MB of numbers, 750 KB of BYTES
    body, header_length = binary_request(rows)
    assert len(body) > 4 * JSON_LIMIT
    r = post_binary(limited, body, header_length)
    assert r.status_code == 200, r.text
    head = json.loads(r.content[: int(r.headers["inference-header-content-length"])])
    assert head["outputs"][0]["shape"] == [rows, 1]


def test_decoding_json_sets_off_no_garbage_collection() -> None:
    """Parsed JSON is acyclic; each of its lists still counted towards the collector's
    thresholds, and the collections they set off (passes over the whole heap, holding the
    GIL) took 1.8 s of a 0.2 s parse of 2 MB of nested lists."""
    count = 600_000
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d,0],"data":[' % count
    body += b"[]," * (count - 1) + b"[]]}]}"
    collections: list[str] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(f"generation {info['generation']}")

    gc.callbacks.append(seen)
    try:
        request = decode_request(body, None, {"x": TensorSpec("x", "FP32", (-1, 0))})
    finally:
        gc.callbacks.remove(seen)
    assert request.inputs["x"].shape == (count, 0)
    assert collections == []
    assert gc.isenabled()
