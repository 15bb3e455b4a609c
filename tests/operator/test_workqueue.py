"""The operator's work queue: coalescing, one reconcile at a time per key, retry, deletion."""

from __future__ import annotations

import asyncio
from typing import Any

from kubeonnx_operator.workqueue import WorkQueue

KEY = ("ns", "m")


def body(generation: int) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "m", "generation": generation}}


async def test_triggers_during_a_reconcile_coalesce_into_one_more_run_on_the_newest_body() -> None:
    seen: list[int] = []
    running = 0
    release = asyncio.Event()

    async def reconcile(b: dict[str, Any]) -> None:
        nonlocal running
        running += 1
        assert running == 1, "two reconciles of one key at once"
        seen.append(b["metadata"]["generation"])
        if len(seen) == 1:
            await release.wait()
        running -= 1

    queue = WorkQueue(reconcile)
    queue.observe(KEY, body(1))
    await asyncio.sleep(0)
    for generation in (2, 3, 4):
        queue.observe(KEY, body(generation))
        queue.trigger(KEY)
    release.set()
    await queue.idle()
    assert seen == [1, 4]


async def test_a_failed_reconcile_is_retried_with_backoff_until_it_succeeds() -> None:
    calls = 0

    async def reconcile(_: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("API server unavailable")

    queue = WorkQueue(reconcile, base_delay=0.01, max_delay=0.05)
    queue.observe(KEY, body(1))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if calls == 3:
            break
    await queue.idle()
    assert calls == 3
    assert not queue._failures and not queue._retries


async def test_deleting_a_model_cancels_its_pending_retry() -> None:
    calls = 0

    async def reconcile(_: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("always fails")

    queue = WorkQueue(reconcile, base_delay=0.05, max_delay=0.05)
    queue.observe(KEY, body(1))
    await queue.idle()
    assert calls == 1 and KEY in queue._retries
    queue.observe(KEY, None)
    await asyncio.sleep(0.2)
    assert calls == 1
    assert not queue._retries and not queue._failures and KEY not in queue.bodies


async def test_requeue_after_runs_the_key_again_and_the_latest_time_asked_wins() -> None:
    runs: list[int] = []
    again = asyncio.Event()

    async def reconcile(b: dict[str, Any]) -> None:
        runs.append(b["metadata"]["generation"])
        if len(runs) == 2:
            again.set()

    queue = WorkQueue(reconcile)
    queue.observe(KEY, body(1))
    await queue.idle()
    queue.requeue_after(KEY, 3600.0)
    queue.requeue_after(KEY, None)  # cancelled: never runs
    queue.requeue_after(KEY, 0.01)
    await asyncio.wait_for(again.wait(), 30)
    await queue.idle()
    assert runs == [1, 1]
    queue.requeue_after(KEY, 3600.0)
    await queue.stop()  # a stopped queue keeps no timer
    assert not queue._later
