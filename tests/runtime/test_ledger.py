"""The usage ledger with a real PostgreSQL: what was admitted is what the table holds, once,
even when PostgreSQL is down for part of the load; and `kubeonnx usage` reports it."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.postgres_server import LocalPostgres
from e2e.redis_server import LocalRedis
from tests.runtime.conftest import KUBEONNX, Served
from tests.runtime.test_quota_redis import infer, not_near_midnight, serve_mlp, write_policy
from tests.runtime.test_quota_tokens import IDS, NONZERO, serve_text


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.remove()


def pending(served: Served) -> float:
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line.startswith("kubeonnx_ledger_pending_rows{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("kubeonnx_ledger_pending_rows is not exported")


def load(replicas: list[Served], sends: int) -> Counter[tuple[str, str]]:
    """`sends` requests over three tenants and both replicas, 64 at a time; returns the
    admitted requests and rows per tenant as the clients saw them."""
    rows = {"a": 1, "b": 2, "c": 3}
    plan = [("abc"[i % 3], replicas[i % 2]) for i in range(sends)]
    seen: Counter[tuple[str, str]] = Counter()
    with (
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64)) as http,
        concurrent.futures.ThreadPoolExecutor(64) as pool,
    ):
        for tenant, response in pool.map(
            lambda p: (p[0], infer(http, p[1], p[0], rows[p[0]])), plan
        ):
            assert response.status_code in (200, 429), response.text
            if response.status_code == 200:
                seen[(tenant, "requests")] += 1
                seen[(tenant, "rows")] += rows[tenant]
    return seen


def test_admitted_usage_reaches_the_ledger_once_even_across_an_outage(
    serve, models, redis_server: LocalRedis, postgres: LocalPostgres, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    not_near_midnight()
    limits = {
        "a": [{"unit": "requests", "limit": 70, "window": "1d"}],
        "b": [{"unit": "rows", "limit": 90, "window": "1d"}],
        "c": [],  # unlimited: every request admitted
    }
    # What reaches the ledger is the point, not the budget (it has tests of its own).
    config = write_policy(
        tmp_path, redis_server.url, limits, ledger={"dsnEnv": "LEDGER_DSN"}, decisionBudgetMs=10000
    )
    policy = json.loads(config.read_text())["policy"]
    env = {"LEDGER_DSN": postgres.dsn}
    replicas = [serve_mlp(serve, models, config, env=env) for _ in range(2)]

    started = time.monotonic()
    admitted = load(replicas, 150)
    healthy = time.monotonic() - started
    postgres.stop()  # mid-run: inference goes on, rows wait in memory
    started = time.monotonic()
    admitted += load(replicas, 150)
    # Not slowed by the outage: the ledger is written off the request path. Compared with the
    # same load while the ledger was up (a timeout per request would add seconds each), not
    # with a fixed bound that a loaded machine can pass.
    assert time.monotonic() - started < 3 * healthy + 10, healthy
    assert sum(pending(r) for r in replicas) > 0
    postgres.start()
    deadline = time.monotonic() + 60
    while sum(pending(r) for r in replicas) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(pending(r) for r in replicas) == 0

    table = {
        tenant: (requests, rows)
        for tenant, requests, rows in postgres.query(
            f"SELECT tenant, count(*), sum(rows) FROM kubeonnx_usage WHERE policy = '{policy}' "
            "GROUP BY tenant"
        )
    }
    for tenant in "abc":
        assert table[tenant] == (admitted[(tenant, "requests")], admitted[(tenant, "rows")])
    assert admitted[("a", "requests")] == 70 and admitted[("b", "rows")] == 90

    report = subprocess.run(
        [KUBEONNX, "usage", "--dsn", postgres.dsn, "--tenant", "c"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert report[0].split() == ["DAY", "TENANT", "MODEL", "REQUESTS", "ROWS", "TOKENS"]
    (line,) = report[1:]  # a fresh database: this test's rows only
    today = time.strftime("%Y-%m-%d", time.gmtime())
    c = admitted[("c", "requests")], admitted[("c", "rows")]
    assert line.split() == [today, "c", "mlp", str(c[0]), str(c[1]), "0"]  # no tokens counted


def test_tokens_reach_the_ledger_and_the_report_and_an_older_table_gets_their_column(
    serve, models, redis_server: LocalRedis, postgres: LocalPostgres, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    not_near_midnight()
    # The table as the ledger made it before the unit tokens existed, with a row of then, in
    # a schema of its own (the connection's search_path) so no other test's rows are in it.
    schema = f"s{uuid.uuid4().hex[:8]}"
    dsn = f"{postgres.dsn}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(
            f"CREATE TABLE {schema}.kubeonnx_usage (id text PRIMARY KEY, at timestamptz NOT "
            "NULL, policy text NOT NULL, tenant text NOT NULL, model text NOT NULL, rows bigint "
            "NOT NULL, request_id text)"
        )
        conn.execute(
            f"INSERT INTO {schema}.kubeonnx_usage VALUES ('old', now(), 'p', 'tk', 'text', 1, NULL)"
        )
    limits = {"tk": [{"unit": "tokens", "limit": 15, "window": "1d"}]}
    config = write_policy(
        tmp_path,
        redis_server.url,
        limits,
        tokens=NONZERO,
        ledger={"dsnEnv": "LEDGER_DSN"},
        decisionBudgetMs=10000,
    )
    policy = json.loads(config.read_text())["policy"]
    served = serve_text(serve, models, config, env={"LEDGER_DSN": dsn})
    # (attention_mask, its rows): 3, 5, 1 and 2 + 4 tokens, 15 in all; then 3 more, refused.
    masks = [
        [[1, 1, 1, 0, 0]],
        [[1, 1, 1, 1, 1]],
        [[1, 0, 0, 0, 0]],
        [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]],
        [[1, 1, 1, 0, 0]],
    ]
    codes = []
    with httpx.Client(timeout=30) as http:
        for mask in masks:
            shape = [len(mask), 5]
            body = {
                "inputs": [
                    {
                        "name": "input_ids",
                        "shape": shape,
                        "datatype": "INT64",
                        "data": IDS * len(mask),
                    },
                    {"name": "attention_mask", "shape": shape, "datatype": "INT64", "data": mask},
                ]
            }
            answer = http.post(
                f"{served.url}/v2/models/text/infer", json=body, headers={"X-Api-Key": "tk-key"}
            )
            codes.append(answer.status_code)
    assert codes == [200, 200, 200, 200, 429]
    deadline = time.monotonic() + 60
    while pending(served) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pending(served) == 0

    (written,) = postgres.query(
        f"SELECT count(*), sum(rows), sum(tokens) FROM {schema}.kubeonnx_usage "
        f"WHERE policy = '{policy}'"
    )
    assert written == (4, 5, 15)  # the refused request is not in it
    assert postgres.query(f"SELECT tokens FROM {schema}.kubeonnx_usage WHERE id = 'old'") == [(0,)]

    report = subprocess.run(
        [KUBEONNX, "usage", "--dsn", dsn, "--tenant", "tk"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert report[0].split() == ["DAY", "TENANT", "MODEL", "REQUESTS", "ROWS", "TOKENS"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert [line.split() for line in report[1:]] == [[today, "tk", "text", "5", "6", "15"]]


def own_schema(postgres: LocalPostgres, *statements: str) -> str:
    """A DSN whose search_path is a schema of its own, where `statements` ran ({s}: its name),
    so that no other test's rows or table are in it."""
    import psycopg

    schema = f"s{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        for statement in statements:
            conn.execute(statement.format(s=schema))
    return f"{postgres.dsn}?options=-csearch_path%3D{schema}"


OLD_TABLE = (
    "CREATE TABLE {s}.kubeonnx_usage (id text PRIMARY KEY, at timestamptz NOT NULL, policy text "
    "NOT NULL, tenant text NOT NULL, model text NOT NULL, rows bigint NOT NULL, request_id text)"
)


async def test_a_connecting_replica_waits_on_no_open_transaction_that_read_the_table(
    postgres: LocalPostgres,
) -> None:
    """ALTER TABLE ... ADD COLUMN IF NOT EXISTS takes an ACCESS EXCLUSIVE lock even when the
    column is there: a replica (re)connecting waited behind a report's open transaction, and
    every other replica's inserts queued behind it. The schema step reads the catalogs and
    changes only what is missing."""
    import asyncio

    import psycopg
    from kubeonnx_runtime.ledger import Ledger

    dsn = own_schema(postgres)
    first = Ledger(dsn, policy="p", model="m")
    first.record("acme", 1, None, 3)
    await first._write_batch()  # the table made, column and index included
    reader = psycopg.connect(dsn)  # a report's transaction, left open, has read the table
    reader.execute("SELECT count(*) FROM kubeonnx_usage").fetchone()
    second = Ledger(dsn, policy="p", model="m")
    second.record("acme", 2, None, 5)
    connecting = asyncio.create_task(second._write_batch())
    try:
        # Until the connecting replica has written, or a session of the server waits on a lock.
        waiting: list[tuple[str]] = []
        while not connecting.done() and not waiting:
            waiting = await asyncio.to_thread(
                postgres.query,
                "SELECT query FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            await asyncio.sleep(0.05)
        assert connecting.done(), f"the connecting replica waits on a lock: {waiting}"
        await connecting
        first.record("acme", 1, None, 4)
        await first._write_batch()  # the other replica's insert, the report still open
    finally:
        reader.rollback()
        reader.close()
        await connecting
        await first._disconnect()
        await second._disconnect()
    (written,) = postgres.query(
        f"SELECT count(*), sum(tokens) FROM {dsn.rsplit('%3D', 1)[1]}.kubeonnx_usage"
    )
    assert written == (3, 12)


async def test_an_older_table_gets_its_column_and_index_from_a_connecting_replica(
    postgres: LocalPostgres,
) -> None:
    from kubeonnx_runtime.ledger import Ledger

    dsn = own_schema(postgres, OLD_TABLE)
    schema = dsn.rsplit("%3D", 1)[1]
    led = Ledger(dsn, policy="p", model="m")
    led.record("acme", 1, None, 3)
    await led._write_batch()
    await led._disconnect()
    assert postgres.query(f"SELECT tokens FROM {schema}.kubeonnx_usage") == [(3,)]
    assert postgres.query(
        f"SELECT indexname FROM pg_indexes WHERE schemaname = '{schema}' ORDER BY 1"
    ) == [("kubeonnx_usage_at",), ("kubeonnx_usage_pkey",)]


def test_kubeonnx_usage_reports_a_table_made_before_token_budgets_with_0_tokens(
    postgres: LocalPostgres,
) -> None:
    """Until a runtime of this version connects, the table has no column tokens: the report
    is made all the same, saying so, instead of failing on the missing column."""
    dsn = own_schema(
        postgres,
        OLD_TABLE,
        "INSERT INTO {s}.kubeonnx_usage VALUES "
        "('a', '2001-03-01T10:00Z', 'p', 'acme', 'm', 2, NULL)",
        "INSERT INTO {s}.kubeonnx_usage VALUES "
        "('b', '2001-03-01T11:00Z', 'p', 'acme', 'm', 3, NULL)",
    )
    done = subprocess.run(
        [KUBEONNX, "usage", "--dsn", dsn, "--until", "2001-04-01"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "has no column tokens yet" in done.stderr and "shown as 0" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["DAY", "TENANT", "MODEL", "REQUESTS", "ROWS", "TOKENS"]
    assert [line.split() for line in lines[1:]] == [["2001-03-01", "acme", "m", "2", "5", "0"]]
