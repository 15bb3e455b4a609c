"""The usage ledger under the reviewer's attacks: records made while a batch commits, a stop
while a spill is being replayed, a row PostgreSQL refuses, and a starting replica next to a
live one replaying a spill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubeonnx_runtime import ledger as ledger_module
from kubeonnx_runtime.ledger import Ledger, _row_line
from kubeonnx_runtime.server import LEDGER_RESERVE_S, STOP_MARGIN_S, stop_budget

from e2e.postgres_server import LocalPostgres
from e2e.redis_server import LocalRedis
from tests.runtime.test_quota_redis import infer, serve_mlp, write_policy

DOWN = "postgresql://kubeonnx@127.0.0.1:1/none"


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    yield server
    server.remove()


def spill_file(path: Path, ids: list[str]) -> None:
    now = datetime.now(UTC)
    path.write_text("".join(_row_line((rid, now, "p", "t", "m", 1, rid, 0)) for rid in ids))


def ids_on_disk(spill: Path) -> list[str]:
    found = []
    for path in spill.glob("*.rows*"):
        found += [ledger_module._parse_row(line)[0] for line in path.read_text().splitlines()]
    return sorted(found)


class SlowCommit:
    """A PostgreSQL connection whose commit takes a round trip, remembering what it wrote."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.last: list[Any] = []

    def cursor(self) -> SlowCommit:
        return self

    async def __aenter__(self) -> SlowCommit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def executemany(self, sql: str, rows: list[Any]) -> None:
        self.last = list(rows)

    async def commit(self) -> None:
        await asyncio.sleep(0.1)
        self.written += [row[6] for row in self.last]


async def test_records_made_while_a_full_buffer_commits_drop_the_oldest_unsent_rows() -> None:
    """The whole buffer is being committed when two requests come: the older of the two is
    dropped (and counted), the newest is kept and written; before, the rows being written
    were counted as dropped and the two new ones were lost uncounted."""
    dropped: list[int] = []
    written: list[int] = []
    led = Ledger(
        DOWN,
        policy="p",
        model="m",
        max_buffer=5,
        batch_rows=5,
        on_dropped=dropped.append,
        on_written=written.append,
    )
    conn = SlowCommit()
    led._connection = conn
    for i in range(5):
        led.record("t", 1, f"old-{i}")
    committing = asyncio.create_task(led._write_batch())
    await asyncio.sleep(0.02)
    for i in range(2):
        led.record("t", 1, f"new-{i}")  # requests during the commit
    await committing
    while led.pending:
        await led._write_batch()
    assert conn.written == [f"old-{i}" for i in range(5)] + ["new-1"]
    assert sum(written) == 6 and sum(dropped) == 1


class FailingCommit(SlowCommit):
    async def commit(self) -> None:
        await asyncio.sleep(0.1)
        raise OSError("connection lost")


async def test_a_replayed_file_is_kept_while_its_rows_wait_for_a_commit_that_fails(
    tmp_path: Path,
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    spill_file(spill / "1-aaaa.rows", [f"r{i}" for i in range(5)])
    led = Ledger(DOWN, policy="p", model="m", max_buffer=10, batch_rows=5, spill_dir=spill)
    assert led.replay() == 5
    for i in range(5):
        led.record("t", 1, f"n{i}")
    led._connection = FailingCommit()
    committing = asyncio.create_task(led._write_batch())
    await asyncio.sleep(0.02)
    for i in range(5):
        led.record("t", 1, f"x{i}")  # a full buffer while the replayed rows are sent
    with pytest.raises(OSError):
        await committing
    waiting = [row[6] for row in led._pending]
    assert waiting == [f"r{i}" for i in range(5)] + [f"x{i}" for i in range(5)]
    assert ids_on_disk(spill) == [f"r{i}" for i in range(5)]  # not deleted: not written


async def test_a_stop_while_a_spill_is_read_deletes_no_file_whose_rows_are_not_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    spill_file(spill / "1-aaaa.rows", [f"a{i}" for i in range(10)])
    spill_file(spill / "2-bbbb.rows", [f"b{i}" for i in range(10)])
    reading, release = threading.Event(), threading.Event()
    parse = ledger_module._parse_row

    def slow_parse(line: str) -> Any:
        reading.set()
        assert release.wait(30)
        return parse(line)

    monkeypatch.setattr(ledger_module, "_parse_row", slow_parse)
    led = Ledger(DOWN, policy="p", model="m", spill_dir=spill)
    task = asyncio.create_task(led.run())
    assert await asyncio.to_thread(reading.wait, 30)
    task.cancel()  # what the server's stop does
    await asyncio.gather(task, return_exceptions=True)
    await led.close(flush_s=0.5)
    release.set()
    deadline = time.monotonic() + 30
    while led._reading is not None and not led._reading.done():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    monkeypatch.setattr(ledger_module, "_parse_row", parse)
    expected = sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    assert ids_on_disk(spill) == expected  # every row still on disk, each once


async def test_rows_postgres_refuses_are_set_aside_and_the_rest_written(
    postgres: LocalPostgres, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    # Valid JSON that no longer parses as a row, and one PostgreSQL refuses (a NUL byte).
    (spill / "1-dead.rows").write_text(
        '[null, "2026-11-30T00:00:00+00:00", "p", "t", "m", 1, null]\n'
        + _row_line(("ok-spilled", datetime.now(UTC), "poison", "t", "m", 1, "ok-spilled", 0))
    )
    led = Ledger(postgres.dsn, policy="poison", model="m", spill_dir=spill, flush_every_s=0.05)
    task = asyncio.create_task(led.run())
    for i in range(5):
        led.record("acme", 1, f"fresh-{i}")
    led.record("bad\x00tenant", 1, "nul")
    deadline = time.monotonic() + 30
    while led.pending:
        assert time.monotonic() < deadline, led.pending
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await led.close()
    rows = postgres.query("SELECT request_id FROM kubeonnx_usage WHERE policy = 'poison'")
    assert sorted(r for (r,) in rows) == [*(f"fresh-{i}" for i in range(5)), "ok-spilled"]
    (rejected,) = spill.glob("*.rejected")
    text = rejected.read_text()
    assert "null" in text and '"nul"' in text
    assert not list(spill.glob("*.rows*"))


def test_a_starting_replica_leaves_a_live_replicas_spill_and_replay_keeps_to_max_buffer(
    tmp_path: Path,
) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    spill_file(spill / "1-aaaa.rows", [f"a{i}" for i in range(60)])
    spill_file(spill / "2-bbbb.rows", [f"b{i}" for i in range(60)])
    live = Ledger(DOWN, policy="p", model="m", spill_dir=spill, max_buffer=100)
    assert live.replay() == 60  # the second file does not fit: left for later
    starting = Ledger(DOWN, policy="p", model="m", spill_dir=spill, max_buffer=100)
    assert starting.replay() == 60  # only the file nobody holds
    third = Ledger(DOWN, policy="p", model="m", spill_dir=spill)
    assert third.replay() == 0  # both owners are alive
    live.spill()  # the live one stops: its rows in a new file, its claimed file deleted
    assert third.replay() == 60
    # On disk: the a-rows (taken over by the third), the b-rows (held by the second).
    assert ids_on_disk(spill) == sorted([f"a{i}" for i in range(60)] + [f"b{i}" for i in range(60)])
    assert third.pending == 60 and starting.pending == 60


def trickle(url: str, stop: threading.Event) -> None:
    """A client that sends a request's body a byte at a time, never finishing it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nX-Api-Key: a-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
        while not stop.wait(0.3):
            with contextlib.suppress(OSError):
                sock.sendall(b" ")


def test_a_slow_client_and_a_dead_postgres_still_leave_time_to_spill_within_the_grace_period(
    serve, models, redis_server: LocalRedis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The stop's parts (drain, requests in flight, the ledger's last write and spill) are
    bounded by KUBEONNX_GRACE_SECONDS together: a client trickling its body in holds the stop
    only for its share, and the rows waiting for a PostgreSQL that refuses are spilled."""
    grace = 12
    config = write_policy(tmp_path, redis_server.url, {"a": []}, ledger={"dsnEnv": "LEDGER_DSN"})
    spill = tmp_path / "spill"
    served = serve_mlp(
        serve,
        models,
        config,
        env={
            "LEDGER_DSN": DOWN,
            "KUBEONNX_LEDGER_SPILL_DIR": str(spill),
            "KUBEONNX_GRACE_SECONDS": str(grace),
            "KUBEONNX_DRAIN_SECONDS": "2",
        },
    )
    stop = threading.Event()
    slow = threading.Thread(target=trickle, args=(served.url, stop), daemon=True)
    try:
        with httpx.Client(timeout=30) as http:
            for _ in range(10):
                assert infer(http, served, "a").status_code == 200
        slow.start()
        time.sleep(0.5)  # its request is in flight
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        try:
            assert served.proc.wait(grace) == 0, served.logs()
        except subprocess.TimeoutExpired:
            took = time.monotonic() - started
            raise AssertionError(f"still running {took:.0f}s after SIGTERM") from None
    finally:
        stop.set()
        slow.join(10)
    (written,) = spill.glob("*.rows")
    assert len(written.read_text().splitlines()) == 10


def test_the_stop_budget_fits_the_grace_period() -> None:
    for grace in (10.0, 12.0, 30.0, 60.0, 300.0):
        for drain in (0.0, 2.0, 5.0, 60.0):
            spent_drain, in_flight = stop_budget(grace, drain)
            assert spent_drain <= drain
            assert spent_drain + in_flight + LEDGER_RESERVE_S + STOP_MARGIN_S <= grace
            assert in_flight >= 1.0
    assert stop_budget(30.0, 5.0) == (5.0, 18.0)


def test_a_spilled_row_keeps_its_tokens_and_an_older_processs_line_has_none() -> None:
    """A spill line carries the row's tokens; one spilled by a process from before the unit
    tokens existed (7 fields) is replayed with 0, not set aside."""
    at = datetime.now(UTC)
    row = ("id-1", at, "p", "t", "m", 2, "req-1", 37)
    assert ledger_module._parse_row(_row_line(row)) == row
    older = json.dumps(["id-2", at.isoformat(), "p", "t", "m", 2, None])
    assert ledger_module._parse_row(older) == ("id-2", at, "p", "t", "m", 2, None, 0)
    negative = _row_line(("id-3", at, "p", "t", "m", 2, None, -1))
    with pytest.raises(ValueError, match="tokens must be a non-negative integer"):
        ledger_module._parse_row(negative)
