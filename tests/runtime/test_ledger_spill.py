"""Usage rows waiting for PostgreSQL survive a SIGTERM, with a real PostgreSQL: the stopping
replica spills them to its spill directory within its grace period, and the next process
to start with that directory writes them, once each."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from kubeonnx_runtime.ledger import Ledger

from e2e.postgres_server import LocalPostgres
from e2e.redis_server import LocalRedis
from tests.runtime.test_ledger import pending
from tests.runtime.test_quota_redis import infer, serve_mlp, write_policy

# The gateway's terminationGracePeriodSeconds, the shorter of the two the operator renders.
GRACE_S = 30


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.remove()


def table_rows(postgres: LocalPostgres, policy: str) -> list[tuple[str, str, int]]:
    return postgres.query(
        f"SELECT request_id, tenant, rows FROM kubeonnx_usage WHERE policy = '{policy}'"
    )


def test_rows_waiting_for_postgres_survive_a_sigterm_and_reach_the_table_once(
    serve, models, redis_server: LocalRedis, postgres: LocalPostgres, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = write_policy(tmp_path, redis_server.url, {"a": []}, ledger={"dsnEnv": "LEDGER_DSN"})
    policy = json.loads(config.read_text())["policy"]
    spill = tmp_path / "spill"
    env = {"LEDGER_DSN": postgres.dsn, "KUBEONNX_LEDGER_SPILL_DIR": str(spill)}

    first = serve_mlp(serve, models, config, env=env)
    with httpx.Client(timeout=30) as http:
        assert infer(http, first, "a").status_code == 200  # the table exists from here
        deadline = time.monotonic() + 30
        while pending(first):
            assert time.monotonic() < deadline, "the first row was never written"
            time.sleep(0.2)
        postgres.stop()
        sent = [f"req-{i}" for i in range(30)]
        for rid in sent:
            answer = http.post(
                f"{first.url}/v2/models/mlp/infer",
                json={
                    "inputs": [
                        {"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}
                    ]
                },
                headers={"X-Api-Key": "a-key", "X-Request-Id": rid},
            )
            assert answer.status_code == 200, answer.text
    assert pending(first) == 30

    first.proc.send_signal(signal.SIGTERM)
    try:
        code = first.proc.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {GRACE_S}s after SIGTERM") from None
    assert code == 0, first.logs()
    assert len(list(spill.glob("*.rows"))) == 1, first.logs()

    postgres.start()
    second = serve_mlp(serve, models, config, env=env)
    deadline = time.monotonic() + 60
    while len(table_rows(postgres, policy)) < 31:
        assert time.monotonic() < deadline, f"{len(table_rows(postgres, policy))} rows of 31"
        time.sleep(0.2)
    rows = table_rows(postgres, policy)
    ids = sorted(rid for rid, _, _ in rows if rid.startswith("req-"))
    assert ids == sorted(sent)  # each once
    assert all(tenant == "a" and n == 2 for rid, tenant, n in rows if rid.startswith("req-"))
    deadline = time.monotonic() + 30
    while list(spill.iterdir()):  # the taken-over file goes once its rows are written
        assert time.monotonic() < deadline, list(spill.iterdir())
        time.sleep(0.2)
    second.stop()


async def test_a_spill_replayed_twice_counts_each_row_once(
    postgres: LocalPostgres, tmp_path: Path
) -> None:
    """A replica killed while replaying a spill (after writing its rows, before deleting
    it): the next one replays it again, and the table's key keeps each row once."""
    spill = tmp_path / "spill"
    down = Ledger(
        "postgresql://kubeonnx@127.0.0.1:1/none", policy="twice", model="m", spill_dir=spill
    )
    for i in range(5):
        down.record("t", 1, f"r{i}")
    await down.close(flush_s=0.5)
    (written,) = spill.glob("*.rows")
    copy = written.read_text()

    for _ in range(2):
        ledger = Ledger(
            postgres.dsn, policy="twice", model="m", spill_dir=spill, flush_every_s=0.05
        )
        task = asyncio.create_task(ledger.run())
        deadline = time.monotonic() + 30
        while ledger.pending or list(spill.glob("*.rows*")):
            assert time.monotonic() < deadline, ledger.pending
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ledger.close()
        # As if a replica had been killed while replaying it (its claimed name left).
        (spill / "again.rows.0123456789abcdef").write_text(copy)
    rows = postgres.query("SELECT request_id, at FROM kubeonnx_usage WHERE policy = 'twice'")
    assert sorted(r for r, _ in rows) == [f"r{i}" for i in range(5)]
    assert all(at <= datetime.now(UTC) for _, at in rows)


def test_a_postgres_that_never_answers_does_not_hold_up_the_stop(
    serve, models, redis_server: LocalRedis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL's port takes connections and never answers (a half-dead host): the last
    write is cut short, the rows are spilled, and the process ends within the grace period."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        config = write_policy(
            tmp_path, redis_server.url, {"a": []}, ledger={"dsnEnv": "LEDGER_DSN"}
        )
        spill = tmp_path / "spill"
        dsn = f"postgresql://kubeonnx@127.0.0.1:{hole.getsockname()[1]}/postgres"
        served = serve_mlp(
            serve, models, config, env={"LEDGER_DSN": dsn, "KUBEONNX_LEDGER_SPILL_DIR": str(spill)}
        )
        with httpx.Client(timeout=30) as http:
            for _ in range(10):
                assert infer(http, served, "a").status_code == 200
        served.proc.send_signal(signal.SIGTERM)
        try:
            assert served.proc.wait(GRACE_S) == 0, served.logs()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {GRACE_S}s after SIGTERM") from None
        (written,) = spill.glob("*.rows")
        assert len(written.read_text().splitlines()) == 10
    finally:
        hole.close()
