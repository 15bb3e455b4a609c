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
