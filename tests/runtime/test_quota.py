"""Quota decisions in memory: windows, all-or-nothing counting, tenants, headers, shadow."""

from __future__ import annotations

import asyncio
import time

import pytest
from kubeonnx_runtime.quota import (
    DEFAULT_TENANT,
    Quota,
    QuotaConfig,
    QuotaExceeded,
    Unauthorized,
    key_hash,
)

T0 = 20_000 * 86400.0  # midnight UTC: every window starts here


def config(**extra: object) -> QuotaConfig:
    return QuotaConfig.model_validate(
        {
            "policy": "team",
            "namespace": "tests",
            "tenants": [
                {
                    "name": "acme",
                    "keySha256": [key_hash("acme-key"), key_hash("acme-new-key")],
                    "limits": [
                        {"unit": "requests", "limit": 3, "window": "1m"},
                        {"unit": "rows", "limit": 10, "window": "1d"},
                    ],
                }
            ],
            **extra,
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_tenants_are_named_by_any_of_their_keys_and_strangers_are_refused() -> None:
    quota = Quota(config())
    assert quota.identify({"x-api-key": "acme-key"}) == "acme"
    assert quota.identify({"x-api-key": "acme-new-key"}) == "acme"
    with pytest.raises(Unauthorized, match="an unknown API key in X-Api-Key"):
        quota.identify({"x-api-key": "guess"})
    with pytest.raises(Unauthorized, match="no API key"):
        quota.identify({})


def test_a_bearer_token_and_a_default_tenant() -> None:
    quota = Quota(
        config(tenantHeader="Authorization", defaultTenant={"limits": []}),
    )
    assert quota.identify({"authorization": "Bearer acme-key"}) == "acme"
    assert quota.identify({"authorization": "acme-key"}) == DEFAULT_TENANT  # not a bearer
    assert quota.identify({}) == DEFAULT_TENANT


async def test_every_window_counts_and_a_refused_request_counts_nothing() -> None:
    clock = Clock()
    quota = Quota(config(), clock=clock)
    first = await quota.admit("acme", 4)
    assert [w.used for w in first.windows] == [1, 4]
    # An admitted answer carries the IETF pair only; the trio is for refusals (change 91).
    assert [k for k, _ in first.headers(clock.now)] == [b"ratelimit-policy", b"ratelimit"]
    await quota.admit("acme", 4)
    # 8 + 4 rows > 10 a day: refused, and neither window counts it.
    with pytest.raises(QuotaExceeded, match="limit of 10 rows per 1d") as refused:
        await quota.admit("acme", 4)
    decision = refused.value.decision
    assert decision.violated is not None and decision.violated.limit.name == "rows-1d"
    headers = dict(decision.headers(clock.now))
    assert headers[b"retry-after"] == b"86400"
    assert headers[b"x-ratelimit-limit"] == b"10" and headers[b"x-ratelimit-remaining"] == b"2"
    assert headers[b"ratelimit-policy"] == b'"requests-1m";q=3;w=60, "rows-1d";q=10;w=86400'
    assert headers[b"ratelimit"] == b'"requests-1m";r=1;t=60, "rows-1d";r=2;t=86400'
    third = await quota.admit("acme", 2)
    assert [w.used for w in third.windows] == [3, 10]
    with pytest.raises(QuotaExceeded, match="limit of 3 requests per 1m"):
        await quota.admit("acme", 0)
    clock.now += 60  # the next minute: requests again, rows still spent for the day
    assert [w.used for w in (await quota.admit("acme", 0)).windows] == [1, 10]
    usage = await quota.usage("acme")
    assert usage["exact"] is False
    assert [(u["used"], u["remaining"]) for u in usage["limits"]] == [(1, 2), (10, 0)]
    assert usage["limits"][1]["resetAt"] == "2024-10-05T00:00:00Z"


async def test_shadow_counts_and_reports_but_never_refuses() -> None:
    outcomes: list[str] = []
    quota = Quota(config(shadow=True), clock=Clock(), on_decision=lambda t, o: outcomes.append(o))
    for _ in range(5):
        await quota.admit("acme", 1)
    assert outcomes == ["admitted"] * 3 + ["shadow_refused"] * 2


def test_a_bad_configuration_is_refused_by_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kubeonnx_runtime.errors import FatalStartupError
    from kubeonnx_runtime.quota import load_quota_config

    path = tmp_path / "quota.yaml"
    path.write_text(
        "policy: p\nnamespace: tests\n"
        "tenants:\n- {name: a, limits: [{unit: rows, limit: -1, window: 1w}]}"
    )
    with pytest.raises(FatalStartupError) as err:
        load_quota_config(path)
    assert "tenants.0.limits.0.limit: Input should be greater than or equal to 0" in str(err.value)
    assert "tenants.0.limits.0.window: Input should be '1s', '1m', '1h' or '1d'" in str(err.value)
    path.write_text("policy: p\nnamespace: tests\ntenants: [{name: a}, {name: a}]")
    with pytest.raises(FatalStartupError, match="tenant names must be unique"):
        load_quota_config(path)


def test_a_key_seen_before_a_reload_that_removes_it_is_refused_after_it() -> None:
    """Keys are remembered once hashed (not hashed on every request); a reload forgets them,
    so a rotated-out key stops naming its tenant at once, whichever way it was written."""
    quota = Quota(config())
    for _ in range(2):
        assert quota.identify({"x-api-key": "acme-key"}) == "acme"
        assert quota.identify({"x-api-key": " acme-key "}) == "acme"
    rotated = config().model_copy(deep=True)
    rotated.tenants[0].key_sha256 = [key_hash("acme-new-key")]
    quota.use(rotated)
    for written in ("acme-key", " acme-key "):
        with pytest.raises(Unauthorized, match="an unknown API key"):
            quota.identify({"x-api-key": written})
    assert quota.identify({"x-api-key": "acme-new-key"}) == "acme"


async def test_a_refund_after_its_window_ended_leaves_the_new_window_alone() -> None:
    """In memory: a request counted in one minute and refunded in the next takes nothing
    from the next minute's count, nor from the day's once a refused request read it."""
    clock = Clock()
    quota = Quota(config(), clock=clock)
    first = await quota.admit("acme", 4)
    clock.now += 60
    second = await quota.admit("acme", 4)
    assert [w.used for w in second.windows] == [1, 8]
    with pytest.raises(QuotaExceeded):
        await quota.admit("acme", 4)  # 8 + 4 rows > 10
    quota.refund(first)
    usage = await quota.usage("acme")
    assert [u["used"] for u in usage["limits"]] == [1, 4]  # the day's rows: 8 - 4
    quota.refund(second)
    usage = await quota.usage("acme")
    assert [u["used"] for u in usage["limits"]] == [0, 0]


async def test_the_budget_counts_only_the_time_the_loop_was_there_to_read_the_answer() -> None:
    """A call that takes 20 turns of a loop blocked 15 ms a turn (300 ms, a pod starved of
    CPU) is not cut by a 25 ms budget: every tick woke late. A call that never answers is
    cut, naming the budget, and cancelled."""
    from kubeonnx_runtime.quota import _within_budget

    async def twenty_turns() -> str:
        for _ in range(20):
            time.sleep(0.015)  # noqa: ASYNC251 - the loop held, as CPU-bound work holds it
            await asyncio.sleep(0)
        return "answered"

    assert await _within_budget(twenty_turns(), 0.025) == "answered"

    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError, match="no answer from Redis within 25 ms"):
        await _within_budget(never, 0.025)
    assert never.cancelled()  # the call is cancelled, not left running


async def test_the_budget_does_not_wait_for_a_cancelled_call_to_clean_up() -> None:
    """A call cut by the budget may take its time to unwind (a connection closed, a pool's
    lock awaited): the decision is not held for it. And a caller cancelled (shutdown)
    cancels the call with it."""
    from kubeonnx_runtime.quota import _within_budget

    release = asyncio.Event()
    cleaning = asyncio.Event()

    async def slow_to_unwind() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # a slow disconnect
            raise

    with pytest.raises(TimeoutError, match="no answer from Redis within 25 ms"):
        await asyncio.wait_for(_within_budget(slow_to_unwind(), 0.025), 10)
    await cleaning.wait()
    assert not release.is_set()  # answered while the call was still unwinding
    release.set()

    never = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(_within_budget(never, 10.0))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert never.cancelled()


def test_a_tick_counts_in_full_when_its_timer_fires_within_the_loops_granularity() -> None:
    """A loop's timers fire up to about a millisecond late when nothing else runs: a tick of
    a 1 ms budget (0.2 ms) that woke 1 ms after it began was on time, so the budget ends after
    about a millisecond, not after the late grace (1 s). A tick the loop was held 15 ms for
    counts nothing."""
    from kubeonnx_runtime.quota import _on_time

    assert _on_time(0.0002, 0.0012) == pytest.approx(0.0002)
    assert _on_time(0.005, 0.0055) == pytest.approx(0.005)
    assert _on_time(0.005, 0.020) == 0.0
    assert 0.0 < _on_time(0.005, 0.009) < 0.005  # late by part of a tick: that part is lost
