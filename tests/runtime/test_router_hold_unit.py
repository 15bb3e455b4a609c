"""The router's holding in one process: its configuration's bounds, a held request whose
connection is refused, and the probe's recheck."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubeonnx_runtime.router import Router, RouterConfig, RouterMetrics
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from e2e.cluster import free_port

VERSIONS = [{"name": "1", "url": "http://127.0.0.1:9", "weight": 100}]


@pytest.mark.parametrize(
    "field",
    [
        {"max_held_requests": True},
        {"max_held_requests": "7"},
        {"max_held_requests": 2001},  # ~140 KiB each: over the router's 512 MiB
        {"max_hold_s": True},
        {"max_hold_s": 1e-9},
        {"max_hold_s": "60"},
        {"timeout_s": 1e308},
        {"timeout_s": False},
    ],
)
def test_hold_bounds_of_another_type_or_out_of_range_are_refused(field: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RouterConfig.model_validate({"versions": VERSIONS, **field})


def test_hold_bounds_in_range_are_taken() -> None:
    config = RouterConfig.model_validate(
        {"versions": VERSIONS, "max_held_requests": 2000, "max_hold_s": 1, "timeout_s": 3600}
    )
    assert (config.max_held_requests, config.max_hold_s, config.timeout_s) == (2000, 1, 3600)


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = [
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    ]
    await reader.readexactly(length[0] if length else 0)
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    await writer.drain()
    writer.close()


async def test_a_held_request_whose_connection_is_refused_is_held_again() -> None:
    """Woken by a good probe, its connection refused (nothing reached the version): it is
    held again while its max_hold_s lasts, and forwarded once the version answers."""
    port = free_port()
    config = RouterConfig.model_validate(
        {
            "model": "mlp",
            "versions": [{"name": "1", "url": f"http://127.0.0.1:{port}", "weight": 100}],
            "probe_interval_s": 0.2,
            "max_hold_s": 600,
        }
    )
    router = Router(config, RouterMetrics(CollectorRegistry()), None)
    upstream = router.upstreams[0]
    body = json.dumps({"inputs": []}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/mlp/infer",
        "raw_path": b"/v2/models/mlp/infer",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    def holds(outcome: str) -> float:
        return router.metrics.holds.labels(outcome)._value.get()  # type: ignore[no-any-return]

    async def until(check: Any) -> None:
        # asyncio.timeout, not wait_for: 3.11's wait_for runs the wait in a task of its own,
        # whose extra loop iterations would let a check that is true too early pass anyway.
        async with asyncio.timeout(60):
            while not check():  # noqa: ASYNC110 (the router's own state, no event to wait on)
                await asyncio.sleep(0.01)

    request = asyncio.create_task(router(scope, receive, send))  # type: ignore[arg-type]
    await until(lambda: router.held == 1)
    router.set_ready(upstream, True)  # a good probe; nothing listens on the port
    # Woken (its first hold ended "forwarded"), its connection refused: held once more, or
    # (were it not held again) answered 502. The first hold already set the recheck, so
    # that says nothing; the hold's count does.
    await until(lambda: holds("forwarded") == 1 and (router.held == 1 or request.done()))
    assert sent == [], sent  # held again, not a 502
    router.set_ready(upstream, False)
    server = await asyncio.start_server(_answer_ok, "127.0.0.1", port)
    try:
        router.set_ready(upstream, True)
        await asyncio.wait_for(request, 60)
    finally:
        server.close()
        router.pool.close()
    assert sent[0]["status"] == 200
    assert router.held == 0
    assert holds("forwarded") == 2  # held again: counted once more


async def test_a_recheck_asked_during_a_probe_makes_another_probe() -> None:
    """The probe clears its recheck before probing: one asked for meanwhile is not lost."""
    config = RouterConfig.model_validate({"versions": VERSIONS, "probe_interval_s": 60})
    router = Router(config, RouterMetrics(CollectorRegistry()), None)
    upstream = router.upstreams[0]
    probes = 0
    first, second = asyncio.Event(), asyncio.Event()

    async def fetch(*args: Any) -> int:
        nonlocal probes
        probes += 1
        if probes == 1:
            upstream.recheck.set()  # asked for while this probe runs
        (first if probes == 1 else second).set()
        return 200

    router.fetch = fetch  # type: ignore[method-assign]
    task = asyncio.create_task(router.probe(upstream))
    try:
        await asyncio.wait_for(first.wait(), 60)
        # Not at the next interval (60 s): at once, well within half of it.
        await asyncio.wait_for(second.wait(), 30)
    finally:
        task.cancel()


def _request(path: str = "/v2/models/mlp/infer") -> tuple[dict[str, Any], Any, Any, list]:  # type: ignore[type-arg]
    """An ASGI POST to `path`, its receive and send, and what was sent."""
    body = b"{}"
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return scope, receive, send, sent


def _router(**config: Any) -> Router:
    return Router(
        RouterConfig.model_validate({"model": "mlp", "versions": VERSIONS, **config}),
        RouterMetrics(CollectorRegistry()),
        None,
    )


async def test_the_first_request_held_has_every_version_probed_at_once() -> None:
    """Not at the next interval (60 s here): the hold asks each version's probe now."""
    router = _router(probe_interval_s=60, max_hold_s=600)
    probes = [asyncio.Event(), asyncio.Event()]
    count = 0

    async def fetch(*args: Any) -> int:
        nonlocal count
        count += 1
        probes[min(count, 2) - 1].set()
        return 503  # never ready: the request stays held

    router.fetch = fetch  # type: ignore[method-assign]
    await router.start()
    try:
        await asyncio.wait_for(probes[0].wait(), 60)  # the start's probe
        scope, receive, send, _ = _request()
        request = asyncio.create_task(router(scope, receive, send))  # type: ignore[arg-type]
        await asyncio.wait_for(probes[1].wait(), 30)  # well within half the interval
        assert router.held == 1
        request.cancel()
    finally:
        await router.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/mlp/infer",
        "/v2/models/mlp/async-infer",
        "/v2/models/mlp/predict",
        "/v2/models/mlp/predict/batch",
        "/v2/models/mlp/versions/1/infer",
        "/v2/models/mlp/versions/1/predict",
    ],
)
def test_every_way_to_run_the_model_is_held(path: str) -> None:
    router = _router()
    scope, *_ = _request(path)
    assert router.holdable(scope, "")


async def test_retry_after_is_the_probe_interval_rounded_up_when_longer_than_5_s() -> None:
    router = _router(probe_interval_s=7.2, max_held_requests=0)
    scope, receive, send, sent = _request()
    await router(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 503
    assert dict(sent[0]["headers"])[b"retry-after"] == b"8"


async def test_a_request_arriving_while_the_router_stops_is_answered_503_at_once() -> None:
    router = _router(probe_interval_s=60, max_hold_s=600)  # "at once": not at a probe
    router.stopping.set()  # SIGTERM: uvicorn still takes requests during its shutdown
    scope, receive, send, sent = _request()
    await asyncio.wait_for(router(scope, receive, send), 30)  # type: ignore[arg-type]
    assert sent[0]["status"] == 503
    assert dict(sent[0]["headers"])[b"retry-after"] == b"60"  # the probe interval
    assert b"the router is shutting down" in sent[1]["body"]
    assert router.metrics.holds.labels("shutdown")._value.get() == 1
