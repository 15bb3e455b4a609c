"""Refunds with a real redis-server: a decision the runtime gave up on is not counted, a
refund takes back what its request added (in the windows it was counted in, once), refunds
never hold up an answer, and a lost refund is logged and counted."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import kubeonnx_runtime.quota as quota_module
import numpy as np
import pytest
from kubeonnx_runtime.app import InferHandler
from kubeonnx_runtime.batching import Batcher
from kubeonnx_runtime.dataplane import DataPlane
from kubeonnx_runtime.errors import FatalStartupError, ServerBusy
from kubeonnx_runtime.metrics import RuntimeMetrics
from kubeonnx_runtime.quota import (
    Quota,
    QuotaConfig,
    QuotaUnavailable,
    connect_redis,
    counter_key,
    key_hash,
    load_quota_config,
)
from prometheus_client import CollectorRegistry

from e2e.redis_server import LocalRedis
from tests.runtime.test_quota_redis import not_near_midnight


def quota_on(url: str, budget_ms: int, **extra: Any) -> tuple[Quota, list[str], list[int]]:
    """A Quota in this process on the Redis at `url` (tenant a, 1000 requests a day); the
    decision outcomes it reports, and its lost refunds."""
    config = QuotaConfig.model_validate(
        {
            "policy": f"p-{uuid.uuid4().hex[:8]}",
            "namespace": "ns",
            "redis": {"url": url},
            "decisionBudgetMs": budget_ms,
            "tenants": [
                {"name": "a", "limits": [{"unit": "requests", "limit": 1000, "window": "1d"}]}
            ],
            **extra,
        }
    )
    outcomes: list[str] = []
    lost: list[int] = []
    quota = Quota(
        config,
        redis_client=connect_redis(config.redis, {}),  # type: ignore[arg-type]
        on_decision=lambda tenant, outcome: outcomes.append(outcome),
        on_refund_lost=lambda: lost.append(1),
    )
    return quota, outcomes, lost


def counted(store: LocalRedis, quota: Quota, at: float | None = None) -> int:
    """Tenant a's count in Redis for the day under way (or the one of `at`)."""
    key = counter_key("ns", quota.config.policy, "a", "requests", "1d", at or time.time())
    return int(store.client().get(key) or 0)


def refused_after_admission(quota: Quota) -> InferHandler:
    """A handler whose work is admitted and then refused (503: the queue is full)."""
    plane = DataPlane(None, None, name="m", version="1")  # type: ignore[arg-type]
    return InferHandler(plane, RuntimeMetrics(CollectorRegistry()), 1024, quota)


async def answer_refused(handler: InferHandler, then: Any = None) -> int:
    """Charged, then (after `then()`, if given) refused: the answer's status."""

    async def work() -> tuple[int, str, list[tuple[bytes, bytes]], bytes]:
        await handler.charge("a", lambda: 1)
        if then is not None:
            then()
        raise ServerBusy("the request queue is full")

    return (await handler.metered(work(), "inference"))[0]


@pytest.mark.parametrize("mode", ["Closed", "Open", "Local"])
def test_a_decision_given_up_on_is_not_counted_in_redis(mode: str) -> None:
    """Redis frozen: the decision's script waits in its input buffer past the 25 ms budget
    and the failure mode decides (Closed 503, Open unchecked, Local in memory). When Redis
    runs again the script runs too; the compensating refund leaves nothing counted."""
    not_near_midnight()
    store = LocalRedis().start()

    async def main() -> tuple[str, Quota]:
        quota, _, lost = quota_on(store.url, 25, failureMode=mode)
        await quota.admit("a", 1)  # connected, script loaded
        store.pause()
        try:
            try:
                decided = (await quota.admit("a", 1)).counted_in or "unchecked"
            except QuotaUnavailable:
                decided = "unavailable"
        finally:
            store.resume()
        await quota.drain()
        assert not lost
        return decided, quota

    try:
        decided, quota = asyncio.run(main())
        assert decided == {"Closed": "unavailable", "Open": "unchecked", "Local": "local"}[mode]
        # The first decision only; before the fix 2 (the abandoned one counted in Redis too).
        assert counted(store, quota) == 1
    finally:
        store.stop()


def test_a_refund_takes_back_its_own_request_once_or_abandons_it(
    redis_server: LocalRedis,
) -> None:
    """The two scripts by request id: a refund after the decision takes back what it added,
    once; a refund that comes first marks the id, and the late decision adds nothing."""
    from kubeonnx_runtime.quota import _CHECK_AND_COUNT, _REFUND, charge_key

    not_near_midnight()
    client = redis_server.client()
    decide, refund = client.register_script(_CHECK_AND_COUNT), client.register_script(_REFUND)
    policy = f"p-{uuid.uuid4().hex[:8]}"
    counter = counter_key("ns", policy, "a", "requests", "1d", time.time())
    first, late = charge_key("ns", policy, "a", "r1"), charge_key("ns", policy, "a", "r2")
    # windows 1, record kept 120 s, limit 10, TTL 2 days; two requests costing 1 and 2
    args = [1, 120, 10, 172800]
    assert decide(keys=[counter, first], args=[*args, "1"]) == b"1,0,1"
    assert decide(keys=[counter, charge_key("ns", policy, "a", "r0")], args=[*args, "2"]) == (
        b"1,0,3"
    )
    assert int(client.get(counter)) == 3
    assert refund(keys=[counter, first], args=[3600]) == 1
    assert int(client.get(counter)) == 2  # its own 1, not the other request's 2
    assert refund(keys=[counter, first], args=[3600]) == 0  # once
    assert int(client.get(counter)) == 2
    assert refund(keys=[counter, late], args=[3600]) == 0  # before its decision ran
    assert decide(keys=[counter, late], args=[*args, "1"]) == b"0,-1,2"
    assert int(client.get(counter)) == 2


def test_a_refund_across_a_window_boundary_leaves_the_window_it_was_counted_in(
    redis_server: LocalRedis,
) -> None:
    """admit reads the clock just before a minute ends, the script is sent just after: the
    request is counted in the new minute, its reset is the new minute's, and its refund
    leaves the new minute (before the fix: taken from the old one, the new one kept 1)."""
    boundary = 1_800_000_000.0  # a minute's (and a day's) start
    times = iter([boundary - 0.001])
    config = QuotaConfig.model_validate(
        {
            "policy": f"p-{uuid.uuid4().hex[:8]}",
            "namespace": "ns",
            "redis": {"url": redis_server.url},
            "decisionBudgetMs": 10000,
            "tenants": [
                {"name": "a", "limits": [{"unit": "requests", "limit": 5, "window": "1m"}]}
            ],
        }
    )
    quota = Quota(
        config,
        redis_client=connect_redis(config.redis, {}),  # type: ignore[arg-type]
        clock=lambda: next(times, boundary + 0.001),
    )
    handler = refused_after_admission(quota)

    async def main() -> None:
        decision = await quota.admit("a", 1)
        assert decision.windows[0].reset_at == boundary + 60
        assert await answer_refused(handler) == 503
        await quota.drain()

    asyncio.run(main())
    handler.close()
    client = redis_server.client()
    for at in (boundary - 1, boundary + 1):
        key = counter_key("ns", config.policy, "a", "requests", "1m", at)
        assert int(client.get(key) or 0) == (1 if at > boundary else 0), key


def test_a_refund_does_not_hold_up_the_answer(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis frozen after the decision, under a 10 s budget: the 503 is answered at once (before
    the fix it waited for the refund) and the refund lands when Redis is back. Redis gone: the
    refund is lost, logged and counted; past the refunds in flight, so are the others."""
    not_near_midnight()
    store = LocalRedis().start()

    async def main() -> None:
        quota, outcomes, lost = quota_on(store.url, 10000)
        handler = refused_after_admission(quota)
        try:
            # Redis frozen once the request is admitted, until the answer is back: only a
            # refund that does not wait for Redis lets it come (the bound is far below the
            # budget, far above a loaded machine's turn).
            answering = answer_refused(handler, then=store.pause)
            assert (await asyncio.wait_for(answering, 8)) == 503
        finally:
            store.resume()
        await quota.drain()
        assert counted(store, quota) == 0
        assert outcomes == ["admitted", "refunded"] and not lost
        handler.close()

    async def gone() -> list[int]:
        quota, _, lost = quota_on(store.url, 10000)
        decisions = [await quota.admit("a", 1) for _ in range(2)]
        store.kill()
        monkeypatch.setattr(quota_module, "REFUNDS_IN_FLIGHT", 1)
        for decision in decisions:
            quota.refund(decision)  # the second finds the first in flight
        await quota.drain()
        return lost

    try:
        asyncio.run(main())
        caplog.set_level(logging.WARNING, "kubeonnx_runtime.quota")
        assert asyncio.run(gone()) == [1, 1]
        assert "quota refund for tenant a lost: 1 refunds already in flight" in caplog.text
        assert "quota refund for tenant a lost: ConnectionError" in caplog.text
    finally:
        store.stop()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"namespace": None}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"tenants": [{"name": "Acme_1", "keySha256": []}]}, "tenants.0.name"),
        ({"tenants": [{"name": "a" * 64, "keySha256": []}]}, "tenants.0.name"),
    ],
)
def test_the_runtime_checks_the_namespace_and_tenant_names(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    """What the QuotaPolicy's schema and the operator check, the runtime checks again: a file
    written by hand (or by an older operator) with no namespace (counters would merge with a
    same-named policy's) or a tenant name that is not a DNS label does not load."""
    raw: dict[str, Any] = {"policy": "team", "namespace": "vision", "tenants": [], **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "quota.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(FatalStartupError, match="invalid quota configuration") as refused:
        load_quota_config(path)
    assert field in str(refused.value), refused.value
    raw.update(namespace="vision", tenants=[{"name": "acme-1", "keySha256": []}])
    path.write_text(json.dumps(raw))
    assert load_quota_config(path).namespace == "vision"


def test_a_reservation_holds_the_queue_for_every_part_before_the_charge() -> None:
    """An image batch reserves a place for each image before it is charged: no room for all
    is 503 at once (nothing charged, nothing run); reserved parts always get in; places not
    taken are given back. A request larger than the whole queue gets in alone."""
    tensor = {"input": np.zeros((1, 4), np.float32)}

    async def main() -> None:
        # Not started: what is queued stays queued.
        batcher = Batcher(
            lambda x: x, max_batch_size=1, max_delay_s=0, max_queue=3, batchable=False
        )
        first = asyncio.ensure_future(batcher.infer(tensor))
        await asyncio.sleep(0)
        held = batcher.reserve(2)
        with pytest.raises(ServerBusy, match="no room for 1"):
            batcher.reserve(1)
        with pytest.raises(ServerBusy, match="queue is full"):
            await batcher.infer(tensor)  # the places are held for the batch's parts
        parts = [asyncio.ensure_future(batcher.infer(tensor, held)) for _ in range(2)]
        await asyncio.sleep(0)
        assert (batcher.depth, batcher.reserved) == (3, 0)
        for task in (first, *parts):
            task.cancel()
        batcher.release(held)  # all taken: nothing to give back
        assert batcher.reserved == 0

        small = Batcher(lambda x: x, max_batch_size=1, max_delay_s=0, max_queue=2, batchable=False)
        large = small.reserve(4)  # more than the queue: alone
        with pytest.raises(ServerBusy):
            small.reserve(1)
        one = asyncio.ensure_future(small.infer(tensor, large))
        await asyncio.sleep(0)
        small.release(large)  # a part failed to decode: its 3 places come back
        assert small.reserved == 0
        small.release(small.reserve(1))
        one.cancel()

    asyncio.run(main())


def test_an_image_batch_is_charged_for_every_image_the_model_ran(
    serve, models: dict[str, Path], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Ten batches of 4 images at once into a queue of 2: a batch without room for all its
    images is refused before it is charged and runs nothing; every image the model ran is
    charged (before the fix: 18 runs, 0 charged: a batch whose last image found the queue
    full was refunded whole while its other images ran)."""
    from e2e.generate_images import generate as generate_images
    from tests.runtime.test_images import PROCESSING

    not_near_midnight()
    tiny = generate_images(tmp_path / "images")["tiny.png"].read_bytes()
    path = tmp_path / "quota.json"
    path.write_text(
        json.dumps(
            {
                "policy": "images",
                "namespace": "tests",
                "tenants": [
                    {
                        "name": "acme",
                        "keySha256": [key_hash("acme-key")],
                        "limits": [{"unit": "rows", "limit": 100000, "window": "1d"}],
                    }
                ],
            }
        )
    )
    served = serve(
        "--model-uri",
        f"file://{models['convnet']}",
        "--model-name",
        "classifier",
        env={
            "KUBEONNX_PROCESSING": json.dumps(PROCESSING),
            "KUBEONNX_QUOTA_CONFIG": str(path),
            "KUBEONNX_MAX_BATCH_SIZE": "1",
            "KUBEONNX_MAX_QUEUE": "2",
        },
    )
    url = f"{served.url}/v2/models/classifier/predict/batch"
    key = {"X-Api-Key": "acme-key"}

    def post(_: int) -> httpx.Response:
        files = [("files", ("t.png", tiny))] * 4
        return httpx.post(url, files=files, headers=key, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(10)))
    codes = [a.status_code for a in answers]
    errors = {a.json().get("error") for a in answers if a.status_code != 200}
    runs = 0.0
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line.startswith("kubeonnx_batch_size_count{"):
            runs = float(line.rsplit(" ", 1)[1])
    usage = httpx.get(f"{served.url}/v2/quota", headers=key).json()
    assert (runs, usage["limits"][0]["used"]) == (4 * codes.count(200),) * 2, (codes, errors)
    assert set(codes) <= {200, 503} and 200 in codes, codes  # a batch alone gets in


def test_the_script_answers_a_count_past_1e14_exactly(redis_server: LocalRedis) -> None:
    """The script's answer is one string of integers: a count from 1e14 up is written in full
    (Lua writes such a number as 1e+15 by itself, which no integer parse reads)."""
    from kubeonnx_runtime.quota import _CHECK_AND_COUNT, charge_key

    not_near_midnight()
    client = redis_server.client()
    decide = client.register_script(_CHECK_AND_COUNT)
    policy = f"p-{uuid.uuid4().hex[:8]}"
    counter = counter_key("ns", policy, "a", "rows", "1d", time.time())
    client.set(counter, 10**15)
    reply = decide(
        keys=[counter, charge_key("ns", policy, "a", "r1")], args=[1, 120, 10**16, 9, "7"]
    )
    assert reply == b"1,0,1000000000000007"
