"""Asynchronous inference with a real redis-server: submission while no consumer runs, two
replicas draining the queue while one is SIGKILLed, dead letters, quotas and callbacks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from kubeonnx_runtime.app import prefers_async
from kubeonnx_runtime.asyncinfer import GROUP, AsyncKeys, check_callback
from kubeonnx_runtime.errors import InvalidRequest
from kubeonnx_runtime.quota import key_hash
from kubeonnx_runtime.server import LEDGER_RESERVE_S, STOP_MARGIN_S

from e2e.redis_server import LocalRedis
from tests.runtime.conftest import Served
from tests.runtime.model_runs import hooked_env, release, row_digest, runs, wait_for, wait_held

PREFIX = "kubeonnx:{tests/mlp}"
GRACE_S = 14  # a stop budget of 7 s for the requests in hand, short enough for a test
KEYS = AsyncKeys(PREFIX)


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = LocalRedis().start()
    yield server.url
    server.stop()


def async_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "KUBEONNX_ASYNC_REDIS_URL": url,
        "KUBEONNX_ASYNC_PREFIX": PREFIX,
        "KUBEONNX_ASYNC_CLAIM_AFTER_S": "2",
        **extra,
    }


def start(  # type: ignore[no-untyped-def]
    serve, models: dict[str, Path], url: str, *args: str, wait_ready: bool = True, **extra: str
) -> Served:
    return serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        "--max-batch-size",
        "16",
        *args,
        env=async_env(url, **extra),
        wait_ready=wait_ready,
    )


def start_gateway(serve, url: str, **extra: str) -> Served:  # type: ignore[no-untyped-def]
    """The runtime in role gateway: it takes asynchronous requests and runs no model."""
    return serve(
        "--role",
        "gateway",
        "--model-name",
        "mlp",
        "--model-uri",
        "file:///none",
        env=async_env(url, **extra),
    )


def body(values: list[float]) -> dict:  # type: ignore[type-arg]
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": values}]}


def wait_done(http: httpx.Client, location: str, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        answer = http.get(location)
        if answer.status_code != 202:
            return answer
        assert time.monotonic() < deadline, f"{location} still pending: {answer.text}"
        time.sleep(0.1)


def redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)


def test_prefer_respond_async_answers_202_then_the_same_answer_as_sync(
    serve, models: dict[str, Path], redis_url: str
) -> None:
    served = start(serve, models, redis_url)
    with httpx.Client(base_url=served.url, timeout=10) as http:
        sync = http.post("/v2/models/mlp/infer", json=body([1, 2, 3, 4]))
        queued = http.post(
            "/v2/models/mlp/infer", json=body([1, 2, 3, 4]), headers={"Prefer": "respond-async"}
        )
        assert queued.status_code == 202, queued.text
        assert queued.headers["preference-applied"] == "respond-async"
        location = queued.headers["location"]
        assert location == f"/v2/models/mlp/requests/{queued.json()['id']}"
        done = wait_done(http, location)
        assert done.status_code == 200
        assert done.headers["kubeonnx-request-status"] == "done"
        assert done.json()["outputs"] == sync.json()["outputs"]

        # The explicit endpoint, and a request the model refuses once it runs: the status says
        # why, with the code the synchronous call would have had.
        queued = http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4]))
        assert queued.status_code == 202
        assert wait_done(http, queued.headers["location"]).status_code == 200

        refused = http.post(
            "/v2/models/mlp/async-infer",
            json={"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]},
        )
        assert refused.status_code == 400  # a replica checks against the model at once
        assert "unknown input 'nope'" in refused.json()["error"]

        missing = http.get("/v2/models/mlp/requests/0123456789abcdef")
        assert missing.status_code == 404
        assert "never submitted, or its result has expired" in missing.json()["error"]


def test_a_model_without_async_ignores_prefer_and_has_no_async_endpoint(
    serve, models: dict[str, Path]
) -> None:
    served = serve("--model-uri", f"file://{models['mlp']}", "--model-name", "mlp")
    with httpx.Client(base_url=served.url, timeout=10) as http:
        answer = http.post(
            "/v2/models/mlp/infer", json=body([1, 2, 3, 4]), headers={"Prefer": "respond-async"}
        )
        assert answer.status_code == 200  # RFC 7240: a preference may be ignored
        refused = http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4]))
        assert refused.status_code == 404
        assert "spec.async is not enabled" in refused.json()["error"]


def expected_outputs(model: Path, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": inputs})[0]


def consumers(client) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Each consumer's count of requests held (delivered, not acknowledged)."""
    return {
        c["name"].decode(): c["pending"]
        for c in client.xinfo_consumers(KEYS.stream, GROUP)
        if isinstance(c["name"], bytes)
    }


def pending_to(client, consumer: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The request ids of the entries delivered to `consumer` and not acknowledged."""
    entries = client.xpending_range(KEYS.stream, GROUP, "-", "+", 10_000, consumername=consumer)
    ids = []
    for entry in entries:
        ((_, fields),) = client.xrange(KEYS.stream, entry["message_id"], entry["message_id"])
        ids.append(fields[b"id"].decode())
    return ids


def holding(client, consumer: str, n: int) -> list[str] | None:  # type: ignore[no-untyped-def]
    """What `consumer` holds, once it holds `n` requests."""
    held = pending_to(client, consumer)
    return held if len(held) == n else None


def consumer_of(client, served: Served) -> str:  # type: ignore[no-untyped-def]
    """The consumer name of a replica (its pid is part of it)."""
    return wait_for(
        lambda: next((n for n in consumers(client) if f"-{served.proc.pid}-" in n), None),
        f"replica {served.proc.pid} in the consumer group",
    )


def test_a_thousand_requests_queued_with_no_consumer_are_answered_once_despite_a_sigkill(
    serve, models: dict[str, Path], redis_url: str, tmp_path: Path
) -> None:
    """What the model ran is counted by a wrapper around each replica's model run, in a log
    of its own per replica, not by the worker: a request run twice would show there."""
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((1000, 4)).astype(np.float32)
    expected = expected_outputs(models["mlp"], inputs)
    digest_of = {row_digest(inputs[i]): i for i in range(1000)}
    assert len(digest_of) == 1000

    # Only the gateway runs: it takes requests and runs no model.
    gateway = start_gateway(serve, redis_url)
    ids: dict[str, int] = {}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:

        def submit(i: int) -> tuple[str, int]:
            answer = http.post("/v2/models/mlp/async-infer", json=body(inputs[i].tolist()))
            assert answer.status_code == 202, answer.text
            return answer.json()["id"], i

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = dict(pool.map(submit, range(1000)))
    assert len(ids) == 1000
    client = redis_client(redis_url)
    assert client.xlen(KEYS.stream) == 1000
    assert client.get(KEYS.completed) is None  # nothing ran: no consumer yet
    # What KEDA's redis-streams trigger reads to scale from zero: the group's lag.
    (group,) = client.xinfo_groups(KEYS.stream)
    assert group["lag"] == 1000

    # The first replica answers two batches, then its third model run is held: it holds
    # all the requests it may take at once (16), and its process is SIGKILLed holding them
    # while a second replica drains the queue.
    victim_runs, second_runs = tmp_path / "victim", tmp_path / "second"
    victim = start(
        serve,
        models,
        redis_url,
        KUBEONNX_ASYNC_CONCURRENCY="16",
        # A model run of 2 ms, so runs stay off the event loop: the held one does not stop
        # the replica from finishing what it ran before.
        **hooked_env(victim_runs, hold_run=2, run_seconds=0.002),
    )
    wait_held(victim_runs, victim)
    victim_name = consumer_of(client, victim)
    held = wait_for(lambda: holding(client, victim_name, 16), "the first replica holding 16")
    ran_before_kill = runs(victim_runs)
    assert [r.number for r in ran_before_kill] == [0, 1]
    second = start(serve, models, redis_url, **hooked_env(second_runs))
    wait_for(lambda: runs(second_runs), "the second replica's first model run")
    victim.stop(signal.SIGKILL)
    assert second.proc.poll() is None

    deadline = time.monotonic() + 120
    while int(client.get(KEYS.completed) or 0) < 1000:
        assert time.monotonic() < deadline, f"completed {client.get(KEYS.completed)} of 1000"
        time.sleep(0.2)
    metrics = httpx.get(f"{second.url}/metrics").text
    assert 'kubeonnx_async_outcomes_total{model="mlp",outcome="done",version="1"}' in metrics
    # The second replica stopped: it answers what it holds before it exits, so every model
    # run it began, a duplicate were there one, has returned and is in its run log.
    assert second.stop(signal.SIGTERM) == 0

    assert int(client.get(KEYS.completed)) == 1000
    assert client.xlen(KEYS.stream) == 0  # every entry acknowledged and deleted
    assert client.xlen(KEYS.dead) == 0
    assert client.xpending(KEYS.stream, GROUP)["pending"] == 0
    (group,) = client.xinfo_groups(KEYS.stream)
    assert group["lag"] == 0  # known (not null) after the deletions: nothing left to scale on

    # The model runs, as the wrappers logged them: every request ran exactly once, in one
    # replica or the other; the killed replica's held run never returned.
    ran = runs(victim_runs) + runs(second_runs)
    assert runs(victim_runs) == ran_before_kill
    times_run = Counter(digest_of[d] for r in ran for d in r.rows)
    assert sorted(times_run) == list(range(1000))
    assert set(times_run.values()) == {1}, [i for i, n in times_run.items() if n > 1]
    by_second = {digest_of[d] for r in runs(second_runs) for d in r.rows}
    assert {ids[h] for h in held} <= by_second  # what the killed one held, the other ran
    assert len(by_second) < 1000  # the first replica's answers were not run again

    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        for request_id, i in ids.items():
            answer = http.get(f"/v2/models/mlp/requests/{request_id}")
            assert answer.status_code == 200, answer.text
            got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(got, expected[i], rtol=1e-5, atol=1e-6)


def test_sigterm_answers_the_requests_in_flight_and_leaves_the_rest_queued(
    serve, models: dict[str, Path], redis_url: str, tmp_path: Path
) -> None:
    """A replica's first model run is held while it holds 4 requests (its concurrency) of
    40, then it gets SIGTERM: it waits for the held run, writes and acknowledges those 4,
    takes no more, and exits 0; the other 36 stay queued, undelivered, for the next one."""
    gateway = start_gateway(serve, redis_url)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        ids = [
            http.post("/v2/models/mlp/async-infer", json=body([float(i)] * 4)).json()["id"]
            for i in range(40)
        ]
    client = redis_client(redis_url)
    hooks = tmp_path / "hooks"
    served = start(
        serve,
        models,
        redis_url,
        KUBEONNX_ASYNC_CONCURRENCY="4",
        KUBEONNX_GRACE_SECONDS=str(GRACE_S),
        **hooked_env(hooks, hold_run=0),
    )
    wait_held(hooks, served)
    name = consumer_of(client, served)
    held = wait_for(lambda: holding(client, name, 4), "the replica holding 4 requests")
    signalled = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: answering the 4 requests" in served.logs(), "the worker stopping")

    # The held run outlasts half the worker's budget for the requests in hand (the grace
    # period less the margin and the ledger's reserve, from the signal; no HTTP drain here):
    # until then the replica is alive, holds the 4, and has read no more. The other half is
    # the margin for a late look on a loaded machine. A deliberate window in which nothing may
    # happen, watched, not slept through.
    budget_s = GRACE_S - STOP_MARGIN_S - LEDGER_RESERVE_S

    def half_the_budget_passed() -> bool:
        assert served.proc.poll() is None, "the replica exited within its in-flight budget"
        assert pending_to(client, name) == held
        return time.monotonic() - signalled >= budget_s / 2

    wait_for(half_the_budget_passed, "half the in-flight budget to pass")
    release(hooks)
    assert served.proc.wait(30) == 0

    statuses = {i: client.hget(KEYS.record(i), "status").decode() for i in ids}
    assert {i for i, s in statuses.items() if s == "done"} == set(held)
    assert client.xpending(KEYS.stream, GROUP)["pending"] == 0  # the 4 acknowledged
    assert client.xlen(KEYS.stream) == 36
    (group,) = client.xinfo_groups(KEYS.stream)
    assert group["lag"] == 36  # never delivered: the next replica takes them
    queued = {f[b"id"].decode() for _, f in client.xrange(KEYS.stream)}
    assert queued == set(ids) - set(held)

    after = start(serve, models, redis_url)
    with httpx.Client(base_url=after.url, timeout=10) as http:
        for request_id in ids:
            done = wait_done(http, f"/v2/models/mlp/requests/{request_id}")
            assert done.status_code == 200, done.text


def test_a_request_delivered_max_attempts_times_goes_to_the_dead_letter_stream(
    serve, models: dict[str, Path], redis_url: str
) -> None:
    gateway = start_gateway(serve, redis_url)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        queued = http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4]))
        assert queued.status_code == 202
        location = queued.headers["location"]
        request_id = queued.json()["id"]
    # Three replicas took it in turn and died holding it: three deliveries, never acknowledged.
    client = redis_client(redis_url)
    entry = client.xreadgroup(GROUP, "crashed-0", {KEYS.stream: ">"}, count=1)[0][1][0][0]
    for n in (1, 2):
        client.xclaim(KEYS.stream, GROUP, f"crashed-{n}", 0, [entry])

    served = start(serve, models, redis_url, KUBEONNX_ASYNC_MAX_ATTEMPTS="3")
    with httpx.Client(base_url=served.url, timeout=10) as http:
        answer = wait_done(http, location)
    assert answer.status_code == 500
    assert answer.headers["kubeonnx-request-status"] == "failed"
    error = answer.json()["error"]
    assert error.startswith("gave up after 3 attempts"), error
    assert "killed or restarted" in error
    dead = client.xrange(KEYS.dead)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"id"].decode() == request_id
    assert json.loads(fields[b"body"]) == body([1, 2, 3, 4])  # kept whole, to be replayed
    assert client.xlen(KEYS.stream) == 0


def test_a_request_answered_but_not_acknowledged_is_not_run_again(
    serve, models: dict[str, Path], redis_url: str
) -> None:
    gateway = start_gateway(serve, redis_url)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        queued = http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4]))
    request_id = queued.json()["id"]
    # A replica took it, wrote its result, and was killed before acknowledging it.
    client = redis_client(redis_url)
    client.xreadgroup(GROUP, "crashed", {KEYS.stream: ">"}, count=1)
    written = b'{"model_name":"mlp","outputs":[]}'
    client.hset(KEYS.record(request_id), mapping={"status": "done", "result": written})

    served = start(serve, models, redis_url)
    deadline = time.monotonic() + 30
    while client.xlen(KEYS.stream):
        assert time.monotonic() < deadline, "the answered request was never acknowledged"
        time.sleep(0.1)
    with httpx.Client(base_url=served.url, timeout=10) as http:
        assert http.get(queued.headers["location"]).content == written  # not run again
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'outcome="done"' not in metrics


def test_the_gateway_checks_the_protocol_and_a_replica_the_model(
    serve, models: dict[str, Path], redis_url: str
) -> None:
    gateway = start_gateway(serve, redis_url, KUBEONNX_ASYNC_MAX_QUEUED="2")
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        bad = http.post("/v2/models/mlp/async-infer", content=b"{not json")
        assert bad.status_code == 400
        assert "not valid JSON" in bad.json()["error"]
        sync = http.post("/v2/models/mlp/infer", json=body([1, 2, 3, 4]))
        assert sync.status_code == 404
        assert "asynchronous gateway" in sync.json()["error"]
        # The gateway has no model to check input names against: a replica does, and the
        # request's status says what it refused.
        wrong = http.post(
            "/v2/models/mlp/async-infer",
            json={"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]},
        )
        assert wrong.status_code == 202
        assert http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4])).status_code == 202
        full = http.post("/v2/models/mlp/async-infer", json=body([1, 2, 3, 4]))
        assert full.status_code == 503
        assert "queue is full (2 requests)" in full.json()["error"]
        assert full.headers["retry-after"] == "1"

    served = start(serve, models, redis_url)
    with httpx.Client(base_url=served.url, timeout=10) as http:
        failed = wait_done(http, wrong.headers["location"])
        assert failed.status_code == 400
        assert failed.json()["status"] == "failed"
        assert "unknown input 'nope'" in failed.json()["error"]


def test_quota_applies_at_submission_and_a_tenant_reads_only_its_own_requests(
    serve, models: dict[str, Path], redis_url: str, tmp_path: Path
) -> None:
    policy = {
        "policy": "async",
        "namespace": "tests",
        "tenants": [
            {
                "name": name,
                "keySha256": [key_hash(f"{name}-key")],
                "limits": [{"unit": "requests", "limit": 2, "window": "1m"}],
            }
            for name in ("acme", "globex")
        ],
    }
    path = tmp_path / "quota.json"
    path.write_text(json.dumps(policy))
    gateway = start_gateway(serve, redis_url, KUBEONNX_QUOTA_CONFIG=str(path))
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        acme = {"X-Api-Key": "acme-key"}
        assert http.post("/v2/models/mlp/async-infer", json=body([1] * 4)).status_code == 401
        first = http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=acme)
        assert first.status_code == 202
        assert (
            http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=acme).status_code
            == 202
        )
        refused = http.post("/v2/models/mlp/async-infer", json=body([1] * 4), headers=acme)
        assert refused.status_code == 429  # refused before it is queued
        assert "retry-after" in refused.headers
        assert redis_client(redis_url).xlen(KEYS.stream) == 2

        location = first.headers["location"]
        globex = {"X-Api-Key": "globex-key"}
        assert http.get(location, headers=acme).status_code == 202
        other = http.get(location, headers=globex)
        assert other.status_code == 404  # another tenant's request does not exist for it

        start(serve, models, redis_url)  # a worker: the requests run and their results are kept
        deadline = time.monotonic() + 30
        while (done := http.get(location, headers=acme)).status_code == 202:
            assert time.monotonic() < deadline, done.text
            time.sleep(0.1)
        assert done.status_code == 200, done.text
        # Finished, it is still not another tenant's to read.
        assert http.get(location, headers=globex).status_code == 404
        # A record that names no tenant is no tenant's to read: the lookup fails closed.
        record = KEYS.record(location.rstrip("/").rsplit("/", 1)[-1])
        redis_client(redis_url).hset(record, "tenant", "")
        assert http.get(location, headers=acme).status_code == 404
        assert http.get(location, headers=globex).status_code == 404


def test_redis_frozen_or_killed_is_a_503_and_the_queue_recovers_after(
    serve, models: dict[str, Path]
) -> None:
    redis = LocalRedis().start()
    try:
        served = start(serve, models, redis.url)
        with httpx.Client(base_url=served.url, timeout=10) as http:
            ok = http.post("/v2/models/mlp/async-infer", json=body([1] * 4))
            assert wait_done(http, ok.headers["location"]).status_code == 200
            redis.pause()  # frozen: no answer at all
            started = time.monotonic()
            frozen = http.post("/v2/models/mlp/async-infer", json=body([1] * 4))
            assert frozen.status_code == 503
            assert "asynchronous queue (Redis) is unavailable" in frozen.json()["error"]
            assert time.monotonic() - started < 5
            redis.kill()  # and then gone, its data with it
            gone = http.post("/v2/models/mlp/async-infer", json=body([1] * 4))
            assert gone.status_code == 503
            assert http.get(ok.headers["location"]).status_code == 503
            # Sync inference never depended on the queue.
            assert http.post("/v2/models/mlp/infer", json=body([1] * 4)).status_code == 200
            redis.start()  # empty: the worker makes its group again
            deadline = time.monotonic() + 30
            while True:
                again = http.post("/v2/models/mlp/async-infer", json=body([1] * 4))
                if again.status_code == 202:
                    break
                assert time.monotonic() < deadline, again.text
                time.sleep(0.2)
            assert wait_done(http, again.headers["location"]).status_code == 200
    finally:
        redis.stop()


class _Callbacks(BaseHTTPRequestHandler):
    received: list[dict] = []  # type: ignore[type-arg]

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_callback_is_called_only_on_an_allowed_host(
    serve, models: dict[str, Path], redis_url: str
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Callbacks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served = start(serve, models, redis_url, KUBEONNX_ASYNC_CALLBACK_HOSTS="127.0.0.1:*")
        url = f"http://127.0.0.1:{server.server_port}/done"
        with httpx.Client(base_url=served.url, timeout=10) as http:
            refused = http.post(
                "/v2/models/mlp/async-infer",
                json=body([1] * 4),
                headers={"Kubeonnx-Callback-Url": "http://169.254.169.254/latest/meta-data"},
            )
            assert refused.status_code == 400
            assert "callback host '169.254.169.254' is not allowed" in refused.json()["error"]
            queued = http.post(
                "/v2/models/mlp/async-infer",
                json=body([1] * 4),
                headers={"Kubeonnx-Callback-Url": url},
            )
            assert queued.status_code == 202
            request_id = queued.json()["id"]
            assert wait_done(http, queued.headers["location"]).status_code == 200
        deadline = time.monotonic() + 10
        while not _Callbacks.received:
            assert time.monotonic() < deadline, "no callback"
            time.sleep(0.05)
        assert _Callbacks.received == [{"id": request_id, "model": "mlp", "status": "done"}]
    finally:
        server.shutdown()


def test_prefer_header_parsing() -> None:
    assert prefers_async("respond-async")
    assert prefers_async("wait=10, respond-async")
    assert prefers_async("Respond-Async; foo=bar")
    assert not prefers_async("return=minimal")
    assert not prefers_async(None)


def test_callback_hosts() -> None:
    check_callback("https://hooks.example.com/x", ["*.example.com"])
    check_callback("http://ci.internal:8080/", ["ci.internal:8080"])
    for url, hosts, problem in [
        ("ftp://x.example.com/", ["*.example.com"], "must be an http or https URL"),
        ("https://example.com.evil.net/", ["*.example.com"], "is not allowed"),
        ("https://a.example.com/", [], "calls no callbacks"),
    ]:
        with pytest.raises(InvalidRequest, match=problem):
            check_callback(url, hosts)


def in_process_worker(client, infer, *, claim_after_s: float, consumer: str | None = None):  # type: ignore[no-untyped-def]
    """A replica's worker in the test's own process, with `infer` in place of the model."""
    from kubeonnx_runtime.asyncinfer import AsyncWorker
    from kubeonnx_runtime.codec import decode_request

    return AsyncWorker(
        client,
        KEYS,
        decode=decode_request,
        infer=infer,
        model_name="mlp",
        model_version="1",
        max_attempts=3,
        result_ttl_s=60,
        claim_after_s=claim_after_s,
        concurrency=1,
        consumer=consumer,
    )


async def test_departed_consumers_are_forgotten_but_not_those_holding_requests(
    redis_url: str,
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    await client.xgroup_create(KEYS.stream, GROUP, id="0", mkstream=True)
    await client.xadd(KEYS.stream, {"id": "x"})
    await client.xreadgroup(GROUP, "holds-one", {KEYS.stream: ">"}, count=1)
    await client.xgroup_createconsumer(KEYS.stream, GROUP, "departed")

    async def never(_: object) -> dict[str, object]:
        raise AssertionError("not called")

    worker = in_process_worker(client, never, claim_after_s=60)
    worker.forget_after_ms = -1
    await worker._forget_departed()
    names = {c["name"].decode() for c in await client.xinfo_consumers(KEYS.stream, GROUP)}
    assert names == {"holds-one"}
    await client.aclose()


async def test_a_request_running_longer_than_claim_after_is_not_run_twice(
    redis_url: str,
) -> None:
    """Two replicas in one process, a model run of 2.5 s and claim_after of 1 s: without the
    heartbeat the second replica would take the request over and run it again."""
    import redis.asyncio as aioredis
    from kubeonnx_runtime.asyncinfer import AsyncStore, AsyncWorker

    client = aioredis.Redis.from_url(redis_url)
    runs: list[str] = []
    started = asyncio.Event()

    def worker(name: str) -> AsyncWorker:
        async def slow(request: object) -> dict[str, object]:
            runs.append(name)
            started.set()
            await asyncio.sleep(2.5)
            return {"output": np.zeros((1, 3), np.float32)}

        return in_process_worker(client, slow, claim_after_s=1, consumer=name)

    store = AsyncStore(client, KEYS, max_queued=10, callback_hosts=[])
    request_id = await store.submit(
        json.dumps(body([1] * 4)).encode(), None, tenant="", callback=None
    )
    first, second = worker("first"), worker("second")
    tasks = [asyncio.create_task(first.run())]
    await asyncio.wait_for(started.wait(), 10)
    tasks.append(asyncio.create_task(second.run()))
    deadline = time.monotonic() + 10
    while (await store.lookup(request_id, None)).status == "pending":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    first.stop()
    second.stop()
    await asyncio.gather(*tasks)
    assert runs == ["first"]
    assert int(await client.get(KEYS.completed)) == 1
    await client.aclose()
