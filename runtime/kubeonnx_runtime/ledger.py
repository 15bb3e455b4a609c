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
row that reached the table before all the same is not counted twice. A replica holds an
exclusive flock on each file it replays until its rows are written (or spilled again), so a
starting replica takes over only the files of a dead one. A row PostgreSQL refuses as data
(a null id, a NUL byte) is set aside in a `.rejected` file of the spill directory, with a log
line, instead of holding up the rows behind it.

    KUBEONNX_LEDGER_DSN=postgresql://... kubeonnx usage [--since 2026-11-01] [--tenant acme]

prints requests, rows and tokens per day, tenant and model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
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
    request_id  text,                   -- the client's X-Request-Id, or the runtime's
    tokens      bigint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS {TABLE}_at ON {TABLE} (at);
"""
# A table made before the unit tokens existed gets its column (0 for the rows before).
ADD_TOKENS = f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS tokens bigint NOT NULL DEFAULT 0"
INDEX = f"CREATE INDEX IF NOT EXISTS {TABLE}_at ON {TABLE} (at)"
# What of the schema is there, read from the catalogs (no lock on the table), resolving the
# names as the statements do (the connection's search_path): the table, its index, and its
# column tokens.
SCHEMA_STATE = f"""
SELECT to_regclass('{TABLE}') IS NOT NULL,
       to_regclass('{TABLE}_at') IS NOT NULL,
       EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{TABLE}')
               AND attname = 'tokens' AND NOT attisdropped)
"""
INSERT = (
    f"INSERT INTO {TABLE} (id, at, policy, tenant, model, rows, request_id, tokens) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
)

Row = tuple[str, datetime, str, str, str, int, str | None, int]

# At shutdown: seconds for a last write before what is left is spilled (the pod's grace
# period holds the HTTP drain, the queue worker's stop and this).
STOP_FLUSH_S = 3.0
SPILL_SUFFIX = ".rows"
REJECTED_SUFFIX = ".rejected"


def _row_line(row: Row) -> str:
    rid, at, policy, tenant, model, rows, request_id, tokens = row
    return json.dumps([rid, at.isoformat(), policy, tenant, model, rows, request_id, tokens]) + "\n"


def _parse_row(line: str) -> Row:
    """One spill line, every field type-checked (ValueError names what is wrong). A line of
    7 fields (spilled before the unit tokens existed) has 0 tokens."""
    fields = json.loads(line)
    if isinstance(fields, list) and len(fields) == 7:
        fields.append(0)
    if not isinstance(fields, list) or len(fields) != 8:
        raise ValueError("a row is a list of 8 fields")
    rid, at, policy, tenant, model, rows, request_id, tokens = fields
    for name, value in (("id", rid), ("at", at), ("policy", policy), ("tenant", tenant)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError("rows must be a non-negative integer")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError("tokens must be a non-negative integer")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError("request_id must be a string or null")
    when = datetime.fromisoformat(at)
    if when.tzinfo is None:
        raise ValueError("at must carry a time zone")
    return (rid, when, policy, tenant, model, rows, request_id, tokens)


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
        # The batch being committed: out of _pending, so that record() dropping the oldest
        # row never takes one of them, and back at the head of _pending if the commit fails.
        self._writing: list[Row] = []
        self._ids = itertools.count(1)
        self._prefix = os.urandom(8).hex()
        self._on_written = on_written or (lambda n: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self._connection: Any = None
        self._down_since: float | None = None
        self.spill_dir = spill_dir
        # Spill files taken over, each with its open, flocked descriptor and the ids of its
        # rows not yet written; a file is deleted once all its rows are written (or dropped).
        self._replayed: dict[Path, tuple[int, set[str]]] = {}
        self._reading: asyncio.Future[Any] | None = None  # the replay's thread, while it runs
        self._spills_left = False  # files left for later: replay() stopped at max_buffer
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._writing)

    def record(self, tenant: str, rows: int, request_id: str | None, tokens: int = 0) -> None:
        """Note an admitted request; never blocks, never fails."""
        if self.pending >= self.max_buffer and self._pending:
            self._dropped([self._pending.popleft()])
        self._pending.append(
            (
                f"{self._prefix}-{next(self._ids):x}",
                datetime.now(UTC),
                self.policy,
                tenant,
                self.model,
                rows,
                request_id,
                tokens,
            )
        )

    def replay(self) -> int:
        """Take over the rows stopped processes spilled into `spill_dir`, and those of a
        process that died while replaying them. Returns the rows taken over."""
        return self._take(self._read_spills(self.max_buffer - self.pending))

    def _read_spills(self, room: int) -> tuple[list[Row], dict[Path, tuple[int, set[str]]], bool]:
        """Claim and read spill files while their rows fit in `room` (the first one always).
        A file is claimed by an exclusive flock, held until its rows are written, and a
        rename to this process's name: a file whose owner is alive (its lock held) is left
        to it. Lines that do not parse are set aside in a .rejected file."""
        rows: list[Row] = []
        files: dict[Path, tuple[int, set[str]]] = {}
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return rows, files, False
        for path in sorted(self.spill_dir.iterdir()):
            base, found, _ = path.name.partition(SPILL_SUFFIX)
            if not found or path.name.endswith(f".{self._prefix}"):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # another replica took it first
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live replica is replaying it
                os.close(fd)
                continue
            try:
                with os.fdopen(os.dup(fd)) as text:
                    lines = [line for line in text.read().splitlines() if line]
                if rows and len(rows) + len(lines) > room:
                    os.close(fd)  # unlocked: left for when the buffer has room
                    return rows, files, True
                claimed = path.with_name(f"{base}{SPILL_SUFFIX}.{self._prefix}")
                path.rename(claimed)
            except FileNotFoundError:  # taken, written and deleted meanwhile
                os.close(fd)
                continue
            except (OSError, ValueError) as exc:  # left for a person
                os.close(fd)
                log.warning("usage ledger: spill file %s not replayed: %s", path, exc)
                continue
            taken: list[Row] = []
            for number, line in enumerate(lines, 1):
                try:
                    taken.append(_parse_row(line))
                except (ValueError, TypeError) as exc:
                    self._reject([line.rstrip("\n") + "\n"], f"{claimed.name}:{number}: {exc}")
            rows.extend(taken)
            files[claimed] = (fd, {row[0] for row in taken})
        return rows, files, False

    def _take(self, read: tuple[list[Row], dict[Path, tuple[int, set[str]]], bool]) -> int:
        rows, files, left = read
        if self._closed:  # read after the stop: the files stay, for the next process
            for fd, _ in files.values():
                os.close(fd)
            return 0
        self._spills_left = left
        self._pending.extendleft(reversed(rows))
        self._replayed.update(files)
        for path, (_, ids) in files.items():
            if not ids:
                self._done_with(path)
        if rows:
            log.info("usage ledger: %d rows replayed from %s", len(rows), self.spill_dir)
        return len(rows)

    def _done_with(self, path: Path) -> None:
        fd, _ = self._replayed.pop(path)
        path.unlink(missing_ok=True)  # deleted before it is unlocked
        os.close(fd)

    def _left_memory(self, rows: list[Row]) -> None:
        """`rows` left memory (written, dropped or set aside): replayed files whose every
        row has are deleted."""
        if not self._replayed:
            return
        ids = {row[0] for row in rows}
        for path, (_, waiting) in list(self._replayed.items()):
            waiting -= ids
            if not waiting:
                self._done_with(path)

    def _dropped(self, rows: list[Row]) -> None:
        self._left_memory(rows)
        self._on_dropped(len(rows))

    def _reject(self, lines: list[str], why: str) -> None:
        """Set rows PostgreSQL (or the spill parser) refuses aside, for a person."""
        log.error("usage ledger: %d rows set aside: %s", len(lines), redact(why))
        if self.spill_dir is None:
            return
        with contextlib.suppress(OSError):
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with (self.spill_dir / f"{self._prefix}{REJECTED_SUFFIX}").open("a") as out:
                out.writelines(lines)

    def spill(self) -> int:
        """Write what is still waiting to a spill file of this process; the files it had
        taken over are then deleted (their rows are in it). Returns the rows spilled."""
        self._closed = True
        self._pending.extendleft(reversed(self._writing))
        self._writing = []
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
        for path in list(self._replayed):
            self._done_with(path)
        return rows

    async def run(self) -> None:
        """Replay spilled rows, then write what accumulates, every `flush_every_s`, until
        cancelled; spill files left for want of room are replayed once the buffer empties."""
        await self._replay_apart()
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
                continue
            if self._spills_left and not self._pending:
                await self._replay_apart()

    async def _replay_apart(self) -> None:
        """Read the spill files in a thread; its rows join _pending on the loop. A thread
        cannot be cancelled: close() waits for it (bounded), and a read that ends after the
        stop deletes nothing (the files stay for the next process)."""
        reading = asyncio.ensure_future(
            asyncio.to_thread(self._read_spills, self.max_buffer - self.pending)
        )
        self._reading = reading

        def taken(done: asyncio.Future[Any]) -> None:
            if done.cancelled():
                return
            if done.exception() is not None:
                log.warning("usage ledger: cannot read the spill directory: %s", done.exception())
                return
            self._take(done.result())

        reading.add_done_callback(taken)
        await asyncio.wait([reading])

    async def close(self, flush_s: float = STOP_FLUSH_S) -> None:
        """A last write of what is pending (at most `flush_s`, a replay still reading
        included), then the rest spilled."""
        loop = asyncio.get_running_loop()
        end = loop.time() + flush_s
        if self._reading is not None and not self._reading.done():
            await asyncio.wait([self._reading], timeout=max(flush_s / 2, 0.1))
            await asyncio.sleep(0)  # its done callback runs
            if not self._reading.done():
                log.warning("usage ledger: spill files still being read are left for later")
        self._closed = True
        try:
            async with asyncio.timeout_at(max(end, loop.time() + 0.1)):
                while self._pending:
                    await self._write_batch()
        except Exception as exc:  # a batch cut short went back to _pending: it is spilled
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
            await self._make_schema()
        n = min(self.batch_rows, len(self._pending))
        self._writing = [self._pending.popleft() for _ in range(n)]
        try:
            rejected = await self._commit(self._writing)
        except BaseException:  # not confirmed: back at the head, written again later
            self._pending.extendleft(reversed(self._writing))
            self._writing = []
            while self.pending > self.max_buffer and self._pending:
                self._dropped([self._pending.popleft()])
            raise
        batch, self._writing = self._writing, []
        self._left_memory(batch)
        self._on_written(len(batch) - rejected)

    async def _make_schema(self) -> None:
        """Create what is missing of the table, its index and its column tokens, and only
        that: ALTER TABLE takes an ACCESS EXCLUSIVE lock and CREATE INDEX a SHARE lock even
        when IF NOT EXISTS finds nothing to do, so a replica (re)connecting would wait behind
        any open transaction that read the table (a report), and every replica's inserts
        would queue behind it."""
        assert self._connection is not None
        async with self._connection.cursor() as cur:
            await cur.execute(SCHEMA_STATE)
            state = await cur.fetchone()
            assert state is not None
            table, index, tokens = state
            if not table:
                await cur.execute(SCHEMA)
            else:
                if not tokens:
                    await cur.execute(ADD_TOKENS)
                if not index:
                    await cur.execute(INDEX)
        await self._connection.commit()

    async def _commit(self, rows: list[Row]) -> int:
        """Insert and commit `rows`; a batch PostgreSQL refuses as data (not a connection
        error) is split until the rows at fault are alone, and those are set aside (counted
        as dropped). Returns the rows set aside."""
        import psycopg

        try:
            async with self._connection.cursor() as cur:
                await cur.executemany(INSERT, rows)
            await self._connection.commit()
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            await self._connection.rollback()
            if len(rows) == 1:
                self._reject([_row_line(rows[0])], f"{type(exc).__name__}: {exc}")
                self._on_dropped(1)
                return 1
            half = len(rows) // 2
            return await self._commit(rows[:half]) + await self._commit(rows[half:])
        return 0

    async def _disconnect(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # already broken
                await self._connection.close()
            self._connection = None


# A table made before the unit tokens existed has no column tokens until a runtime of this
# version connects: the report counts 0 tokens there (REPORT_NO_TOKENS).
REPORT_TEMPLATE = """
SELECT date_trunc('day', at AT TIME ZONE 'UTC')::date AS day, tenant, model,
       count(*) AS requests, sum(rows) AS rows, {tokens} AS tokens
FROM {TABLE}
WHERE at >= %(since)s AND at < %(until)s
  AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
  AND (%(model)s::text IS NULL OR model = %(model)s)
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
REPORT = REPORT_TEMPLATE.replace("{tokens}", "sum(tokens)").replace("{TABLE}", TABLE)
REPORT_NO_TOKENS = REPORT_TEMPLATE.replace("{tokens}", "0::bigint").replace("{TABLE}", TABLE)
NO_TOKENS_NOTE = (
    "kubeonnx usage: the ledger table has no column tokens yet (made before token budgets; "
    "a runtime of this version adds it when it connects): tokens are shown as 0"
)


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
    """`kubeonnx usage`: requests, rows and tokens per day, tenant and model, from the
    ledger."""
    import psycopg

    parser = argparse.ArgumentParser(
        prog="kubeonnx usage",
        description="Requests, rows and tokens per day (UTC), tenant and model, from the usage "
        "ledger.",
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
            state = conn.execute(SCHEMA_STATE).fetchone()
            has_tokens = state is None or not state[0] or state[2]  # no table: its own error
            rows = conn.execute(REPORT if has_tokens else REPORT_NO_TOKENS, params).fetchall()
    except psycopg.Error as exc:
        print(f"kubeonnx usage: {redact(str(exc)).strip()}", file=sys.stderr)
        return 1
    if not has_tokens:
        print(NO_TOKENS_NOTE, file=sys.stderr)
    print(
        f"{'DAY':<10}  {'TENANT':<20}  {'MODEL':<24}  {'REQUESTS':>10}  {'ROWS':>12}  "
        f"{'TOKENS':>12}"
    )
    for day, tenant, model, requests, total, tokens in rows:
        print(f"{day!s:<10}  {tenant:<20}  {model:<24}  {requests:>10}  {total:>12}  {tokens:>12}")
    return 0
