"""The operator's machinery against in-memory stand-ins: the bounded work queue, the
informers' relists, and leader election on a Lease.

The stand-ins are for speed; each behaviour they cover is also proven against the real
control plane: a relist reports what vanished (e2e/test_connections.py, a watch frozen
while a model is deleted), a standby leads only after the Lease expires
(e2e/test_production.py), a leader that cannot renew writes nothing (e2e/test_leader.py,
SIGSTOP past the Lease), a clean shutdown hands the Lease back (e2e/test_leader.py).
Not yet: an absent optional CRD counting as synced (the e2e cluster installs both)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import httpx2
import pytest
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.handlers import Controller
from kubeonnx_operator.informer import Informer
from kubeonnx_operator.leader import LeaderElector
from kubeonnx_operator.workqueue import Stopped, WorkQueue
from lightkube import ApiError
from lightkube.models.meta_v1 import Status

ROOT = Path(__file__).resolve().parents[2]


def api_error(code: int, message: str = "") -> ApiError:
    request = httpx2.Request("GET", "https://api/x")
    response = httpx2.Response(
        code, request=request, json={"kind": "Status", "code": code, "message": message}
    )
    return ApiError(request=request, response=response, status=Status(code=code))


def body(name: str, generation: int = 1) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "generation": generation}}


async def wait_for(check: Any, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# The work queue ---------------------------------------------------------------------------


async def test_no_more_than_max_concurrent_reconciles_run_at_once() -> None:
    running = peak = done = 0

    async def reconcile(_: dict[str, Any]) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        done += 1

    queue = WorkQueue(reconcile, max_concurrent=2)
    for i in range(8):
        queue.observe(("ns", f"m{i}"), body(f"m{i}"))
    await wait_for(lambda: done == 8)
    assert peak == 2


async def test_child_events_do_not_cut_a_backoff_short_but_a_spec_change_does() -> None:
    calls: list[int] = []

    async def reconcile(b: dict[str, Any]) -> None:
        calls.append(b["metadata"]["generation"])
        if b["metadata"]["generation"] == 1:
            raise RuntimeError("webhook unavailable")

    queue = WorkQueue(reconcile, base_delay=30, max_delay=60)
    key = ("ns", "m")
    queue.observe(key, body("m"))
    await wait_for(lambda: calls == [1])
    await queue.idle()
    for _ in range(20):  # pods of the failing model changing state
        queue.trigger(key)
        queue.observe(key, body("m"))  # our own status write: same generation
    await asyncio.sleep(0.05)
    assert calls == [1], "a child event ran a reconcile during its backoff"
    queue.observe(key, body("m", generation=2))  # the user fixed the spec
    await wait_for(lambda: calls == [1, 2])
    await queue.idle()
    assert not queue._retries


async def test_a_new_generation_arriving_during_a_failing_run_is_not_held_by_its_backoff() -> None:
    calls: list[int] = []
    failing = asyncio.Event()

    async def reconcile(b: dict[str, Any]) -> None:
        calls.append(b["metadata"]["generation"])
        if b["metadata"]["generation"] == 1:
            await failing.wait()  # the user fixes the spec while this run is still going
            raise RuntimeError("webhook unavailable")

    queue = WorkQueue(reconcile, base_delay=60, max_delay=60)
    key = ("ns", "m")
    queue.observe(key, body("m"))
    await wait_for(lambda: calls == [1])
    queue.observe(key, body("m", generation=2))
    failing.set()
    await wait_for(lambda: calls == [1, 2])  # well before the 30-90 s backoff
    await queue.idle()
    assert not queue._retries and not queue._failures


async def test_a_stopped_queue_runs_nothing_until_started_and_stops_at_once() -> None:
    started = asyncio.Event()
    cancelled = False
    runs = 0

    async def reconcile(_: dict[str, Any]) -> None:
        nonlocal cancelled, runs
        runs += 1
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled = True
            raise

    queue = WorkQueue(reconcile, running=False)
    queue.observe(("ns", "m"), body("m"))
    await asyncio.sleep(0.05)
    assert runs == 0  # the caches are not synced, or another replica leads
    queue.start()
    await asyncio.wait_for(started.wait(), 2)
    await queue.stop()  # the Lease is lost
    assert cancelled and not queue._running
    queue.trigger(("ns", "m"))
    await asyncio.sleep(0.05)
    assert runs == 1


async def test_a_deletion_removes_only_the_object_it_names() -> None:
    async def reconcile(_: dict[str, Any]) -> None:
        pass

    queue = WorkQueue(reconcile)
    key = ("ns", "m")
    queue.observe(key, {"metadata": {"name": "m", "uid": "new", "generation": 1}})
    # The old object's DELETED arrives after the re-created one's ADDED.
    assert not queue.forget(key, "old") and key in queue.bodies
    assert queue.forget(key, "new") and key not in queue.bodies
    await queue.idle()


# Informers ----------------------------------------------------------------------------------


class Listing:
    def __init__(self, items: list[dict[str, Any]], version: str) -> None:
        self.items, self.resourceVersion = items, version

    async def __aiter__(self) -> Any:
        for item in self.items:
            yield copy.deepcopy(item)


class FakeClient:
    """list() answers from `objects`; watch() replays `events`, then fails with `error`."""

    def __init__(self) -> None:
        self.objects: list[dict[str, Any]] = []
        self.events: asyncio.Queue[tuple[str, dict[str, Any]] | Exception] = asyncio.Queue()
        self.lists = 0
        self.list_error: Exception | None = None
        self.selectors: list[Any] = []

    def list(self, res: Any, *, namespace: Any, labels: Any, chunk_size: int) -> Listing:
        self.lists += 1
        self.selectors.append(labels)
        if self.list_error is not None:
            raise self.list_error
        return Listing(self.objects, str(self.lists))

    async def watch_events(self, res: Any, **_: Any) -> Any:
        while True:
            event = await self.events.get()
            if isinstance(event, Exception):
                raise event
            yield event


def obj(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "9"},
    }


async def test_a_relist_after_the_watch_expires_reports_what_vanished_in_the_gap() -> None:
    client = FakeClient()
    client.objects = [obj("a", "ua"), obj("b", "ub")]
    seen: list[tuple[str, str, str]] = []
    informer = Informer(
        client,  # type: ignore[arg-type]
        lambda kind, o: seen.append((kind, o["metadata"]["name"], o["metadata"]["uid"])),
        labels={"app.kubernetes.io/managed-by": "kubeonnx"},
        api_version="v1",
        kind="Service",
    )
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.synced.wait(), 2)
    assert seen == [("ADDED", "a", "ua"), ("ADDED", "b", "ub")]
    assert client.selectors[0] == {"app.kubernetes.io/managed-by": "kubeonnx"}  # server-side
    # While the watch was down: b was deleted and a was deleted and re-created.
    client.objects = [obj("a", "ua2")]
    seen.clear()
    await client.events.put(api_error(410, "too old resource version"))
    await wait_for(lambda: client.lists == 2 and len(seen) == 3)
    assert seen[0] == ("ADDED", "a", "ua2")
    assert sorted(seen[1:]) == [("DELETED", "a", "ua"), ("DELETED", "b", "ub")]
    assert informer.relists == 1
    task.cancel()


async def test_a_kind_whose_crd_is_absent_counts_as_synced_and_empty() -> None:
    client = FakeClient()
    request = httpx2.Request("GET", "https://api/apis/monitoring.coreos.com/v1/podmonitors")
    client.list_error = httpx2.HTTPStatusError(
        "404", request=request, response=httpx2.Response(404, request=request)
    )
    informer = Informer(
        client,  # type: ignore[arg-type]
        lambda *_: None,
        api_version="monitoring.coreos.com/v1",
        kind="PodMonitor",
        optional=True,
    )
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.synced.wait(), 2)
    assert not informer.installed
    task.cancel()


# Leader election ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LeaseStore:
    """One Lease with resourceVersion checks, as the API server keeps it."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    def client_for(self) -> Any:
        store = self

        class Obj:
            def __init__(self, d: dict[str, Any]) -> None:
                self.d = d

            def to_dict(self) -> dict[str, Any]:
                return copy.deepcopy(self.d)

        class Client:
            async def get(self, res: Any, name: str, namespace: str) -> Obj:
                if store.down:
                    raise OSError("connection refused")
                if store.lease is None:
                    raise api_error(404)
                return Obj(store.lease)

            async def create(self, lease: Any) -> None:
                if store.down:
                    raise OSError("connection refused")
                if store.lease is not None:
                    raise api_error(409)
                store._write(lease.to_dict())

            async def replace(self, lease: Any) -> None:
                if store.down:
                    raise OSError("connection refused")
                d = lease.to_dict()
                if (
                    d["metadata"].get("resourceVersion")
                    != store.lease["metadata"]["resourceVersion"]
                ):  # type: ignore[index]
                    raise api_error(409)
                store._write(d)

        return Client()

    def _write(self, d: dict[str, Any]) -> None:
        self.version += 1
        d["metadata"]["resourceVersion"] = str(self.version)
        self.lease = d


async def test_one_leader_and_a_standby_that_takes_over_only_after_the_lease_expires() -> None:
    store, clock = LeaseStore(), Clock()

    def elector(name: str) -> LeaderElector:
        return LeaderElector(store.client_for(), "ops", "kubeonnx", name, clock=clock)

    a, b = elector("a"), elector("b")
    assert await a._try() and a.holding()
    assert not await b._try() and not b.holding()
    # a dies (no more renewals); b keeps looking: nothing for 15 s of its own clock.
    for _ in range(7):
        clock.now += 2
        assert not await b._try()
    assert not a.holding()  # a's own fence closed at 10 s: it wrote nothing since
    clock.now += 2  # 16 s since b first saw this record
    assert await b._try() and b.holding()
    assert store.lease is not None
    assert store.lease["spec"]["holderIdentity"] == "b"
    assert store.lease["spec"]["leaseTransitions"] == 1


async def test_a_leader_that_cannot_renew_stops_writing_before_anyone_can_take_over() -> None:
    store, clock = LeaseStore(), Clock()
    a = LeaderElector(store.client_for(), "ops", "kubeonnx", "a", clock=clock)
    assert await a._try()
    store.down = True  # the API server is unreachable from a
    clock.now += 9.9
    assert not await a._try() and a.holding()
    clock.now += 0.2  # the 10 s renew deadline passes, well before the 15 s lease
    assert not a.holding()


async def test_the_leader_releases_the_lease_on_a_clean_shutdown() -> None:
    store, clock = LeaseStore(), Clock()
    a = LeaderElector(store.client_for(), "ops", "kubeonnx", "a", clock=clock)
    b = LeaderElector(store.client_for(), "ops", "kubeonnx", "b", clock=clock)
    assert await a._try()
    await a.release()
    assert not a.holding()
    assert await b._try()  # at once: no 15 s wait


def operators_controller(store: LeaseStore, identity: str, clock: Clock) -> Controller:
    """The operator's Controller with its elector (its timings, not a test's) on the
    stand-in Lease."""
    config = OperatorConfig(leader_election=True, lease_namespace="ops")
    controller = Controller(
        FakeClient(),  # type: ignore[arg-type]
        config,
        ["ns"],
        lease_client=store.client_for(),
        identity=identity,
    )
    assert controller.elector is not None
    controller.elector.clock = clock
    return controller


def operators_elector(store: LeaseStore, identity: str, clock: Clock) -> LeaderElector:
    """The elector the operator builds (its timings, not a test's), on the stand-in Lease."""
    elector = operators_controller(store, identity, clock).elector
    assert elector is not None
    return elector


async def test_a_standby_takes_over_15_to_19_s_after_the_leaders_last_renewal() -> None:
    """docs/reference.md (the chart) states the takeover interval; this computes it from the
    operator's own elector. The leader renews every retry_s; a standby polls every retry_s
    at any phase against those renewals, first sees the last renewal up to one retry after
    it, and takes over at the first poll once the record has been unchanged for lease_s by
    its own clock: lease_s to lease_s + 2 * retry_s after the last renewal."""
    timings = operators_elector(LeaseStore(), "probe", Clock())
    low, high = timings.lease_s, timings.lease_s + 2 * timings.retry_s
    reference = " ".join((ROOT / "docs" / "reference.md").read_text().split())
    assert f"{low:g}-{high:g} s after the leader's last renewal" in reference, (low, high)
    retry = timings.retry_s
    for phase in (0.0, 0.25, 0.5, 1.0, 1.5, 1.75, 1.99):  # the standby's poll after a renewal
        store, clock = LeaseStore(), Clock()
        a, b = operators_elector(store, "a", clock), operators_elector(store, "b", clock)
        last_renewal = 3 * retry  # a renews at 0, 2, 4, 6 s, then dies
        polls = [(k * retry, a) for k in range(4)]
        polls += [(phase + k * retry, b) for k in range(40)]
        took_over = None
        for at, elector in sorted(polls, key=lambda p: (p[0], p[1] is b)):
            clock.now = at
            won = await elector._try()
            if elector is a:
                assert won
            elif won:
                took_over = at
                break
        assert took_over is not None, phase
        assert store.lease is not None and store.lease["spec"]["holderIdentity"] == "b"
        assert low <= took_over - last_renewal < high, (phase, took_over)


class RecordingApi:
    """The API the operator's Kube writes through: records each write, answers reads 404."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str]] = []

    async def patch(self, res: Any, name: str, obj: Any, **_: Any) -> dict[str, Any]:
        self.writes.append(("patch", name))
        return copy.deepcopy(obj) if isinstance(obj, dict) else {"metadata": {"name": name}}

    async def create(self, obj: Any, **_: Any) -> dict[str, Any]:
        self.writes.append(("create", type(obj).__name__))
        return {}

    async def delete(self, res: Any, name: str, **_: Any) -> None:
        self.writes.append(("delete", name))

    async def get(self, res: Any, name: str, **_: Any) -> Any:
        raise api_error(404)


async def test_a_reconcile_after_the_lease_is_lost_writes_nothing() -> None:
    """The operator's own wiring: its Kube writes only within its elector's budget. The leader
    reconciles (writes go out), loses the API server past the renew deadline, and the next
    reconcile of the same model sends no write at all."""
    store, clock = LeaseStore(), Clock()
    controller = operators_controller(store, "a", clock)
    elector = controller.elector
    assert elector is not None
    api = RecordingApi()
    controller.kube.client = api  # type: ignore[assignment]
    model = {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": {"model": {"uri": "s3://b/m.onnx"}},
    }
    assert await elector._try()
    await controller.reconciler.reconcile(copy.deepcopy(model))
    assert ("patch", "m") in api.writes  # the leader writes
    store.down = True
    clock.now += elector.renew_deadline_s + 0.1  # renewals failed until past the deadline
    assert not await elector._try()
    api.writes.clear()
    model["metadata"]["generation"] = 2
    model["spec"]["model"]["uri"] = "s3://b/m2.onnx"  # a change that would be applied
    with pytest.raises(Stopped, match="not the leader"):
        await controller.reconciler.reconcile(copy.deepcopy(model))
    assert api.writes == []  # no apply, no status, no Event
