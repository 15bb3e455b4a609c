"""README promises that had no test of their own, each against the real parts: the budget
headers of admitted and refused answers over HTTP, Retry-After's value, the ledger's
deduplication and `kubeonnx usage` with a real PostgreSQL, callback retries to a real
receiver, and results expiring after their TTL with a real redis-server. (Requests arriving
during the drain: `test_protocol.py::test_sigterm_drains_then_finishes_requests_that_outlast_it`.)
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from kubeonnx_runtime.quota import key_hash

from e2e.postgres_server import LocalPostgres
from e2e.redis_server import LocalRedis
from tests.runtime.conftest import KUBEONNX, Served
from tests.runtime.model_runs import wait_for


def mlp_body(rows: int) -> dict:  # type: ignore[type-arg]
    return {
        "inputs": [
            {"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": [0.5] * 4 * rows}
        ]
    }


# --- budget headers ------------------------------------------------------------------------


def window_end(at: float, window: str) -> datetime:
    """The end of the UTC calendar window under way at `at`, worked out with datetime."""
    t = datetime.fromtimestamp(at, UTC)
    if window == "1m":
        return t.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if window == "1h":
        return t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    assert window == "1d"
    return datetime.combine(t.date() + timedelta(days=1), datetime.min.time(), UTC)


def seconds_left(before: float, after: float, window: str) -> set[int]:
    """What a reset in whole seconds may read for a decision made between `before` and
    `after` (both in one window): rounded up, at least 1."""
    end = window_end(before, window).timestamp()
    assert window_end(after, window).timestamp() == end
    return set(range(max(1, math.ceil(end - after)), max(1, math.ceil(end - before)) + 1))


def parse_ratelimit(value: str) -> dict[str, dict[str, int]]:
    """`"name";r=1;t=2, ...` as {name: {r: 1, t: 2}}."""
    out = {}
    for item in value.split(","):
        name, *params = item.strip().split(";")
        out[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return out


@pytest.fixture
def quota_server(serve, models, tmp_path: Path) -> Served:  # type: ignore[no-untyped-def]
    # Tenant a: 4 requests a minute and 20 rows a day. Tenant b: 5 rows a day.
    policy = {
        "policy": f"p-{uuid.uuid4().hex[:8]}",
        "namespace": "tests",
        "tenants": [
            {
                "name": "a",
                "keySha256": [key_hash("a-key")],
                "limits": [
                    {"unit": "requests", "limit": 4, "window": "1m"},
                    {"unit": "rows", "limit": 20, "window": "1d"},
                ],
            },
            {
                "name": "b",
                "keySha256": [key_hash("b-key")],
                "limits": [
                    {"unit": "requests", "limit": 100, "window": "1h"},
                    {"unit": "rows", "limit": 5, "window": "1d"},
                ],
            },
        ],
    }
    path = tmp_path / "quota.json"
    path.write_text(json.dumps(policy))
    return serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        "--max-batch-size",
        "16",
        "--quota-config",
        str(path),
    )


def away_from_the_end_of(seconds: int, margin: float = 15) -> None:
    """Wait, if need be, so that the next `margin` seconds stay within one window of that
    length (the test's requests all fall in one minute, or one day)."""
    left = seconds - time.time() % seconds
    if left < margin:
        time.sleep(left + 0.1)


def test_admitted_answers_carry_the_budget_of_every_window_and_refused_ones_the_trio(
    quota_server: Served,
) -> None:
    away_from_the_end_of(60)
    url = f"{quota_server.url}/v2/models/mlp/infer"
    limits = {"requests-1m": 4, "rows-1d": 20}
    used = {"requests-1m": 0, "rows-1d": 0}
    for rows in (1, 8, 8, 1):
        before = time.time()
        answer = httpx.post(url, json=mlp_body(rows), headers={"X-Api-Key": "a-key"})
        after = time.time()
        assert answer.status_code == 200, answer.text
        used["requests-1m"] += 1
        used["rows-1d"] += rows
        left = {name: limits[name] - used[name] for name in limits}

        h = answer.headers
        assert h["ratelimit-policy"] == '"requests-1m";q=4;w=60, "rows-1d";q=20;w=86400'
        budget = parse_ratelimit(h["ratelimit"])
        assert {name: b["r"] for name, b in budget.items()} == left
        for name, b in budget.items():
            assert b["t"] in seconds_left(before, after, name.split("-")[1]), (name, b)
        # The X-RateLimit-* trio and Retry-After are for refusals (design change 91).
        assert not [k for k in h if k.startswith("x-ratelimit-") or k == "retry-after"], h

    # The fifth request of the minute is refused; it says when the minute ends.
    before = time.time()
    refused = httpx.post(url, json=mlp_body(1), headers={"X-Api-Key": "a-key"})
    after = time.time()
    assert refused.status_code == 429
    assert "requests-1m" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) in seconds_left(before, after, "1m")
    assert refused.headers["x-ratelimit-limit"] == "4"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["x-ratelimit-reset"] == refused.headers["retry-after"]
    assert parse_ratelimit(refused.headers["ratelimit"])["requests-1m"]["r"] == 0


def test_retry_after_of_a_daily_window_is_the_time_to_midnight_utc(quota_server: Served) -> None:
    away_from_the_end_of(86400)
    url = f"{quota_server.url}/v2/models/mlp/infer"
    admitted = httpx.post(url, json=mlp_body(4), headers={"X-Api-Key": "b-key"})
    assert admitted.status_code == 200
    before = time.time()
    refused = httpx.post(url, json=mlp_body(2), headers={"X-Api-Key": "b-key"})  # 6 of 5 rows
    after = time.time()
    assert refused.status_code == 429
    assert "rows-1d" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) in seconds_left(before, after, "1d")
    assert refused.headers["x-ratelimit-limit"] == "5"
    assert refused.headers["x-ratelimit-remaining"] == "1"  # 4 used; the refused 2 not counted
    # A request that fits is still admitted: the refused one cost nothing.
    assert httpx.post(url, json=mlp_body(1), headers={"X-Api-Key": "b-key"}).status_code == 200


# --- the ledger and `kubeonnx usage` with a real PostgreSQL --------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.remove()


async def test_a_batch_committed_but_not_confirmed_is_written_again_and_counted_once(
    postgres: LocalPostgres, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The connection drops right after PostgreSQL commits a batch: the ledger cannot know
    the batch is in, keeps it, and writes it again; ON CONFLICT leaves one row each, and the
    second write is a success: nothing refused, dropped or set aside."""
    import psycopg
    from kubeonnx_runtime.ledger import Ledger

    policy = f"p-{uuid.uuid4().hex[:8]}"
    written: list[int] = []
    dropped: list[int] = []
    spill = tmp_path / "spill"
    ledger = Ledger(
        postgres.dsn,
        policy=policy,
        model="m",
        flush_every_s=0.05,
        on_written=written.append,
        on_dropped=dropped.append,
        spill_dir=spill,
    )
    for i in range(7):
        ledger.record("acme", i + 1, f"r-{i}")

    commit = psycopg.AsyncConnection.commit
    commits: list[int] = []
    lost: list[int] = []

    async def commit_then_drop(self: psycopg.AsyncConnection) -> None:  # type: ignore[type-arg]
        await commit(self)
        commits.append(ledger.pending)
        if len(commits) == 2:  # the first batch (after the schema) is in; its confirmation lost
            lost.append(ledger.pending)
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.AsyncConnection, "commit", commit_then_drop)
    task = asyncio.create_task(ledger.run())
    try:
        deadline = time.monotonic() + 30
        while not lost or ledger.pending:
            assert time.monotonic() < deadline, f"{ledger.pending} rows still pending"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await ledger.close()
    assert lost == [7]
    rows = postgres.query(
        f"SELECT request_id, rows FROM kubeonnx_usage WHERE policy = '{policy}' ORDER BY 1"
    )
    assert rows == [(f"r-{i}", i + 1) for i in range(7)]
    # Written once as far as the ledger knows, not refused by the primary key and set aside.
    assert sum(written) == 7 and dropped == []
    assert not list(spill.glob("*.rejected"))


def test_kubeonnx_usage_since_and_model_against_a_real_table(postgres: LocalPostgres) -> None:
    import psycopg
    from kubeonnx_runtime.ledger import INSERT, SCHEMA

    policy = f"p-{uuid.uuid4().hex[:8]}"
    # Days far in the past, so no other test's rows (written today) fall in the report.
    rows = []
    for n, (day, tenant, model, count) in enumerate(
        [
            ("2001-03-01", "acme", "m1", 2),
            ("2001-03-02", "acme", "m1", 3),
            ("2001-03-02", "acme", "m2", 1),
            ("2001-03-02", "globex", "m1", 4),
            ("2001-03-03", "acme", "m1", 5),
        ]
    ):
        for k in range(count):
            at = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(hours=k)
            rows.append((f"{policy}-{n}-{k}", at, policy, tenant, model, k + 1, None, 7 * k))
    with psycopg.connect(postgres.dsn) as conn:
        conn.execute(SCHEMA)
        with conn.cursor() as cur:
            cur.executemany(INSERT, rows)

    def report(*args: str) -> list[list[str]]:
        out = subprocess.run(
            [KUBEONNX, "usage", "--dsn", postgres.dsn, "--until", "2001-04-01", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert out[0].split() == ["DAY", "TENANT", "MODEL", "REQUESTS", "ROWS", "TOKENS"]
        return [line.split() for line in out[1:]]

    def expected(since: str, model: str | None) -> list[list[str]]:
        totals: dict[tuple[str, str, str], list[int]] = {}
        for _, at, _, tenant, m, n, _, tokens in rows:
            if at.date().isoformat() >= since and model in (None, m):
                t = totals.setdefault((at.date().isoformat(), tenant, m), [0, 0, 0])
                t[0] += 1
                t[1] += n
                t[2] += tokens
        return [
            [d, t, m, str(c), str(r), str(k)] for (d, t, m), (c, r, k) in sorted(totals.items())
        ]

    assert report("--since", "2001-03-02", "--model", "m1") == expected("2001-03-02", "m1")
    assert report("--since", "2001-03-02", "--model", "m1") == [
        ["2001-03-02", "acme", "m1", "3", "6", "21"],
        ["2001-03-02", "globex", "m1", "4", "10", "42"],
        ["2001-03-03", "acme", "m1", "5", "15", "70"],
    ]
    assert report("--since", "2001-03-01") == expected("2001-03-01", None)
    assert report("--since", "2001-03-03", "--model", "m2") == []
    bad = subprocess.run(
        [KUBEONNX, "usage", "--dsn", postgres.dsn, "--since", "March"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "'March' is not a date" in bad.stderr


# --- asynchronous requests with a real redis-server ----------------------------------------


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = LocalRedis().start()
    yield server.url
    server.stop()


def async_replica(serve, models, url: str, **env: str) -> Served:  # type: ignore[no-untyped-def]
    return serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        env={
            "KUBEONNX_ASYNC_REDIS_URL": url,
            "KUBEONNX_ASYNC_PREFIX": "kubeonnx:{tests/mlp}",
            **env,
        },
    )


class FlakyReceiver(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` callbacks, then 204; keeps what it was sent."""

    failures = 2
    received: list[dict] = []  # type: ignore[type-arg]
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            self.received.append(body)
            status = 503 if len(self.received) <= self.failures else 204
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_callback_refused_twice_is_tried_again_until_it_is_taken(
    serve, models, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), FlakyReceiver)
    FlakyReceiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        served = async_replica(
            serve, models, redis_url, KUBEONNX_ASYNC_CALLBACK_HOSTS="127.0.0.1:*"
        )
        with httpx.Client(base_url=served.url, timeout=10) as http:
            queued = http.post(
                "/v2/models/mlp/async-infer",
                json=mlp_body(1),
                headers={"Kubeonnx-Callback-Url": f"http://127.0.0.1:{receiver.server_port}/hook"},
            )
            assert queued.status_code == 202, queued.text
            request_id = queued.json()["id"]
        want = {"id": request_id, "model": "mlp", "status": "done"}
        wait_for(lambda: len(FlakyReceiver.received) >= 3, "the third callback", 60)
        assert FlakyReceiver.received == [want] * 3  # two refused, the third taken
        # Taken: no fourth try, and the request is acknowledged.
        import redis

        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: client.xlen("kubeonnx:{tests/mlp}:requests") == 0, "the acknowledgement")
        time.sleep(2)  # longer than the backoff before a fourth try would be
        assert len(FlakyReceiver.received) == 3
    finally:
        receiver.shutdown()


def test_a_result_is_404_once_its_ttl_has_passed(serve, models, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    import redis

    served = async_replica(serve, models, redis_url, KUBEONNX_ASYNC_RESULT_TTL_S="5")
    client = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=served.url, timeout=10) as http:
        queued = http.post("/v2/models/mlp/async-infer", json=mlp_body(1))
        location = queued.headers["location"]
        record = f"kubeonnx:{{tests/mlp}}:request:{queued.json()['id']}"
        done = wait_for(
            lambda: (a := http.get(location)).status_code == 200 and a, "the result", 30
        )
        assert done.headers["kubeonnx-request-status"] == "done"
        # The result's lifetime is the TTL from when it was written (not the week a pending
        # request is kept).
        assert 0 < client.pttl(record) <= 5000
        gone = wait_for(
            lambda: (a := http.get(location)).status_code == 404 and a, "the result expiring", 30
        )
    assert "never submitted, or its result has expired" in gone.json()["error"]
