"""What the async queue's Redis holds, in bytes: the queued bodies together
(`maxQueuedBytes`, 503 naming it, counted back out when an entry is deleted) and the dead
letters together (`deadLetterMaxBytes`, the oldest trimmed)."""

from __future__ import annotations

import asyncio
import json

import pytest
from kubeonnx_runtime.asyncinfer import GROUP, AsyncStore, QueueFull

from tests.runtime.test_async import KEYS, body
from tests.runtime.test_callbacks import (  # noqa: F401 (a fixture)
    redis_url,
    wait_status,
    worker,
    zeros,
)


def padded(size: int) -> bytes:
    """A valid request body of exactly `size` bytes (JSON with trailing spaces)."""
    payload = json.dumps(body([1] * 4)).encode()
    return payload + b" " * (size - len(payload))


async def test_queued_bytes_are_bounded_and_counted_back_out(redis_url: str) -> None:  # noqa: F811
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    store = AsyncStore(client, KEYS, max_queued=100, callback_hosts=[], max_queued_bytes=3500)
    sent = [await store.submit(padded(1000), None, tenant="t", callback=None) for _ in range(3)]
    with pytest.raises(QueueFull, match=r"3500 bytes .*spec\.async\.maxQueuedBytes"):
        await store.submit(padded(1000), None, tenant="t", callback=None)
    assert int(await client.get(KEYS.queued_bytes)) == 3000
    consumer = worker(client, zeros, concurrency=2)
    task = asyncio.create_task(consumer.run())
    try:
        for request_id in sent:
            assert (await wait_status(store, request_id)).status == "done"
        assert await client.xlen(KEYS.stream) == 0
        assert int(await client.get(KEYS.queued_bytes)) == 0  # each counted out once
        again = [
            await store.submit(padded(1000), None, tenant="t", callback=None) for _ in range(3)
        ]
        for request_id in again:
            assert (await wait_status(store, request_id)).status == "done"
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
    assert int(await client.get(KEYS.queued_bytes)) == 0
    await client.aclose()


async def test_dead_letters_are_trimmed_to_their_byte_limit(redis_url: str) -> None:  # noqa: F811
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    store = AsyncStore(client, KEYS, max_queued=100, callback_hosts=[])
    sent = [await store.submit(padded(1000), None, tenant="t", callback=None) for _ in range(4)]
    # A replica took all four and died holding them: one delivery each, never acknowledged.
    await client.xreadgroup(GROUP, "crashed", {KEYS.stream: ">"}, count=4)
    consumer = worker(
        client,
        zeros,
        concurrency=1,
        max_attempts=1,
        claim_after_s=0.2,
        dead_letter_max_bytes=2500,
    )
    task = asyncio.create_task(consumer.run())
    try:
        for request_id in sent:
            assert (await wait_status(store, request_id)).status == "failed"
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 60)
    dead = await client.xrange(KEYS.dead)
    assert len(dead) == 2  # 2,000 bytes of bodies kept, within 2,500
    assert all(len(fields[b"body"]) == 1000 for _, fields in dead)
    assert int(await client.get(KEYS.dead_bytes)) == 2000
    assert int(await client.get(KEYS.queued_bytes)) == 0
    await client.aclose()
