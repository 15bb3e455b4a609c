"""Where a quota's cost per request goes, in one process (no HTTP server, no model): CPU
per call, which a loaded machine disturbs far less than requests/s.

    .venv/bin/python benchmarks/quota_profile.py [--requests 20000] [--rounds 3] \
        [--concurrency 64] [--cprofile]

Part one times each step a quota adds to a request on its own (finding the tenant, the
decision in memory, the budget headers, the decision's metric, and uvicorn's writing of
those headers). Part two sends binary inference requests for the tiny model's shape through
the runtime's front door (`FrontDoor`, the fast path wrk's requests take) to a model that
answers on the event loop's next turn (uvloop, as the server runs), `--concurrency` at a
time: with no quota, a quota counted in memory, and one counted in a real redis-server; it
reports this process's CPU per request (Redis's own CPU is not in it) and how many requests
shared each script call. Rounds alternate the three; the median is printed. Part three
counts the function calls per request of each (cProfile's count, which the load does not
change; `--cprofile` prints the profiles). Part four times one script call's round trip,
batches of 64 and 16 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kubeonnx_runtime.app import FrontDoor, InferHandler
from kubeonnx_runtime.dataplane import DataPlane
from kubeonnx_runtime.datatypes import TensorSpec
from kubeonnx_runtime.metrics import RuntimeMetrics
from kubeonnx_runtime.quota import Quota, QuotaConfig, connect_redis, key_hash

from e2e.redis_server import LocalRedis

KEY = "bench-key"
# uvicorn's checks of every response header (httptools_impl), repeated for their cost.
HEADER_RE = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
HEADER_VALUE_RE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


class Model:
    inputs = [TensorSpec("input", "FP32", (-1, 4))]
    outputs = [TensorSpec("output", "FP32", (-1, 2))]
    output_names = ["output"]
    device = "cpu"

    def check_outputs(self, names: list[str]) -> None:
        pass


class Batcher:
    """Answers on the event loop's next turn, as a model that costs nothing would."""

    depth = 0
    max_queue = 10**9

    def admit(self) -> None:
        pass

    def withdraw(self) -> None:
        pass

    async def infer(self, inputs: dict[str, np.ndarray], reservation: Any = None) -> Any:
        await asyncio.sleep(0)  # a request waits for its batch once
        return {"output": np.zeros((len(inputs["input"]), 2), np.float32)}


def config(redis_url: str | None) -> QuotaConfig:
    raw: dict[str, Any] = {
        "policy": "profile",
        "namespace": "bench",
        "tenants": [
            {
                "name": "bench",
                "keySha256": [key_hash(KEY)],
                "limits": [
                    {"unit": "requests", "limit": 10**12, "window": "1m"},
                    {"unit": "rows", "limit": 10**12, "window": "1d"},
                ],
            }
        ],
    }
    if redis_url:
        raw["redis"] = {"url": redis_url}
        raw["failureMode"] = "Open"
    return QuotaConfig.model_validate(raw)


def make_quota(cfg: QuotaConfig, metrics: RuntimeMetrics) -> Quota:
    """As server.make_quota builds it."""
    client = connect_redis(cfg.redis, {}) if cfg.redis else None
    return Quota(
        cfg,
        redis_client=client,
        on_decision=metrics.quota_decisions.counter("mlp"),
        on_redis_seconds=metrics.quota_redis_seconds.labels("mlp").observe,
    )


def per_call(fn: Callable[[], Any], n: int) -> float:
    """This thread's CPU nanoseconds per call of `fn`, the best of five runs of `n` (CPU
    time: a loaded machine's preemptions are not counted)."""
    best = float("inf")
    for _ in range(5):
        started = time.thread_time_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time_ns() - started) / n)
    return best


def run_coroutine(make: Callable[[], Any]) -> Callable[[], Any]:
    """A coroutine that never suspends, run to its end without an event loop."""

    def call() -> Any:
        coro = make()
        try:
            coro.send(None)
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("the coroutine suspended")

    return call


def uvicorn_headers(headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            raise RuntimeError("bad header")
        name = name.lower()
        _ = [name, b": ", value, b"\r\n"]


def steps(n: int) -> None:
    metrics = RuntimeMetrics(CollectorRegistry())
    quota = make_quota(config(None), metrics)
    headers = {"x-api-key": KEY}
    decision = run_coroutine(lambda: quota.admit("bench", 1))()
    built = decision.headers(time.time())
    rows = [
        ("key_hash", lambda: key_hash(KEY)),
        ("identify", lambda: quota.identify(headers)),
        ("admit (memory, metric included)", run_coroutine(lambda: quota.admit("bench", 1))),
        ("decision metric (on_decision)", lambda: quota._on_decision("bench", "admitted")),
        ("headers", lambda: decision.headers(time.time())),
        ("uvicorn's checks of those headers", lambda: uvicorn_headers(built)),
    ]
    print("| step | ns per call |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {per_call(fn, n):,.0f} |")


def front_door(quota: Quota | None) -> tuple[FrontDoor, Callable[[], Any]]:
    metrics = RuntimeMetrics(CollectorRegistry())
    dataplane = DataPlane(Model(), Batcher(), name="mlp", version="1")  # type: ignore[arg-type]
    handler = InferHandler(dataplane, metrics, 1 << 20, quota)
    door = FrontDoor(None, handler)  # type: ignore[arg-type]
    x = np.zeros((1, 4), np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + x.tobytes()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/mlp/infer",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(len(body)).encode()),
            (b"inference-header-content-length", str(len(header)).encode()),
            (b"x-api-key", KEY.encode()),
        ],
    }
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
            uvicorn_headers(message["headers"])

    async def one() -> None:
        await door(scope, receive, send)

    return door, one


async def load(one: Callable[[], Any], requests: int, concurrency: int) -> float:
    """This process's CPU seconds for `requests` requests, `concurrency` at a time."""
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - started


def end_to_end(args: argparse.Namespace, redis_url: str) -> None:
    results: dict[str, list[float]] = {"no quota": [], "memory": [], "redis": []}
    shared: list[float] = []

    async def measure(label: str) -> None:
        quota = None
        if label != "no quota":
            cfg = config(redis_url if label == "redis" else None)
            quota = make_quota(cfg, RuntimeMetrics(CollectorRegistry()))
        _, one = front_door(quota)
        await load(one, 500, args.concurrency)  # warm-up (Redis connections, scripts loaded)
        calls = [0]
        if quota is not None and quota._script is not None:
            script = quota._script

            def counted(**kwargs: Any) -> Any:
                calls[0] += 1
                return script(**kwargs)

            quota._script = counted
        seconds = await load(one, args.requests, args.concurrency)
        results[label].append(seconds / args.requests * 1e6)
        if calls[0]:
            shared.append(args.requests / calls[0])
        if quota is not None and quota._redis is not None:
            await quota._redis.aclose()

    for _ in range(args.rounds):
        for label in results:
            uvloop.run(measure(label))
    base = statistics.median(results["no quota"])
    print(f"\nfront door, concurrency {args.concurrency}, {args.requests} requests a run")
    print("| quota | CPU us per request (median) | runs | added us |\n|---|---|---|---|")
    for label, runs in results.items():
        med = statistics.median(runs)
        print(
            f"| {label} | {med:.1f} | {' / '.join(f'{r:.1f}' for r in runs)} | {med - base:+.1f} |"
        )
    print("requests per script call (redis): " + " / ".join(f"{s:.1f}" for s in shared))


def calls(args: argparse.Namespace, redis_url: str) -> None:
    """Function calls per request (Python's and built-ins', as cProfile counts them): a
    measure of the work that the machine's load does not move."""
    print(f"\nfunction calls per request, concurrency {args.concurrency}")
    print("| quota | calls per request | added |\n|---|---|---|")
    base = 0.0
    for label in ("no quota", "memory", "redis"):

        async def go(label: str = label) -> float:
            quota = None
            if label != "no quota":
                cfg = config(redis_url if label == "redis" else None)
                quota = make_quota(cfg, RuntimeMetrics(CollectorRegistry()))
            _, one = front_door(quota)
            await load(one, 500, args.concurrency)
            profiler = cProfile.Profile()
            profiler.enable()
            await load(one, args.requests, args.concurrency)
            profiler.disable()
            if args.cprofile:
                print(f"\ncProfile, quota: {label} (tottime, the top 25)")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            if quota is not None and quota._redis is not None:
                await quota._redis.aclose()
            return float(pstats.Stats(profiler).total_calls) / args.requests  # type: ignore[attr-defined]

        n = uvloop.run(go())
        base = base or n
        print(f"| {label} | {n:.1f} | {n - base:+.1f} |")


def round_trips(redis_url: str, calls: int = 150) -> None:
    """The time of one script call (redis-py's writing and reading included), batches of
    64 and 16 requests: what the decision budget (25 ms) is measured against."""
    raw = config(redis_url).model_dump(by_alias=True)
    raw["decisionBudgetMs"] = 10000
    cfg = QuotaConfig.model_validate(raw)
    assert cfg.redis is not None
    times: list[float] = []

    async def go() -> None:
        quota = Quota(cfg, redis_client=connect_redis(cfg.redis, {}), on_redis_seconds=times.append)
        print("\n| requests a call | calls | p50 ms | p90 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|---|")
        for batch in (64, 16):
            times.clear()
            for _ in range(calls):
                await asyncio.gather(*(quota.admit("bench", 1) for _ in range(batch)))
            t = sorted(times)
            p50, p90, p99 = (t[int(len(t) * f)] * 1e3 for f in (0.5, 0.9, 0.99))
            print(f"| {batch} | {len(t)} | {p50:.2f} | {p90:.2f} | {p99:.2f} | {t[-1] * 1e3:.2f} |")
        await quota._redis.aclose()

    uvloop.run(go())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cprofile", action="store_true", help="print each one's profile")
    args = parser.parse_args()
    steps(args.requests)
    redis = LocalRedis().start()
    try:
        end_to_end(args, redis.url)
        calls(args, redis.url)
        round_trips(redis.url)
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
