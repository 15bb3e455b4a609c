"""Charge only what is served: a request refused after its quota decision (a full queue, a
full batcher, a callback host not allowed, a synchronous request to the gateway) leaves no
count in its tenant's windows and no row in the ledger."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kubeonnx_runtime.app import InferHandler, create_app
from kubeonnx_runtime.batching import Batcher
from kubeonnx_runtime.dataplane import DataPlane
from kubeonnx_runtime.datatypes import TensorSpec
from kubeonnx_runtime.errors import InvalidRequest, ServerBusy
from kubeonnx_runtime.metrics import RuntimeMetrics
from kubeonnx_runtime.quota import Quota, QuotaConfig, connect_redis, key_hash
from prometheus_client import CollectorRegistry

from e2e.postgres_server import LocalPostgres
from e2e.redis_server import LocalRedis
from tests.runtime.test_async import body, start_gateway
from tests.runtime.test_ledger import pending
from tests.runtime.test_quota_redis import not_near_midnight, write_policy


class Ledger:
    """The ledger's one method the handler calls, remembered."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int]] = []

    def record(self, tenant: str, rows: int, request_id: str | None, tokens: int = 0) -> None:
        self.rows.append((tenant, rows))


def quota_config(**extra: Any) -> QuotaConfig:
    return QuotaConfig.model_validate(
        {
            "policy": "team",
            "namespace": "tests",
            "tenants": [
                {
                    "name": "acme",
                    "keySha256": [key_hash("acme-key")],
                    "limits": [
                        {"unit": "requests", "limit": 100, "window": "1d"},
                        {"unit": "rows", "limit": 1000, "window": "1d"},
                    ],
                }
            ],
            **extra,
        }
    )


async def used(quota: Quota) -> dict[str, int]:
    usage = await quota.usage("acme")
    return {f"{u['unit']}-{u['window']}": u["used"] for u in usage["limits"]}


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_charge_is_kept_when_served_and_refunded_when_refused(
    store: str, redis_server: LocalRedis
) -> None:
    not_near_midnight()
    metrics = RuntimeMetrics(CollectorRegistry())
    outcomes: list[str] = []

    def decided(tenant: str, outcome: str) -> None:
        outcomes.append(outcome)

    if store == "redis":
        config = quota_config(
            redis={"url": redis_server.url},
            policy=f"refund-{time.time_ns()}",
            decisionBudgetMs=10000,  # what is charged is the point here, not the budget
        )
        client = connect_redis(config.redis, {})
        quota = Quota(config, redis_client=client, on_decision=decided)
    else:
        quota = Quota(quota_config(), on_decision=decided)
    ledger = Ledger()
    plane = DataPlane(None, None, name="m", version="1")
    handler = InferHandler(plane, metrics, 1024, quota, ledger)  # type: ignore[arg-type]

    async def answer(rows: int, outcome: Exception | None) -> int:
        async def work() -> tuple[int, str, list[tuple[bytes, bytes]], bytes]:
            await handler.charge("acme", lambda: rows)
            if outcome is not None:
                raise outcome
            return 200, "application/json", [], b"{}"

        return (await handler.metered(work(), "inference"))[0]

    async def main() -> None:
        assert await answer(3, None) == 200
        assert await used(quota) == {"requests-1d": 1, "rows-1d": 3}
        assert ledger.rows == [("acme", 3)]
        # Refused after the decision: the batcher or the queue is full.
        assert await answer(5, ServerBusy("the request queue is full")) == 503
        await quota.drain()  # a refund to Redis runs after the answer
        assert await used(quota) == {"requests-1d": 1, "rows-1d": 3}
        assert ledger.rows == [("acme", 3)]
        # The model itself refused the input: the work was done, the charge stands.
        assert await answer(2, InvalidRequest("the model refused it")) == 400
        assert await used(quota) == {"requests-1d": 2, "rows-1d": 5}
        assert ledger.rows == [("acme", 3), ("acme", 2)]

    asyncio.run(main())
    handler.close()
    assert outcomes == ["admitted", "admitted", "refunded", "admitted"]


class HeldModel:
    """A model whose runs wait until the test lets them go."""

    inputs = [TensorSpec("input", "FP32", (-1, 4))]
    outputs = [TensorSpec("output", "FP32", (-1, 4))]
    output_names = ["output"]
    device = "cpu"

    def __init__(self) -> None:
        self.running = threading.Event()
        self.release = threading.Event()

    def check_outputs(self, names: list[str]) -> None:
        pass

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running.set()
        self.release.wait(60)
        return {"output": inputs["input"]}


def test_a_full_batcher_refuses_before_the_charge() -> None:
    model = HeldModel()
    batcher = Batcher(model.run, max_batch_size=1, max_delay_s=0, max_queue=1, batchable=False)
    plane = DataPlane(model, batcher, name="m", version="1")
    outcomes: list[str] = []
    quota = Quota(quota_config(), on_decision=lambda tenant, outcome: outcomes.append(outcome))
    ledger = Ledger()
    app = create_app(plane, RuntimeMetrics(CollectorRegistry()), quota=quota, ledger=ledger)  # type: ignore[arg-type]
    request = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}

    async def main() -> None:
        batcher.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as http:

            def post() -> Any:
                return http.post(
                    "/v2/models/m/infer", json=request, headers={"X-Api-Key": "acme-key"}
                )

            running = asyncio.create_task(post())
            await asyncio.to_thread(model.running.wait, 30)
            queued = asyncio.create_task(post())
            deadline = time.monotonic() + 30
            while batcher.depth < 1:
                assert time.monotonic() < deadline, "the second request was never queued"
                await asyncio.sleep(0.01)
            refused = await post()
            assert refused.status_code == 503, refused.text
            assert "queue is full" in refused.json()["error"]
            model.release.set()
            assert (await running).status_code == (await queued).status_code == 200
        await batcher.stop()
        assert await used(quota) == {"requests-1d": 2, "rows-1d": 2}
        assert ledger.rows == [("acme", 1), ("acme", 1)]
        # Never decided, rather than charged and refunded (which leaves the same counts).
        assert outcomes == ["admitted", "admitted"]

    asyncio.run(main())


@pytest.fixture(scope="module")
def postgres() -> Any:
    server = LocalPostgres().start()
    yield server
    server.remove()


def decisions(served: Any, tenant: str) -> dict[str, float]:
    """The served process's kubeonnx_quota_decisions_total for `tenant`, by decision."""
    found = {}
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line.startswith("kubeonnx_quota_decisions_total{") and f'tenant="{tenant}"' in line:
            decision = line.split('decision="', 1)[1].split('"', 1)[0]
            found[decision] = float(line.rsplit(" ", 1)[1])
    return found


def test_the_gateway_charges_only_what_it_queues(
    serve, redis_server: LocalRedis, postgres: LocalPostgres, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Refused at the gateway: a callback host not allowed (400), a synchronous request
    (404), a full queue (503). Only the queued request is counted and written."""
    not_near_midnight()
    store = LocalRedis().start()  # the queue: its own, so that it starts empty
    try:
        limits = {"acme": [{"unit": "requests", "limit": 100, "window": "1d"}]}
        config = write_policy(
            tmp_path,
            redis_server.url,
            limits,
            ledger={"dsnEnv": "LEDGER_DSN"},
            decisionBudgetMs=10000,  # what is charged is the point here, not the budget
        )
        gateway = start_gateway(
            serve,
            store.url,
            KUBEONNX_QUOTA_CONFIG=str(config),
            KUBEONNX_ASYNC_MAX_QUEUED="1",
            KUBEONNX_ASYNC_CALLBACK_HOSTS="hooks.example.com",
            LEDGER_DSN=postgres.dsn,
        )
        acme = {"X-Api-Key": "acme-key"}
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            hook = {**acme, "Kubeonnx-Callback-Url": "http://elsewhere.example.org/hook"}
            answer = http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=hook)
            assert answer.status_code == 400 and "not allowed" in answer.json()["error"]
            answer = http.post("/v2/models/mlp/infer", json=body([1] * 4), headers=acme)
            assert answer.status_code == 404
            answer = http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=acme)
            assert answer.status_code == 202
            answer = http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=acme)
            assert answer.status_code == 503 and "queue is full" in answer.json()["error"]
            usage = http.get("/v2/quota", headers=acme).json()
        assert usage["limits"][0]["used"] == 1  # was 4: every refusal was charged
        policy = usage["policy"]
        # The 400 and the 404 are never decided (charging and refunding them would leave the
        # same count); the full queue is known only as the entry is queued, after the charge.
        deadline = time.monotonic() + 30
        while not decisions(gateway, "acme").get("refunded") and time.monotonic() < deadline:
            time.sleep(0.1)  # the refund runs after the answer
        assert decisions(gateway, "acme") == {"admitted": 2, "refunded": 1}

        deadline = time.monotonic() + 60
        while pending(gateway) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending(gateway) == 0
        written = postgres.query(
            f"SELECT tenant, rows FROM kubeonnx_usage WHERE policy = '{policy}'"
        )
        assert written == [("acme", 1)]
    finally:
        store.stop()
