"""Quota decisions that outlive the configuration they were made under (a reload while a
Redis round trip waits, a refund after a reload), the Local fallback's shares, and what a
refused request is told to wait. Each failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubeonnx_runtime.quota import (
    Quota,
    QuotaConfig,
    QuotaExceeded,
    QuotaUnavailable,
    key_hash,
)
from redis.exceptions import ConnectionError as RedisConnectionError

T0 = 20_000 * 86400.0  # midnight UTC


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def config(limits: dict[str, list[dict[str, Any]]], **extra: object) -> QuotaConfig:
    return QuotaConfig.model_validate(
        {
            "policy": "team",
            "namespace": "tests",
            "tenants": [
                {"name": name, "keySha256": [key_hash(f"{name}-key")], "limits": lims}
                for name, lims in limits.items()
            ],
            **extra,
        }
    )


# --- Retry-After: the wait until the request can be admitted --------------------------------


async def test_retry_after_is_the_wait_until_the_request_can_be_admitted() -> None:
    """Both windows are full; Retry-After must cover the minute, not the second: a client
    that honours Retry-After: 1 is refused again for the rest of the minute."""
    clock = Clock()
    quota = Quota(
        config(
            {
                "acme": [
                    {"unit": "requests", "limit": 5, "window": "1s"},
                    {"unit": "requests", "limit": 5, "window": "1m"},
                ]
            }
        ),
        clock=clock,
    )
    for _ in range(5):
        await quota.admit("acme", 1)
    clock.now = T0 + 0.5
    with pytest.raises(QuotaExceeded) as refused:
        await quota.admit("acme", 1)
    retry_after = int(dict(refused.value.decision.headers(clock.now))[b"retry-after"])
    assert retry_after == 60, f"Retry-After: {retry_after}, the request is refused until T0+60"
    assert "per 1m (window requests-1m)" in str(refused.value)  # the message names it too
    # A second before that it is still refused; once waited as told, admitted.
    clock.now = T0 + 59.5
    with pytest.raises(QuotaExceeded):
        await quota.admit("acme", 1)
    clock.now = T0 + 60
    await quota.admit("acme", 1)


# --- failureMode Local after a reload that lands while a Redis round trip waits ------------


class _FailingRedis:
    """A Redis whose script waits for `release`, then fails as an unreachable server."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sent = asyncio.Event()

    def register_script(self, script: str) -> Any:
        async def call(keys: list[Any], args: list[Any]) -> Any:
            self.sent.set()
            await self.release.wait()
            raise RedisConnectionError("connection refused")

        return call


async def decided_across_a_reload(
    old: dict[str, list[dict[str, Any]]], new: dict[str, list[dict[str, Any]]], rows: int
) -> Any:
    """A request of `rows` waits for Redis under `old` (failureMode Local); the configuration
    is reloaded to `new`; then Redis fails: the request is decided by the Local fallback."""
    redis = _FailingRedis()
    quota = Quota(config(old, failureMode="Local", redis={"url": "redis://x"}), redis_client=redis)
    pending = asyncio.ensure_future(quota.admit("acme", rows))
    await redis.sent.wait()
    quota.use(config(new, failureMode="Local", redis={"url": "redis://x"}))
    redis.release.set()
    return await pending


@pytest.mark.parametrize(
    "new_limits",
    [
        pytest.param({"other": []}, id="tenant-removed"),
        pytest.param(
            {
                "acme": [
                    {"unit": "requests", "limit": 100, "window": "1m"},
                    {"unit": "rows", "limit": 100, "window": "1m"},
                    {"unit": "rows", "limit": 1000, "window": "1d"},
                ]
            },
            id="window-added",
        ),
        pytest.param(
            {"acme": [{"unit": "rows", "limit": 100, "window": "1d"}]}, id="window-removed"
        ),
    ],
)
async def test_local_fallback_after_a_reload_mid_round_trip_decides_by_the_charge_it_began(
    new_limits: dict[str, list[dict[str, Any]]],
) -> None:
    """The request is decided with the windows it was charged under, whatever the reload did
    to them (it used to meet KeyError, IndexError or ValueError: a 500)."""
    old = {
        "acme": [
            {"unit": "requests", "limit": 100, "window": "1m"},
            {"unit": "rows", "limit": 100, "window": "1d"},
        ]
    }
    decision = await decided_across_a_reload(old, new_limits, 2)
    assert decision.counted_in == "local"
    assert {w.limit.name: w.used for w in decision.windows} == {"requests-1m": 1, "rows-1d": 2}


async def test_local_fallback_after_a_reorder_charges_each_window_its_own_unit() -> None:
    """Same windows in another order: each is charged its own unit (a 50-row request used to
    be charged 50 requests and 1 row, the costs taken by position)."""
    old = {
        "acme": [
            {"unit": "requests", "limit": 100, "window": "1m"},
            {"unit": "rows", "limit": 100, "window": "1m"},
        ]
    }
    decision = await decided_across_a_reload(old, {"acme": list(reversed(old["acme"]))}, 50)
    used = {w.limit.name: w.used for w in decision.windows}
    assert used == {"rows-1m": 50, "requests-1m": 1}, used


# --- failureMode Local: a request over a replica's share (not the whole limit) -------------


class _DownRedis:
    def register_script(self, script: str) -> Any:
        async def call(keys: list[Any], args: list[Any]) -> Any:
            raise RedisConnectionError("connection refused")

        return call


async def test_a_request_over_a_replicas_share_is_a_503_naming_the_share_not_a_429() -> None:
    """rows-1m 100 over 4 replicas: a share of 25. With Redis down, a 30-row request can
    never fit a share: a 429 with Retry-After would be refused again after every reset.
    It is a 503 (the quota store is down) that names the share and the request's need."""
    clock = Clock()
    cfg = config(
        {"acme": [{"unit": "rows", "limit": 100, "window": "1m"}]},
        failureMode="Local",
        replicas=4,
        redis={"url": "redis://x"},
    )
    quota = Quota(cfg, redis_client=_DownRedis(), clock=clock)
    for minute in range(3):
        clock.now = T0 + 60 * minute + 1
        with pytest.raises(QuotaUnavailable, match=r"25 rows per 1m .* needs 30"):
            await quota.admit("acme", 30)
    assert (await quota.admit("acme", 25)).counted_in == "local"  # a share's worth fits


# --- A refund after a reload that changed the policy (or namespace) ------------------------


def test_a_refund_after_a_policy_change_reaches_the_counters_it_was_charged_in(
    redis_server: Any,
) -> None:
    import time
    import uuid

    import redis as redis_py
    from kubeonnx_runtime.quota import connect_redis, counter_key

    old_policy, new_policy = f"p-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}"
    limits = {"acme": [{"unit": "requests", "limit": 100, "window": "1d"}]}
    cfg = config(limits, redis={"url": redis_server.url})
    cfg = cfg.model_copy(update={"policy": old_policy})
    quota = Quota(cfg, redis_client=connect_redis(cfg.redis, {}))
    plain = redis_py.Redis.from_url(redis_server.url)

    async def run() -> None:
        decision = await quota.admit("acme", 1)
        # The model moves to another policy (the rendered file is reloaded) before the
        # answer fails and its charge is refunded.
        quota.use(cfg.model_copy(update={"policy": new_policy}))
        quota.refund(decision)
        await quota.drain()

    asyncio.run(run())
    key = counter_key("tests", old_policy, "acme", "requests", "1d", time.time())
    assert int(plain.get(key) or 0) == 0, "the refunded request stays counted in its policy"


# --- A refund whose charge record is gone (> 120 s) is lost, not "refunded" ----------------


def test_a_refund_that_takes_nothing_back_is_counted_lost_not_refunded(
    redis_server: Any,
) -> None:
    """docs/quotas.md: a refund 'later than 120 s after its decision is lost, logged and
    counted'. The charge record's expiry is simulated by deleting it (its TTL is 120 s)."""
    import uuid

    import redis as redis_py
    from kubeonnx_runtime.quota import charge_key, connect_redis

    outcomes: list[str] = []
    lost: list[int] = []
    cfg = config(
        {"acme": [{"unit": "requests", "limit": 100, "window": "1d"}]},
        redis={"url": redis_server.url},
    )
    cfg = cfg.model_copy(update={"policy": f"p-{uuid.uuid4().hex[:8]}"})
    quota = Quota(
        cfg,
        redis_client=connect_redis(cfg.redis, {}),
        on_decision=lambda tenant, outcome: outcomes.append(outcome),
        on_refund_lost=lambda: lost.append(1),
    )
    plain = redis_py.Redis.from_url(redis_server.url)

    async def run() -> None:
        decision = await quota.admit("acme", 1)
        ref = decision.ref.decode()
        assert plain.delete(charge_key("tests", cfg.policy, "acme", ref)) == 1  # expired
        quota.refund(decision)
        await quota.drain()

    asyncio.run(run())
    assert "refunded" not in outcomes and lost == [1], (outcomes, lost)
