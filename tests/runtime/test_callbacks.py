"""Callbacks of asynchronous requests, with a real redis-server: a URL the HTTP client would
refuse is a 400 at submission (before any charge) and never an entry stuck in the queue; a
callback that never answers holds no inference slot; a refusal does not disclose the
allowlist; a request that failed inside onnxruntime reads the same sanitized error as the
synchronous path."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from kubeonnx_runtime import asyncinfer
from kubeonnx_runtime.asyncinfer import GROUP, AsyncStore, AsyncWorker, check_callback
from kubeonnx_runtime.codec import decode_request
from kubeonnx_runtime.errors import InvalidRequest
from kubeonnx_runtime.quota import key_hash
from onnx import TensorProto, helper, numpy_helper

from e2e.redis_server import LocalRedis
from tests.runtime.test_async import KEYS, body, start_gateway

HOSTS = ["*.example.com", "127.0.0.1:*"]


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = LocalRedis().start()
    yield server.url
    server.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://[",  # urllib raises ValueError: it was a 500
        "http://hooks.example.com:99999/",  # a port out of range
        "http://hooks.example.com:8080a/",
        "http://hooks.example.com:0/",
        "http://xn--.example.com/",  # a bad IDNA label under the wildcard
        "http://xn--a.example.com/",
        "http://a..example.com/",
        "http://hooks.example.com/\r\nX-Injected: 1",
        "http://hooks.example.com%2f/",
        "ftp://hooks.example.com/",
    ],
)
def test_callback_urls_the_http_client_would_refuse_are_invalid_requests(url: str) -> None:
    with pytest.raises(InvalidRequest):
        check_callback(url, HOSTS)


def test_callback_urls_that_are_fine_pass_and_a_refusal_lists_no_allowed_host() -> None:
    for url in [
        "https://hooks.example.com/x?y=1",
        "https://hooks.example.com:443/x",
        "http://127.0.0.1:9/done",
        "http://xn--bcher-kva.example.com/",
    ]:
        check_callback(url, HOSTS)
    with pytest.raises(InvalidRequest) as refused:
        check_callback("http://169.254.169.254/latest", HOSTS)
    message = str(refused.value)
    assert "169.254.169.254" in message and "spec.async.callbackHosts" in message
    assert "example.com" not in message and "127.0.0.1" not in message


def test_a_bad_callback_url_is_a_400_before_the_quota_is_charged(
    serve, redis_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    policy = {
        "policy": "callbacks",
        "namespace": "tests",
        "tenants": [
            {
                "name": "acme",
                "keySha256": [key_hash("acme-key")],
                "limits": [{"unit": "requests", "limit": 1, "window": "1h"}],
            }
        ],
    }
    path = tmp_path / "quota.json"
    path.write_text(json.dumps(policy))
    gateway = start_gateway(
        serve,
        redis_url,
        KUBEONNX_QUOTA_CONFIG=str(path),
        KUBEONNX_ASYNC_CALLBACK_HOSTS=",".join(HOSTS),
    )
    acme = {"X-Api-Key": "acme-key"}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for url in ["http://[", "http://hooks.example.com:99999/", "http://xn--.example.com/"]:
            refused = http.post(
                "/v2/models/mlp/async-infer",
                json=body([1] * 4),
                headers={**acme, "Kubeonnx-Callback-Url": url},
            )
            assert refused.status_code == 400, (url, refused.text)
            assert "not a valid URL" in refused.json()["error"]
        other = http.post(
            "/v2/models/mlp/async-infer",
            json=body([1] * 4),
            headers={**acme, "Kubeonnx-Callback-Url": "http://10.0.0.1/"},
        )
        assert other.status_code == 400
        assert "example.com" not in other.json()["error"]
        # None of the refusals used the tenant's one request.
        queued = http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=acme)
        assert queued.status_code == 202, queued.text


def worker(client: Any, infer: Any, *, concurrency: int = 2, **options: Any) -> AsyncWorker:
    return AsyncWorker(
        client,
        KEYS,
        decode=decode_request,
        infer=infer,
        model_name="mlp",
        model_version="1",
        max_attempts=options.pop("max_attempts", 3),
        result_ttl_s=60,
        claim_after_s=options.pop("claim_after_s", 60),
        concurrency=concurrency,
        **options,
    )


async def zeros(request: object) -> dict[str, np.ndarray]:
    return {"output": np.zeros((1, 3), np.float32)}


async def wait_status(store: AsyncStore, request_id: str) -> Any:
    deadline = time.monotonic() + 30
    while (record := await store.lookup(request_id, None)).status == "pending":
        assert time.monotonic() < deadline, f"request {request_id} still pending"
        await asyncio.sleep(0.05)
    return record


async def test_an_entry_whose_callback_the_client_refuses_is_answered_and_acknowledged(
    redis_url: str,
) -> None:
    """An entry queued before its URL was checked this strictly (an older replica): the
    worker answers it, gives up on the callback, and acknowledges it, instead of leaving it
    pending and redelivered forever."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    await client.xgroup_create(KEYS.stream, GROUP, id="0", mkstream=True)
    ids = []
    for url in ["http://xn--.example.com/", "http://hooks.example.com:99999/"]:
        request_id = f"old{len(ids)}"
        await client.hset(KEYS.record(request_id), mapping={"status": "pending", "attempts": 0})
        await client.xadd(
            KEYS.stream,
            {"id": request_id, "body": json.dumps(body([1] * 4)), "hl": "", "callback": url},
        )
        ids.append(request_id)
    store = AsyncStore(client, KEYS, max_queued=10, callback_hosts=HOSTS)
    consumer = worker(client, zeros)
    task = asyncio.create_task(consumer.run())
    try:
        for request_id in ids:
            assert (await wait_status(store, request_id)).status == "done"
        deadline = time.monotonic() + 30
        while await client.xlen(KEYS.stream):
            assert time.monotonic() < deadline, "the entries were never acknowledged"
            await asyncio.sleep(0.05)
        assert (await client.xpending(KEYS.stream, GROUP))["pending"] == 0
    finally:
        consumer.stop()
        await task
        await client.aclose()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


async def test_callbacks_that_never_answer_hold_no_inference_slot(
    redis_url: str, blackhole: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots, two requests whose callbacks hang (for longer than the test waits): a third
    request, from anyone, is still answered. The hung callbacks' entries stay pending when
    the worker stops, so another replica calls back: at least once still holds."""
    import redis.asyncio as aioredis

    monkeypatch.setattr(asyncinfer, "CALLBACK_TIMEOUT_S", 600.0)
    monkeypatch.setattr(asyncinfer, "CALLBACK_DEADLINE_S", 600.0)
    monkeypatch.setattr(asyncinfer, "CALLBACK_STOP_S", 0.5)
    client = aioredis.Redis.from_url(redis_url)
    store = AsyncStore(client, KEYS, max_queued=10, callback_hosts=HOSTS)
    payload = json.dumps(body([1] * 4)).encode()
    hung = [
        await store.submit(payload, None, tenant="", callback=f"http://127.0.0.1:{blackhole}/done")
        for _ in range(2)
    ]
    consumer = worker(client, zeros, concurrency=2, callback_hosts=HOSTS)
    task = asyncio.create_task(consumer.run())
    try:
        for request_id in hung:  # answered; their callbacks are hanging now
            assert (await wait_status(store, request_id)).status == "done"
        other = await store.submit(payload, None, tenant="", callback=None)
        assert (await wait_status(store, other)).status == "done"
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
    assert (await client.xpending(KEYS.stream, GROUP))["pending"] == 2
    await client.aclose()


def reshape_session() -> ort.InferenceSession:
    """A model that fails inside onnxruntime (not on its input's shape or type) for any
    request: its error text carries source paths and C++ signatures."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["output"])],
        "fails",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([3, 3], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


async def test_a_dead_lettered_request_shows_the_sanitized_error_of_the_sync_path(
    redis_url: str,
) -> None:
    import redis.asyncio as aioredis

    session = reshape_session()

    async def run(request: Any) -> dict[str, np.ndarray]:
        return {"output": session.run(None, dict(request.inputs))[0]}

    client = aioredis.Redis.from_url(redis_url)
    store = AsyncStore(client, KEYS, max_queued=10, callback_hosts=[])
    request_id = await store.submit(
        json.dumps(body([1] * 4)).encode(), None, tenant="", callback=None
    )
    consumer = worker(client, run, max_attempts=1, claim_after_s=0.2)
    task = asyncio.create_task(consumer.run())
    try:
        record = await wait_status(store, request_id)
    finally:
        consumer.stop()
        await task
    error = record.result.decode()
    # What the synchronous path answers for the same failure: the request's id, no detail.
    assert error == f"gave up after 1 attempts: internal error (request {request_id})", error
    dead = await client.xrange(KEYS.dead)
    assert dead[0][1][b"reason"].decode() == error
    await client.aclose()
