"""The usage ledger: every admitted request's usage, appended to a PostgreSQL table.

Recording is a list append on the request path; a background task writes what accumulated
in batches (no database round trip per request). A row leaves memory only once its batch is
committed, and each row has an id of its own with ON CONFLICT DO NOTHING, so a batch whose
commit was not confirmed is written again without counting twice: at least once, deduplicated.
While PostgreSQL is down, inference goes on and rows wait, up to `max_buffer` (beyond that
the oldest are dropped and counted in kubeonnx_ledger_dropped_rows_total).

At shutdown a last write is tried for `STOP_FLUSH_S`; what is still waiting is written to a
spill file in `spill_dir` (one JSON row a line, renamed into place once complete), and the
next process to start with that directory replays it. Replayed rows keep their ids, so a
row that reached the table before all the same is not counted twice.

    KUBEONNX_LEDGER_DSN=postgresql://... kubeonnx usage [--since 2026-11-01] [--tenant acme]

prints requests and rows per day, tenant and model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
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

# At shutdown: seconds for a last write before what is left is spilled (the pod's grace
# period holds the HTTP drain, the queue worker's stop and this).
STOP_FLUSH_S = 3.0
SPILL_SUFFIX = ".rows"


def _row_line(row: Row) -> str:
    rid, at, policy, tenant, model, rows, request_id = row
    return json.dumps([rid, at.isoformat(), policy, tenant, model, rows, request_id]) + "\n"


def _parse_row(line: str) -> Row:
    rid, at, policy, tenant, model, rows, request_id = json.loads(line)
    return (rid, datetime.fromisoformat(at), policy, tenant, model, int(rows), request_id)


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
        spill_dir: Path | None = None,
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
        self.spill_dir = spill_dir
        self._replayed: list[Path] = []  # spill files taken over, deleted once written
        self._replayed_rows = 0  # their rows, at the head of _pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, tenant: str, rows: int, request_id: str | None) -> None:
        """Note an admitted request; never blocks, never fails."""
        if len(self._pending) >= self.max_buffer:
            self._pending.popleft()
            self._left_memory(1)
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

    def replay(self) -> int:
        """Take over the rows stopped processes spilled into `spill_dir`, and those another
        process took over and did not finish (killed while replaying them). Each file is
        claimed by renaming it, so replicas sharing the directory rarely both take one; when
        they do, the rows' ids keep them once in the table. Returns the rows taken over."""
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return 0
        rows: list[Row] = []
        for path in sorted(self.spill_dir.iterdir()):
            base, found, _ = path.name.partition(SPILL_SUFFIX)
            if not found or path.name.endswith(f".{self._prefix}"):
                continue
            claimed = path.with_name(f"{base}{SPILL_SUFFIX}.{self._prefix}")
            try:
                path.rename(claimed)
                taken = [_parse_row(line) for line in claimed.read_text().splitlines() if line]
            except FileNotFoundError:  # another replica took it first
                continue
            except (OSError, ValueError, TypeError) as exc:  # left, renamed, for a person
                log.warning("usage ledger: spill file %s not replayed: %s", claimed, exc)
                continue
            rows.extend(taken)
            self._replayed.append(claimed)
        self._pending.extendleft(reversed(rows))
        self._replayed_rows += len(rows)
        if rows:
            log.info("usage ledger: %d rows replayed from %s", len(rows), self.spill_dir)
        return len(rows)

    def spill(self) -> int:
        """Write what is still waiting to a spill file of this process; the files it had
        taken over are then deleted (their rows are in it). Returns the rows spilled."""
        rows = len(self._pending)
        if self.spill_dir is None:
            if rows:
                log.warning("usage ledger: %d rows lost at shutdown (no spill directory)", rows)
            return 0
        if rows:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            partial = self.spill_dir / f"{self._prefix}.partial"
            with partial.open("w") as out:
                out.writelines(_row_line(row) for row in self._pending)
                out.flush()
                os.fsync(out.fileno())
            partial.rename(self.spill_dir / f"{time.time_ns()}-{self._prefix}{SPILL_SUFFIX}")
            log.warning("usage ledger: %d rows spilled to %s", rows, self.spill_dir)
        for path in self._replayed:
            path.unlink(missing_ok=True)
        self._replayed.clear()
        return rows

    def _left_memory(self, n: int) -> None:
        """`n` rows left the head of _pending (written or dropped)."""
        if self._replayed:
            self._replayed_rows -= n
            if self._replayed_rows <= 0:  # every replayed row is written: files done
                for path in self._replayed:
                    path.unlink(missing_ok=True)
                self._replayed.clear()
                self._replayed_rows = 0

    async def run(self) -> None:
        """Replay spilled rows, then write what accumulates, every `flush_every_s`, until
        cancelled."""
        try:
            await asyncio.to_thread(self.replay)
        except OSError as exc:
            log.warning("usage ledger: cannot read the spill directory: %s", exc)
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

    async def close(self, flush_s: float = STOP_FLUSH_S) -> None:
        """A last write of what is pending (at most `flush_s`), then the rest spilled."""
        try:
            async with asyncio.timeout(flush_s):
                while self._pending:
                    await self._write_batch()
        except Exception as exc:  # a batch cut short was not popped: it is spilled
            log.warning(
                "usage ledger: %d rows not written at shutdown (%s)",
                self.pending,
                redact(f"{type(exc).__name__}: {exc}"),
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._disconnect()
        try:
            self.spill()
        except OSError as exc:
            log.error("usage ledger: %d rows lost: cannot spill them: %s", self.pending, exc)

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
        self._left_memory(len(batch))
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


def _has_password(dsn: str) -> bool:
    from psycopg.conninfo import conninfo_to_dict

    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except Exception:  # not parseable: psycopg names the problem when it connects
        return False


def usage_report(argv: list[str]) -> int:
    """`kubeonnx usage`: requests and rows per day, tenant and model, from the ledger."""
    import psycopg

    parser = argparse.ArgumentParser(
        prog="kubeonnx usage",
        description="Requests and rows per day (UTC), tenant and model, from the usage ledger.",
    )
    parser.add_argument(
        "--dsn",
        help="PostgreSQL connection string without a password (libpq takes it from "
        "PGPASSWORD or ~/.pgpass); default: $KUBEONNX_LEDGER_DSN, which may hold one",
    )
    parser.add_argument(
        "--dsn-file",
        type=Path,
        help="file holding the connection string (a mounted Secret key), password included",
    )
    parser.add_argument(
        "--since",
        type=_date,
        default=datetime(1970, 1, 1, tzinfo=UTC),
        help="first day counted, YYYY-MM-DD (UTC; default: all)",
    )
    parser.add_argument(
        "--until",
        type=_date,
        default=datetime(9999, 1, 1, tzinfo=UTC),
        help="first day no longer counted, YYYY-MM-DD (UTC; default: none)",
    )
    parser.add_argument("--tenant", help="only this tenant (default: every tenant)")
    parser.add_argument("--model", help="only this model (default: every model)")
    args = parser.parse_args(argv)
    if args.dsn and _has_password(args.dsn):
        # A command line is readable by every user of the machine and kept in shell histories.
        parser.error(
            "--dsn must not hold a password: set KUBEONNX_LEDGER_DSN, PGPASSWORD or --dsn-file"
        )
    if args.dsn_file is not None:
        try:
            args.dsn = args.dsn_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--dsn-file: {exc}")
    args.dsn = args.dsn or os.environ.get("KUBEONNX_LEDGER_DSN")
    if not args.dsn:
        parser.error("KUBEONNX_LEDGER_DSN, --dsn-file or --dsn is required")
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
