"""The usage ledger: every admitted request's usage, appended to a PostgreSQL table.

Recording is a list append on the request path; a background task writes what accumulated
in batches (no database round trip per request). A row leaves memory only once its batch is
committed, and each row has an id of its own with ON CONFLICT DO NOTHING, so a batch whose
commit was not confirmed is written again without counting twice: at least once, deduplicated.
While PostgreSQL is down, inference goes on and rows wait, up to `max_buffer` (beyond that
the oldest are dropped and counted in kubeonnx_ledger_dropped_rows_total).

    kubeonnx usage --dsn postgresql://... [--since 2026-11-01] [--tenant acme] [--model m]

prints requests and rows per day, tenant and model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .errors import redact

log = logging.getLogger(__name__)

TABLE = "kubeonnx_usage"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id          text PRIMARY KEY,       -- unique per admitted request: writes are idempotent
    at          timestamptz NOT NULL,
    policy      text NOT NULL,
    tenant      text NOT NULL,
    model       text NOT NULL,
    rows        bigint NOT NULL,
    request_id  text                    -- the client's X-Request-Id, or the runtime's
);
CREATE INDEX IF NOT EXISTS {TABLE}_at ON {TABLE} (at);
"""
INSERT = (
    f"INSERT INTO {TABLE} (id, at, policy, tenant, model, rows, request_id) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
)

Row = tuple[str, datetime, str, str, str, int, str | None]


class Ledger:
    def __init__(
        self,
        dsn: str,
        *,
        policy: str,
        model: str,
        max_buffer: int = 200_000,
        batch_rows: int = 2_000,
        flush_every_s: float = 1.0,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.policy, self.model = policy, model
        self.max_buffer, self.batch_rows, self.flush_every_s = max_buffer, batch_rows, flush_every_s
        self._pending: deque[Row] = deque()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(8).hex()
        self._on_written = on_written or (lambda n: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self._connection: Any = None
        self._down_since: float | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, tenant: str, rows: int, request_id: str | None) -> None:
        """Note an admitted request; never blocks, never fails."""
        if len(self._pending) >= self.max_buffer:
            self._pending.popleft()
            self._on_dropped(1)
        self._pending.append(
            (
                f"{self._prefix}-{next(self._ids):x}",
                datetime.now(UTC),
                self.policy,
                tenant,
                self.model,
                rows,
                request_id,
            )
        )

    async def run(self) -> None:
        """Write what accumulates, every `flush_every_s`, until cancelled."""
        delay = self.flush_every_s
        while True:
            await asyncio.sleep(delay)
            try:
                while self._pending:
                    await self._write_batch()
                delay = self.flush_every_s
                if self._down_since is not None:
                    log.info("usage ledger reachable again; %d rows waiting", len(self._pending))
                    self._down_since = None
            except Exception as exc:  # PostgreSQL down or refusing: rows wait in memory
                await self._disconnect()
                delay = min(max(delay * 2, 1.0), 15.0)
                if self._down_since is None:
                    self._down_since = asyncio.get_running_loop().time()
                    log.warning(
                        "usage ledger unreachable (%s); %d rows waiting, retrying",
                        redact(f"{type(exc).__name__}: {exc}"),
                        len(self._pending),
                    )

    async def close(self) -> None:
        """A last write of what is pending (at most 5 s), then disconnect."""
        try:
            async with asyncio.timeout(5.0):
                while self._pending:
                    await self._write_batch()
        except Exception as exc:
            log.warning("usage ledger: %d rows not written at shutdown (%s)", self.pending, exc)
        await self._disconnect()

    async def _write_batch(self) -> None:
        import psycopg

        if self._connection is None:
            self._connection = await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=3, autocommit=False
            )
            async with self._connection.cursor() as cur:
                await cur.execute(SCHEMA)
            await self._connection.commit()
        batch = list(itertools.islice(self._pending, self.batch_rows))
        async with self._connection.cursor() as cur:
            await cur.executemany(INSERT, batch)
        await self._connection.commit()
        # Committed: these rows may leave memory (records made meanwhile were appended).
        for _ in batch:
            self._pending.popleft()
        self._on_written(len(batch))

    async def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # already broken
                await self._connection.close()
            self._connection = None


REPORT = f"""
SELECT date_trunc('day', at AT TIME ZONE 'UTC')::date AS day, tenant, model,
       count(*) AS requests, sum(rows) AS rows
FROM {TABLE}
WHERE at >= %(since)s AND at < %(until)s
  AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
  AND (%(model)s::text IS NULL OR model = %(model)s)
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


def _date(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def usage_report(argv: list[str]) -> int:
    """`kubeonnx usage`: requests and rows per day, tenant and model, from the ledger."""
    import psycopg

    parser = argparse.ArgumentParser(
        prog="kubeonnx usage",
        description="Requests and rows per day (UTC), tenant and model, from the usage ledger.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("KUBEONNX_LEDGER_DSN"),
        help="PostgreSQL connection string (default: $KUBEONNX_LEDGER_DSN)",
    )
    parser.add_argument("--since", type=_date, default=datetime(1970, 1, 1, tzinfo=UTC))
    parser.add_argument("--until", type=_date, default=datetime(9999, 1, 1, tzinfo=UTC))
    parser.add_argument("--tenant")
    parser.add_argument("--model")
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("--dsn or KUBEONNX_LEDGER_DSN is required")
    params = {"since": args.since, "until": args.until, "tenant": args.tenant, "model": args.model}
    try:
        with psycopg.connect(args.dsn, connect_timeout=5) as conn:
            rows = conn.execute(REPORT, params).fetchall()
    except psycopg.Error as exc:
        print(f"kubeonnx usage: {redact(str(exc)).strip()}", file=sys.stderr)
        return 1
    print(f"{'DAY':<10}  {'TENANT':<20}  {'MODEL':<24}  {'REQUESTS':>10}  {'ROWS':>12}")
    for day, tenant, model, requests, total in rows:
        print(f"{day!s:<10}  {tenant:<20}  {model:<24}  {requests:>10}  {total:>12}")
    return 0
