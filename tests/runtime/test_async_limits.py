"""What a client can make the asynchronous queue's Redis hold is bounded, with a real
redis-server: a request body over the entry limit is a 413 at submission (inflated bodies
too), a result over the result limit makes a failed request and no large write, and the
dead-letter stream keeps its last entries only. The bytes show in the metrics."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.redis_server import LocalRedis
from tests.runtime.test_async import (
    GROUP,
    KEYS,
    body,
    redis_client,
    start,
    start_gateway,
    wait_done,
)


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = LocalRedis().start()
    yield server.url
    server.stop()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not exported")


def rows_body(rows: int) -> bytes:
    """A request of `rows` rows of zeros: small once gzipped, large as JSON."""
    data = [0.0] * (rows * 4)
    doc = {"inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": data}]}
    return json.dumps(doc).encode()


def test_a_body_over_the_entry_limit_is_413_at_submission_and_never_queued(
    serve, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    gateway = start_gateway(serve, redis_url, KUBEONNX_ASYNC_MAX_ENTRY_BYTES="65536")
    large = rows_body(20_000)  # about 200 KB of JSON
    packed = gzip.compress(large)
    assert len(packed) < 65536 < len(large)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for content, headers in [
            (packed, {"Content-Encoding": "gzip"}),  # small as sent, large as queued
            (large, {}),
        ]:
            refused = http.post(
                "/v2/models/mlp/async-infer",
                content=content,
                headers={"Content-Type": "application/json", **headers},
            )
            assert refused.status_code == 413, refused.text
            error = refused.json()["error"]
            assert "65536" in error and "spec.async.maxEntryBytes" in error, error
        small = json.dumps(body([1, 2, 3, 4])).encode()
        queued = http.post(
            "/v2/models/mlp/async-infer",
            content=small,
            headers={"Content-Type": "application/json"},
        )
        assert queued.status_code == 202, queued.text
    client = redis_client(redis_url)
    assert client.xlen(KEYS.stream) == 1  # only the small one
    assert metric(gateway.url, "kubeonnx_async_submitted_bytes_total") == len(small)


def test_a_result_over_the_result_limit_is_a_failed_request_not_a_write(
    serve, models: dict[str, Path], redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    served = start(serve, models, redis_url, KUBEONNX_ASYNC_MAX_RESULT_BYTES="4096")
    client = redis_client(redis_url)
    with httpx.Client(base_url=served.url, timeout=30) as http:
        large = http.post(
            "/v2/models/mlp/async-infer",
            content=rows_body(500),  # 1,500 output values: far over 4 KB of JSON
            headers={"Content-Type": "application/json"},
        )
        assert large.status_code == 202, large.text
        answer = wait_done(http, large.headers["location"])
        assert answer.status_code == 413, answer.text
        assert answer.headers["kubeonnx-request-status"] == "failed"
        error = answer.json()["error"]
        assert "4096" in error and "spec.async.maxResultBytes" in error, error
        assert client.hstrlen(KEYS.record(large.json()["id"]), "result") < 1024

        small = http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4]))
        done = wait_done(http, small.headers["location"])
        assert done.status_code == 200, done.text
    written = metric(served.url, "kubeonnx_async_result_bytes_total")
    assert len(error) + len(done.content) == written


def test_the_dead_letter_stream_keeps_only_its_newest_entries(
    serve, models: dict[str, Path], redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    gateway = start_gateway(serve, redis_url)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        ids = [
            http.post("/v2/models/mlp/async-infer", json=body([i, 0, 0, 0])).json()["id"]
            for i in range(4)
        ]
    # A replica took all four and died holding them: one delivery each, never acknowledged.
    client = redis_client(redis_url)
    client.xreadgroup(GROUP, "crashed", {KEYS.stream: ">"}, count=4)
    served = start(
        serve,
        models,
        redis_url,
        KUBEONNX_ASYNC_MAX_ATTEMPTS="1",
        KUBEONNX_ASYNC_DEAD_LETTER_MAX_LENGTH="2",
        # One at a time: each completion time is taken in the order the letters are added.
        KUBEONNX_ASYNC_CONCURRENCY="1",
    )
    with httpx.Client(base_url=served.url, timeout=10) as http:
        for request_id in ids:
            failed = wait_done(http, f"/v2/models/mlp/requests/{request_id}")
            assert failed.json()["error"].startswith("gave up after 1 attempts"), failed.text
    dead = client.xrange(KEYS.dead)
    assert len(dead) == 2  # four dead-lettered, the two oldest trimmed
    # Which two: the newest, those dead-lettered last (their records' completion times).
    done = {rid: float(client.hget(KEYS.record(rid), "completed")) for rid in ids}  # type: ignore[arg-type]
    kept = [fields[b"id"].decode() for _, fields in dead]
    trimmed = set(ids) - set(kept)
    assert len(set(kept)) == 2 and set(kept) <= set(ids), kept
    assert min(done[rid] for rid in kept) >= max(done[rid] for rid in trimmed), (kept, done)
    assert [done[rid] for rid in kept] == sorted(done[rid] for rid in kept)  # in order
    assert client.xlen(KEYS.stream) == 0
