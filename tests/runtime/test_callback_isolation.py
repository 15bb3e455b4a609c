"""Callbacks under a hostile tenant: one tenant's hanging callbacks leave the others' to be
made, a callback over the caps waits locally rather than for the claim, a huge answer is
never read, and the allowlist holds at delivery (ports, and names that resolve inward)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from kubeonnx_runtime import asyncinfer
from kubeonnx_runtime.asyncinfer import AsyncStore, Callbacks, check_callback
from kubeonnx_runtime.errors import InvalidRequest

from tests.runtime.test_async import KEYS, body
from tests.runtime.test_callbacks import (  # noqa: F401 (fixtures)
    blackhole,
    redis_url,
    wait_status,
    worker,
    zeros,
)


class Hook:
    """A callback receiver on 127.0.0.1: counts the requests; `endless` answers 200 with a
    body that never ends (as fast as the client reads it), counting the bytes sent."""

    def __init__(self, endless: bool = False) -> None:
        self.endless = endless
        self.received: list[bytes] = []
        self.sent = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Hook:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ),
                0,
            )
            self.received.append(await reader.readexactly(length))
            if not self.endless:
                writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
            chunk = b"x" * 65536
            while True:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(chunk)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    async with Hook() as server:
        yield server


async def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_one_tenants_hanging_callbacks_leave_the_others_to_be_made(
    redis_url: str,  # noqa: F811
    blackhole: int,  # noqa: F811
    hook: Hook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis.asyncio as aioredis

    monkeypatch.setattr(asyncinfer, "CALLBACK_TIMEOUT_S", 600.0)
    monkeypatch.setattr(asyncinfer, "CALLBACK_DEADLINE_S", 600.0)
    monkeypatch.setattr(asyncinfer, "CALLBACK_STOP_S", 0.5)
    hosts = ["127.0.0.1:*"]
    client = aioredis.Redis.from_url(redis_url)
    store = AsyncStore(client, KEYS, max_queued=20, callback_hosts=hosts)
    payload = json.dumps(body([1] * 4)).encode()
    consumer = worker(client, zeros, concurrency=4, max_callbacks=4, callback_hosts=hosts)
    task = asyncio.create_task(consumer.run())
    try:
        for _ in range(6):  # more than every callback slot, to a port that never answers
            hung = await store.submit(
                payload, None, tenant="mallory", callback=f"http://127.0.0.1:{blackhole}/"
            )
        await wait_status(store, hung)
        other = await store.submit(
            payload, None, tenant="alice", callback=f"http://127.0.0.1:{hook.port}/"
        )
        await wait_for(lambda: hook.received, "alice's callback was never made")
        assert json.loads(hook.received[0])["id"] == other
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
        await client.aclose()


async def test_callbacks_over_the_cap_wait_locally_and_are_all_made(
    redis_url: str,  # noqa: F811
    hook: Hook,
) -> None:
    """Twice as many callbacks as slots, claim_after far away: each is made, from the local
    queue, without waiting for its entry to be claimed again."""
    import redis.asyncio as aioredis

    hosts = ["127.0.0.1:*"]
    client = aioredis.Redis.from_url(redis_url)
    store = AsyncStore(client, KEYS, max_queued=20, callback_hosts=hosts)
    payload = json.dumps(body([1] * 4)).encode()
    outcomes: list[str] = []
    consumer = worker(
        client,
        zeros,
        concurrency=4,
        max_callbacks=2,
        callback_hosts=hosts,
        claim_after_s=600,
        on_callback=outcomes.append,
    )
    task = asyncio.create_task(consumer.run())
    try:
        sent = [
            await store.submit(payload, None, tenant="t", callback=f"http://127.0.0.1:{hook.port}/")
            for _ in range(8)
        ]
        await wait_for(lambda: len(hook.received) >= 8, f"{len(hook.received)} of 8 made")
        assert sorted(json.loads(b)["id"] for b in hook.received) == sorted(sent)
        assert "deferred" not in outcomes
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
        await client.aclose()


async def test_a_callbacks_answer_body_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncinfer, "CALLBACK_DEADLINE_S", 10.0)
    callbacks = Callbacks("mlp", 4, allowed_hosts=["127.0.0.1:*"])
    async with Hook(endless=True) as endless:
        outcome = await callbacks.call(f"http://127.0.0.1:{endless.port}/", "r1", "done")
        await callbacks.stop()
    assert outcome == "delivered"
    assert endless.sent < 64 * 1024 * 1024  # the socket's buffers, not the answer


async def test_a_name_that_resolves_to_a_non_public_address_is_not_called(
    hook: Hook,
) -> None:
    callbacks = Callbacks("mlp", 4, allowed_hosts=["localhost:*"])
    assert await callbacks.call(f"http://localhost:{hook.port}/", "r1", "done") == "refused"
    listed = Callbacks("mlp", 4, allowed_hosts=["127.0.0.0/8:*"])
    assert await listed.call(f"http://127.0.0.1:{hook.port}/", "r2", "done") == "delivered"
    await callbacks.stop()
    await listed.stop()
    assert [json.loads(b)["id"] for b in hook.received] == ["r2"]


def test_the_allowlist_holds_ports_and_cidrs() -> None:
    check_callback("https://hooks.example.com/x", ["*.example.com"])
    check_callback("http://hooks.example.com:8080/x", ["*.example.com:8080"])
    check_callback("http://hooks.example.com:9999/x", ["*.example.com:*"])
    check_callback("http://10.1.2.3:8080/x", ["10.0.0.0/8:8080"])
    check_callback("http://[fd00::1]:8080/x", ["[fd00::/8]:8080"])
    for url, hosts in [
        ("http://hooks.example.com:6379/", ["*.example.com"]),  # Redis on an allowed host
        ("http://hooks.example.com:6379/", ["*.example.com:8080"]),
        ("http://10.1.2.3:6379/", ["10.0.0.0/8:8080"]),
    ]:
        with pytest.raises(InvalidRequest, match=r"callback port 6379 .* is not allowed"):
            check_callback(url, hosts)
    with pytest.raises(InvalidRequest, match="is not allowed"):
        check_callback("http://11.1.2.3/", ["10.0.0.0/8"])
