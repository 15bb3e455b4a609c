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
