"""The operator's API connections over real HTTP, against a small stand-in API server on
loopback: a watch that stops delivering is listed again, a write never outlives the Lease,
readiness and liveness tell the truth. The same behaviours against the real control plane:
e2e/test_connections.py and e2e/test_leader.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from aiohttp import web
from kubeonnx_operator import kube
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.handlers import WATCH_DOWN_LIMIT_S, Controller
from kubeonnx_operator.informer import Informer
from kubeonnx_operator.kube import ApiClient, Kube, connect
from kubeonnx_operator.metrics import health_app
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import Cluster, User

from tests.operator.test_controller import FakeClient, obj, wait_for

SERVICES = "/api/v1/namespaces/ns/services"


class ApiServer:
    """Lists and watches Services in namespace ns, and takes applies; a watch can be made
    to freeze (the connection stays open and silent, as a half-open one does)."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.version = 1
        self.freeze_watches = False
        self.watches: list[dict[str, str]] = []  # each watch request's query
        self.lists = 0
        self.user_agents: set[str] = set()
        self.writes: list[float] = []  # arrival time of each write (monotonic)
        self.hold = asyncio.Event()  # a slow request (/slow) is answered when set
        self.slow_arrived = asyncio.Event()  # a slow request is being held
        self.url = ""

    async def services(self, request: web.Request) -> web.StreamResponse:
        self.user_agents.add(request.headers.get("User-Agent", ""))
        if request.query.get("watch") != "true":
            self.lists += 1
            body = {
                "kind": "ServiceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": self.objects,
            }
            return web.json_response(body)
        self.watches.append(dict(request.query))
        response = web.StreamResponse()
        await response.prepare(request)
        if self.freeze_watches:
            await asyncio.sleep(3600)  # silent: neither an event nor an end
        bookmark = {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "9"}}
        await response.write(json.dumps({"type": "BOOKMARK", "object": bookmark}).encode() + b"\n")
        await asyncio.sleep(3600)
        return response

    async def apply(self, request: web.Request) -> web.Response:
        self.writes.append(time.monotonic())
        return web.json_response(obj(request.match_info["name"], "u1"))

    async def slow(self, _: web.Request) -> web.Response:
        self.slow_arrived.set()
        await self.hold.wait()
        return web.json_response({})

    async def __aenter__(self) -> ApiServer:
        app = web.Application()
        app.router.add_get(SERVICES, self.services)
        app.router.add_patch(SERVICES + "/{name}", self.apply)
        app.router.add_get("/slow", self.slow)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: Any) -> None:
        self.hold.set()
        await self.runner.cleanup()

    def client(self, connections: int = 8) -> ApiClient:
        config = KubeConfig.from_one(cluster=Cluster(server=self.url), user=User(token="t"))
        return connect(
            connections=connections, user_agent="kubeonnx-operator (a_1)", config=config.get()
        )


@pytest.fixture
async def server() -> AsyncIterator[ApiServer]:
    async with ApiServer() as s:
        yield s


async def test_a_watch_that_stops_delivering_is_listed_again_and_sees_what_changed(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "WATCH_READ_MARGIN_S", 0.5)  # 30 s in production
    server.objects = [obj("a", "ua")]
    server.freeze_watches = True
    client = server.client()
    seen: list[tuple[str, str]] = []
    informer = Informer(
        client,
        lambda kind, o: seen.append((kind, o["metadata"]["name"])),
        namespace="ns",
        api_version="v1",
        kind="Service",
        watch_timeout_s=1,
    )
    task = asyncio.create_task(informer.run())
    try:
        await wait_for(lambda: seen == [("ADDED", "a")] and server.watches, 10)
        # The connection is silent from now on; meanwhile b is created.
        server.objects = [obj("a", "ua"), obj("b", "ub")]
        server.version = 2
        server.freeze_watches = False
        await wait_for(lambda: ("ADDED", "b") in seen, 20)
        assert server.lists >= 2 and informer.relists >= 1
    finally:
        task.cancel()
        await client.close()
    first = server.watches[0]
    assert first["allowWatchBookmarks"] == "true"
    assert 1 <= int(first["timeoutSeconds"]) <= 2  # jittered between 1x and 2x
    assert first["resourceVersion"] == "1"
    assert server.user_agents == {"kubeonnx-operator (a_1)"}


async def test_each_watch_asks_for_a_timeout_jittered_between_1x_and_2x() -> None:
    """With a timeout large enough for int() to keep the jitter: the values stay in range
    and differ from one watch to the next (a fixed value would synchronise relists)."""
    asked: list[int] = []

    class Recorder:
        async def watch_events(self, *args: Any, timeout_s: int, **kwargs: Any) -> Any:
            asked.append(timeout_s)
            return
            yield  # an async generator that ends at once

    informer = Informer(
        Recorder(),  # type: ignore[arg-type]
        lambda kind, o: None,
        namespace="ns",
        api_version="v1",
        kind="Service",
        watch_timeout_s=300,
    )
    for _ in range(20):
        await informer._watch("1")
    assert len(asked) == 20
    assert all(300 <= t <= 600 for t in asked), asked
    assert len(set(asked)) > 1, asked


async def test_a_write_that_cannot_be_sent_within_the_leases_time_is_never_sent(
    server: ApiServer,
) -> None:
    client = server.client(connections=1)
    holder = asyncio.create_task(client._client._client.get("/slow"))  # the only connection
    await asyncio.wait_for(server.slow_arrived.wait(), 30)  # it holds the connection now
    budget_end = time.monotonic() + 0.5
    fenced = Kube(client, write_budget=lambda: budget_end - time.monotonic())
    manifest = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "ns"}}
    try:
        with pytest.raises(TimeoutError):
            await fenced.apply(manifest)
        server.hold.set()  # the connection is free now, 1 s after the write's budget ended
        await holder
        # A deliberate window in which nothing may happen: a write abandoned at its budget
        # but still queued for the freed connection would arrive now, and must not.
        await asyncio.sleep(0.5)
        assert server.writes == [], "a write landed after the Lease could have passed on"
        # With time left, the same write goes through.
        budget_end = time.monotonic() + 5
        await fenced.apply(manifest)
        assert len(server.writes) == 1
    finally:
        await client.close()


def controller_on(client: FakeClient, **config: Any) -> Controller:
    settings = OperatorConfig(leader_election=False, **config)
    return Controller(client, settings, ["ns"])  # type: ignore[arg-type]


async def test_readiness_fails_when_a_watch_has_been_down_for_minutes() -> None:
    client = FakeClient()
    controller = controller_on(client)
    now = [0.0]
    for informer in controller.informers:
        informer.clock = lambda: now[0]
    tasks = [asyncio.create_task(i.run()) for i in controller.informers]
    try:
        await wait_for(lambda: controller.ready() is None, 5)
        client.list_error = OSError("connection refused")  # the API server is gone
        for _ in controller.informers:
            await client.events.put(httpx2.ReadTimeout("no answer"))
        await wait_for(
            lambda: all(
                i.down_for() == 0 and i._failing_since is not None for i in controller.informers
            ),
            5,
        )
        assert controller.ready() is None  # a moment's failure is not a reason
        now[0] += WATCH_DOWN_LIMIT_S + 1
        assert "watch down: InferenceModel in ns" in (controller.ready() or "")
        client.list_error = None  # back: the next list clears it
        await wait_for(lambda: controller.ready() is None, 70)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_liveness_fails_when_a_background_task_ends() -> None:
    client = FakeClient()
    controller = controller_on(client, resync_seconds=0.05)

    calls = 0

    def broken() -> None:  # fine at the start, not at the first resync
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("a bug in the resync")

    controller.queue.trigger_all = broken  # type: ignore[method-assign]
    runner = web.AppRunner(health_app(controller.ready, controller.alive))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}")
    run = controller.supervise(asyncio.create_task(controller.run()), "the controller")
    try:
        assert (await http.get("/healthz")).status_code == 200
        await wait_for(lambda: run.done(), 5)
        response = await http.get("/healthz")
        assert response.status_code == 500
        assert "the resync ended: RuntimeError('a bug in the resync')" in response.text
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await http.aclose()
        await runner.cleanup()
