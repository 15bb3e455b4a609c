"""Per-tenant quotas: who is asking, and whether their budget allows this request.

A tenant is named by an API key, of which the runtime knows only the sha256. Each tenant
has limits, each a number of requests, of rows (dim 0 of the request's inputs) or of tokens
(the elements of one integer input, `QuotaConfig.tokens`) per window of 1s, 1m, 1h or 1d.
Windows are calendar buckets in UTC (the minute, the hour, the day that is under way), so
every replica agrees on when a window resets without talking to the others, and the reset
time a client is told is exact.

A decision checks every window of the tenant and counts the request in all of them, or in
none (a refused request costs nothing): in Redis with one Lua script, one round trip, shared
by every replica; without Redis, in this process's memory (exact per replica only).

When Redis is unreachable or does not answer within the decision budget
(`decisionBudgetMs`, 25 ms by default), `failureMode` decides: `Closed` refuses (503),
`Open` admits, `Local` enforces limit / replicas in memory. The budget counts the time this
process could have read the answer: time its own event loop was late (the replica starved
of CPU, or busy with other work) is not blamed on Redis. After three failures in a row a
circuit breaker stops asking Redis for a second, so a dead Redis costs nothing per request.
`shadow` decides and counts but never refuses (to roll a policy out). A request the runtime
counted and then did not serve after all is refunded (`Quota.refund`).

Each request sent to Redis carries an id, under which the script records what it added. A
decision the runtime stopped waiting for may still run in Redis after it (the script was
already on its way): a compensating refund by that id, sent in the background, takes back
what it added, or, arriving first, marks the id abandoned so the late script adds nothing.
Refunds never hold up an answer: they run in the background, a bounded number at a time; one
that cannot run is logged and counted (`kubeonnx_quota_refunds_lost_total`).

The quota has a Redis client and connection pool of its own, never the asynchronous
queue's, so its small round trips do not wait behind the queue's bulk transfers.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import FatalStartupError, RuntimeServeError, describe, redact

log = logging.getLogger(__name__)

WINDOW_SECONDS = {"1s": 1, "1m": 60, "1h": 3600, "1d": 86400}
DEFAULT_BUDGET_MS = 25
BUDGET_TICKS = 5  # the decision budget is measured in ticks of a fifth (see _within_budget)
# What a replica whose event loop is late grants Redis beyond the budget, at most.
LATE_GRACE_S = 1.0
# How late a timer may fire on a loop doing nothing else (its clock's granularity, about a
# millisecond): a tick woken within this was on time (_on_time).
TIMER_SLACK_S = 0.002
CONNECT_TIMEOUT_S = 1.0  # a refused connection fails at once, a dropped one after this
BREAKER_FAILURES = 3
BREAKER_OPEN_S = 1.0
# How long Redis keeps what a request added, for its refund: a refund later than this is lost.
CHARGE_RECORD_S = 120
# How long an id whose decision was abandoned stays marked: the most a script sent before may
# wait in Redis and still be refused its count.
ABANDONED_S = 3600
REFUNDS_IN_FLIGHT = 64  # background refunds at a time; more are lost (and counted)
REFUND_TIMEOUT_S = 5.0
# The identity of requests without a known key; no tenant may take the name (QuotaConfig), so
# a tenant's counters, metrics, ledger rows and asynchronous results never merge with theirs.
DEFAULT_TENANT = "default"


class _Config(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Limit(_Config):
    unit: Literal["requests", "rows", "tokens"]
    limit: int = Field(ge=0)
    window: Literal["1s", "1m", "1h", "1d"]

    @functools.cached_property
    def name(self) -> str:
        return f"{self.unit}-{self.window}"

    @functools.cached_property
    def seconds(self) -> int:
        return WINDOW_SECONDS[self.window]


# A DNS label, as the QuotaPolicy's schema has it: the runtime checks what it is given too.
TENANT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class TenantConfig(_Config):
    name: str = Field(min_length=1, max_length=63, pattern=TENANT_NAME_PATTERN)
    key_sha256: list[str] = Field(default_factory=list)
    # A file of keys, one a line (the tenant's Secret, mounted), relative to the configuration
    # file's directory: hashed into key_sha256 when the configuration is loaded.
    key_file: str | None = None
    limits: list[Limit] = Field(default_factory=list)

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, values: list[str]) -> list[str]:
        for v in values:
            if len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower()):
                raise ValueError("each keySha256 must be 64 hexadecimal characters")
        return [v.lower() for v in values]


class DefaultTenant(_Config):
    limits: list[Limit] = Field(default_factory=list)


class TokenCount(_Config):
    """What a request's tokens are (the unit `tokens`): the elements of one integer input of
    the model, all of them or only the non-zero ones (an attention mask's)."""

    input: str = Field(min_length=1)
    count: Literal["elements", "nonzero"]


class RedisBackend(_Config):
    url: str
    password_env: str | None = None  # the variable that holds the password, if any


class LedgerBackend(_Config):
    dsn_env: str  # the variable that holds the PostgreSQL connection string


class QuotaConfig(_Config):
    """The file `KUBEONNX_QUOTA_CONFIG` names: what the operator renders from a QuotaPolicy."""

    policy: str = Field(min_length=1)
    # The policy's namespace: counters of same-named policies in two namespaces stay apart.
    namespace: str = Field(min_length=1)
    tenant_header: str = "X-Api-Key"
    tenants: list[TenantConfig] = Field(default_factory=list)
    default_tenant: DefaultTenant | None = None
    failure_mode: Literal["Closed", "Open", "Local"] = "Closed"
    shadow: bool = False
    redis: RedisBackend | None = None
    ledger: LedgerBackend | None = None  # admitted usage, appended to PostgreSQL
    tokens: TokenCount | None = None  # how the unit `tokens` is counted
    replicas: int = Field(1, ge=1)  # how many replicas share the limits (failureMode Local)
    # How long a decision waits for Redis before failureMode decides (see _within_budget).
    decision_budget_ms: int = Field(DEFAULT_BUDGET_MS, ge=1, le=10000)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        names = [t.name for t in tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if DEFAULT_TENANT in names:
            raise ValueError(
                f"tenant name {DEFAULT_TENANT!r} is reserved for requests without a known key "
                "(defaultTenant)"
            )
        return tenants

    @model_validator(mode="after")
    def _tokens_counted(self) -> QuotaConfig:
        limits = [*(lim for t in self.tenants for lim in t.limits)]
        limits += self.default_tenant.limits if self.default_tenant is not None else []
        if self.tokens is None and any(lim.unit == "tokens" for lim in limits):
            raise ValueError("a limit of unit tokens needs 'tokens' (the input counted)")
        return self


def load_quota_config(path: Path) -> QuotaConfig:
    """Read the quota configuration (JSON or YAML), or raise FatalStartupError naming the
    problem."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FatalStartupError(f"cannot read the quota configuration {path}: {exc}") from None
    try:
        config = QuotaConfig.model_validate(raw)
    except ValidationError as exc:
        raise FatalStartupError(f"invalid quota configuration {path}: {describe(exc)}") from None
    return _with_key_files(config, path.parent)


def _read_keys(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _with_key_files(config: QuotaConfig, base: Path) -> QuotaConfig:
    """Each tenant's keyFile read and hashed into its keySha256; a tenant without a key is
    refused by name (its Secret, or the key in it, does not exist)."""
    tenants = []
    for tenant in config.tenants:
        if tenant.key_file is not None:
            keys = _read_keys(base / tenant.key_file)
            if not keys:
                raise FatalStartupError(
                    f"quota: tenant '{tenant.name}' has no API key: {base / tenant.key_file} is "
                    "missing or empty (its Secret, or the key in it, does not exist)"
                )
            hashes = {*tenant.key_sha256, *(key_hash(k) for k in keys)}
            tenant = tenant.model_copy(update={"key_sha256": sorted(hashes)})
        tenants.append(tenant)
    return config.model_copy(update={"tenants": tenants})


def watched_content(path: Path, config: QuotaConfig) -> tuple[bytes | None, ...]:
    """What a reload follows: the configuration file and each tenant's key file (None when a
    key file cannot be read). Raises OSError when the configuration file cannot."""
    keys = [path.parent / t.key_file for t in config.tenants if t.key_file is not None]
    return (path.read_bytes(), *(_read_bytes(k) for k in keys))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Unauthorized(RuntimeServeError):
    """No known API key and no default tenant (HTTP 401)."""


class QuotaUnavailable(RuntimeServeError):
    """The shared counters cannot be reached and failureMode is Closed (HTTP 503)."""


class QuotaExceeded(RuntimeServeError):
    """A window of the tenant's budget would be exceeded (HTTP 429)."""

    def __init__(self, message: str, decision: Decision) -> None:
        super().__init__(message)
        self.decision = decision


class OverWholeLimit(RuntimeServeError):
    """The request alone costs more rows or tokens than a window of the tenant's budget
    holds: no wait admits it (HTTP 413, without Retry-After)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A tenant's Limit as every request reads it: a plain object, because reading a pydantic
    model's attribute costs some 40 times a slot's (its `__getattr__` keeps CPython from
    specialising the read), with its name and length made once."""

    unit: str
    limit: int
    window: str
    name: str
    seconds: int

    @classmethod
    def of(cls, lim: Limit, limit: int | None = None) -> Window:
        return cls(
            lim.unit, lim.limit if limit is None else limit, lim.window, lim.name, lim.seconds
        )


@dataclass(frozen=True, slots=True)
class Budget:
    """A tenant's windows under one configuration: each one's key in MemoryCounters; their
    RateLimit-Policy header (the same on every answer) and their RateLimit header with a `%d`
    for what is left of each window and one for when it resets; where they are counted in
    Redis; and, for failureMode Local, this replica's share of each. A decision keeps the
    Budget it was charged under, so its refund, or its fallback when Redis fails, uses the
    windows and keys of that charge even after a reload has changed them."""

    tenant: str
    windows: tuple[Window, ...]
    keys: tuple[tuple[str, str], ...]
    policy_header: bytes
    ratelimit: bytes
    namespace: str = ""
    policy: str = ""
    charge_prefix: bytes = b""  # the charge keys of the tenant's requests, but for their ids
    local: Budget | None = None

    @classmethod
    def of(
        cls,
        tenant: str,
        windows: list[Window],
        namespace: str = "",
        policy: str = "",
        local: Budget | None = None,
    ) -> Budget:
        header = ", ".join(f'"{w.name}";q={w.limit};w={w.seconds}' for w in windows)
        ratelimit = ", ".join(f'"{w.name}";r=%d;t=%d' for w in windows)
        keys = tuple((tenant, w.name) for w in windows)
        prefix = charge_key(namespace, policy, tenant, "").encode()
        return cls(
            tenant,
            tuple(windows),
            keys,
            header.encode(),
            ratelimit.encode(),
            namespace,
            policy,
            prefix,
            local,
        )

    def key(self, window: Window, now: float) -> str:
        """The Redis key of the window's count at `now`."""
        return counter_key(
            self.namespace, self.policy, self.tenant, window.unit, window.window, now
        )


NO_BUDGET = Budget("", (), (), b"", b"")


@dataclass(slots=True)
class WindowState:
    limit: Window
    used: int  # after this request when admitted, before it when refused
    reset_at: float  # epoch seconds

    @property
    def remaining(self) -> int:
        return max(0, self.limit.limit - self.used)


@dataclass(slots=True)
class Decision:
    tenant: str
    budget: Budget = NO_BUDGET
    # What each window held after the request when admitted, before it when refused.
    used: list[int] | tuple[int, ...] = ()
    at: float = 0.0  # when it was decided (its windows are those under way then)
    broken: int = 0  # the window that refused the request, counted from 1; 0 if none did
    # Where the request was counted ("redis", "memory", "local"; "" nowhere) and its cost in
    # each window: what `Quota.refund` takes back.
    counted_in: str = ""
    costs: list[int] | tuple[int, ...] = ()
    ref: bytes = b""  # the request's id in Redis (counted_in "redis")

    @property
    def windows(self) -> tuple[WindowState, ...]:
        return tuple(
            WindowState(w, u, _reset_at(w, self.at))
            for w, u in zip(self.budget.windows, self.used, strict=True)
        )

    @property
    def violated(self) -> WindowState | None:
        """The window that refused the request, if one did."""
        return self.windows[self.broken - 1] if self.broken else None

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """The budget headers. On every answer, RateLimit-Policy and RateLimit (IETF httpapi
        ratelimit-headers draft): every window's limit, and what is left of it and until
        when. On a refused one, also Retry-After and the X-RateLimit-* trio, for the window
        that refused it. Reset times are seconds from now. (On every answer: written for
        speed.)"""
        budget = self.budget
        windows = budget.windows
        if not windows:
            return []
        used = self.used
        # Whole seconds: a window resets on a whole second, so the wait, rounded up, is its
        # reset less the whole seconds of now (and at least 1).
        at, since = int(self.at), int(now)
        values = []
        for i in range(len(windows)):
            w = windows[i]
            cap, u, seconds = w.limit, used[i], w.seconds
            wait = (at // seconds + 1) * seconds - since
            values.append(cap - u if u < cap else 0)
            values.append(wait if wait > 1 else 1)
        headers = [
            (b"ratelimit-policy", budget.policy_header),
            (b"ratelimit", budget.ratelimit % tuple(values)),
        ]
        if self.broken:
            i = self.broken - 1
            cap, left, wait = windows[i].limit, values[2 * i], values[2 * i + 1]
            headers += [
                (b"retry-after", b"%d" % wait),
                (b"x-ratelimit-limit", b"%d" % cap),
                (b"x-ratelimit-remaining", b"%d" % left),
                (b"x-ratelimit-reset", b"%d" % wait),
            ]
        return headers


def _reset_at(limit: Window, now: float) -> float:
    return float((int(now // limit.seconds) + 1) * limit.seconds)


def counter_key(
    namespace: str, policy: str, tenant: str, unit: str, window: str, now: float
) -> str:
    """The Redis key of a tenant's count in the window under way at `now`, apart for each
    namespace and policy. The operator reads the same keys for the policy's status (a
    contract test holds the two together). The hash tag keeps a tenant's counters in one
    Redis Cluster slot (one script)."""
    bucket = int(now // WINDOW_SECONDS[window])
    return f"kubeonnx:{{{namespace}/{policy}/{tenant}}}:{unit}-{window}:{bucket}"


def charge_key(namespace: str, policy: str, tenant: str, ref: str) -> str:
    """The Redis key under which a request's id records what its decision added (or that it
    was abandoned); in the tenant's slot, beside its counters."""
    return f"kubeonnx:{{{namespace}/{policy}/{tenant}}}:charge:{ref}"


def _last_to_reset(budget: Budget, used: list[int], costs: list[int], now: float) -> int:
    """Of the windows a refused request does not fit (`used`: each one's count before it),
    the one that resets last, counted from 1: its reset is the first time the request can
    be admitted, so it is what Retry-After and the refusal's message name."""
    last, last_reset = 0, 0.0
    for i, w in enumerate(budget.windows):
        if used[i] + costs[i] > w.limit:
            reset = _reset_at(w, now)
            if reset > last_reset:
                last, last_reset = i + 1, reset
    return last


def _until(at: float, now: float) -> int:
    return max(1, math.ceil(at - now))


# Decides a batch of one tenant's requests: every request that arrived while the previous
# round trip was in flight goes in one call. KEYS: the tenant's counters, one per window, then
# per request its charge key (charge_key). ARGV: the number of windows, how long a record is
# kept, per window its limit, per window its TTL, then the costs: one string, per request its
# cost in each window, all comma-separated. Requests are decided in arrival order against
# running totals, each counted in every window or in none; the totals are written once. An
# admitted request's costs are recorded under its charge key, where no record is yet (SET NX:
# one command for the admission and the check); a request whose key already exists was
# abandoned (its refund came first) and is not counted. Returns one string, comma-separated,
# per request: admitted (1/0), the violated window (0 if none, -1 abandoned), and each
# window's count after it (before it, when refused). (Costs and answers travel as one string
# each: a protocol element per number cost more to write and to read than the script.)
_CHECK_AND_COUNT = """
local n = tonumber(ARGV[1])
local used, limit, start = {}, {}, {}
for i = 1, n do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  start[i] = used[i]
  limit[i] = tonumber(ARGV[2 + i])
end
local costs = {}
for cost in string.gmatch(ARGV[3 + 2 * n], '[^,]+') do costs[#costs + 1] = tonumber(cost) end
local out = {}
local r = n
for base = 0, #costs - n, n do
  r = r + 1
  local violated = 0
  for i = 1, n do
    if used[i] + costs[base + i] > limit[i] then
      violated = i
      break
    end
  end
  if violated == 0 then
    -- The record is written only where none is (NX): one there means abandoned.
    local added = {}
    for i = 1, n do added[i] = costs[base + i] end
    if redis.call('SET', KEYS[r], table.concat(added, ','), 'EX', tonumber(ARGV[2]), 'NX') then
      for i = 1, n do used[i] = used[i] + costs[base + i] end
    else
      violated = -1
    end
  elseif redis.call('EXISTS', KEYS[r]) == 1 then
    violated = -1
  end
  out[#out + 1] = violated == 0 and 1 or 0
  out[#out + 1] = violated
  -- %d: concat would write a count from 1e14 up as 1e+14
  for i = 1, n do out[#out + 1] = string.format('%d', used[i]) end
end
for i = 1, n do
  if used[i] > start[i] then
    redis.call('INCRBY', KEYS[i], used[i] - start[i])
    if start[i] == 0 then  -- a new window's counter (EXPIRE's NX needs Redis 7)
      redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2 + n + i]))
    end
  end
end
return table.concat(out, ',')
"""
MAX_COALESCED = 256  # requests decided in one script call

# Takes back what one request's decision added, by its charge key, once: KEYS: the counters it
# was decided against, then its charge key; ARGV: how long an abandoned mark is kept. No record
# yet: the decision has not run (or never will), so the id is marked abandoned and the script
# will add nothing for it. Counters never go below 0; one already expired stays gone. Returns 1
# when something was taken back.
_REFUND = """
local n = #KEYS - 1
local record = redis.call('GET', KEYS[n + 1])
if not record then
  redis.call('SET', KEYS[n + 1], 'abandoned', 'EX', tonumber(ARGV[1]))
  return 0
end
if record == 'abandoned' or record == 'refunded' then return 0 end
local i = 0
for cost in string.gmatch(record, '[^,]+') do
  i = i + 1
  local back = math.min(tonumber(redis.call('GET', KEYS[i]) or '0'), tonumber(cost))
  if back > 0 then redis.call('DECRBY', KEYS[i], back) end
end
redis.call('SET', KEYS[n + 1], 'refunded', 'EX', tonumber(ARGV[1]))
return 1
"""


@dataclass(slots=True)
class _Waiting:
    costs: list[int]
    ref: bytes  # the request's id: its charge key's last part
    # admitted, violated window, counts, and the time the request was counted at
    future: asyncio.Future[tuple[bool, int, list[int], float]]


class MemoryCounters:
    """The same windows in this process: (tenant, limit name) -> [bucket, used]."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], list[int]] = {}

    def used(self, tenant: str, limit: Window, now: float) -> int:
        bucket = int(now // limit.seconds)
        seen, used = self._counts.get((tenant, limit.name), (bucket, 0))
        return used if seen == bucket else 0

    def check_and_count(
        self, budget: Budget, costs: list[int], now: float
    ) -> tuple[bool, int, list[int]]:
        # On every request: one pass that reads each window (its entry made if new), and
        # one that counts in all of them, unless a window refuses.
        counts, windows, keys = self._counts, budget.windows, budget.keys
        entries, used = [], []
        violated = 0
        for i in range(len(windows)):
            w = windows[i]
            bucket = int(now // w.seconds)
            entry = counts.get(keys[i])
            if entry is None:
                entry = counts[keys[i]] = [bucket, 0]
            elif entry[0] != bucket:
                entry[0], entry[1] = bucket, 0
            entries.append(entry)
            used.append(entry[1])
            if not violated and entry[1] + costs[i] > w.limit:
                violated = i + 1
        if violated:
            return False, violated, used
        for i in range(len(entries)):
            used[i] = entries[i][1] = used[i] + costs[i]
        return True, 0, used

    def refund(self, budget: Budget, costs: Sequence[int], at: float) -> None:
        """Take back what `check_and_count` counted at `at` (if its windows are still on)."""
        for w, key, cost in zip(budget.windows, budget.keys, costs, strict=True):
            entry = self._counts.get(key)
            if entry is not None and entry[0] == int(at // w.seconds):
                entry[1] = max(0, entry[1] - cost)


class Quota:
    """Identifies tenants and decides requests; one per runtime process."""

    def __init__(
        self,
        config: QuotaConfig,
        *,
        redis_client: Any | None = None,
        clock: Callable[[], float] = time.time,
        on_decision: Callable[[str, str], None] | None = None,
        on_redis_seconds: Callable[[float], None] | None = None,
        on_refund_lost: Callable[[], None] | None = None,
        on_reload: Callable[[bool], None] | None = None,
    ) -> None:
        self.header = config.tenant_header.lower()  # fixed for the process: the front door reads it
        self._clock = clock
        self._redis = redis_client
        self._script = redis_client.register_script(_CHECK_AND_COUNT) if redis_client else None
        self._refund = redis_client.register_script(_REFUND) if redis_client else None
        self._memory = MemoryCounters()
        # Requests waiting for Redis, by tenant and Budget: one sender task each at a time.
        self._waiting: dict[tuple[str, int], tuple[Budget, list[_Waiting]]] = {}
        self._senders: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._failures = 0
        self._breaker_until = 0.0
        self._breaker_why = ""
        self._on_decision = on_decision or (lambda tenant, decision: None)
        self._on_redis_seconds = on_redis_seconds or (lambda s: None)
        self._on_refund_lost = on_refund_lost or (lambda: None)
        # Whether a changed configuration file was refused (True) or loaded (False).
        self._on_reload = on_reload or (lambda refused: None)
        self._refunds: set[asyncio.Task[None]] = set()
        # Checks a reloaded configuration against the model (FatalStartupError: not taken).
        self.check_config: Callable[[QuotaConfig], None] = lambda config: None
        # Request ids: unique across replicas and restarts while a charge record lives.
        # (bytes: each goes into a Redis key, which redis-py then need not encode)
        self._ids = map(f"{os.urandom(8).hex()}-%x".encode().__mod__, itertools.count())
        self.use(config)

    def use(self, config: QuotaConfig) -> None:
        """Take a new configuration (rotated keys, changed limits) without a restart. The
        tenant header and the store are fixed for the process's life: they need a new pod."""
        self.config = config
        self._budget_s = config.decision_budget_ms / 1000
        self._bearer = self.header == "authorization"
        self._by_hash = {h: t.name for t in config.tenants for h in t.key_sha256}
        # Known keys seen, by key: a key is hashed once, not on every request. Only keys of
        # the configuration go in, so it holds at most one entry per keySha256.
        self._by_key: dict[str, str] = {}
        limits = {t.name: t.limits for t in config.tenants}
        if config.default_tenant is not None:
            limits[DEFAULT_TENANT] = config.default_tenant.limits
        ns, policy = config.namespace, config.policy
        self._budgets = {}
        for tenant, those in limits.items():
            # failureMode Local: each replica's share of every limit, counted in its memory.
            shares = [Window.of(lim, lim.limit // config.replicas) for lim in those]
            local = Budget.of(tenant, shares, ns, policy)
            windows = [Window.of(lim) for lim in those]
            self._budgets[tenant] = Budget.of(tenant, windows, ns, policy, local)
        self._local = MemoryCounters()

    async def follow(self, path: Path, every_s: float) -> None:
        """Re-read the configuration file when it or a tenant's key file changes (mounted
        ConfigMap and Secrets are updated in place by the kubelet); a file that no longer loads
        keeps the last good configuration in force, is logged, and is reported to `on_reload`
        (the gauge kubeonnx_quota_config_refused) until a change loads."""
        # Nothing seen yet: the first look loads again, so a change made between the start's
        # load and this task's start is not missed.
        seen: tuple[bytes | None, ...] | None = None
        while True:
            await asyncio.sleep(every_s)
            try:
                content = await asyncio.to_thread(watched_content, path, self.config)
            except OSError as exc:
                log.error("cannot read the quota configuration %s: %s", path, exc)
                continue
            if content == seen:
                continue
            seen = content
            try:
                config = await asyncio.to_thread(load_quota_config, path)
                self.check_config(config)
            except FatalStartupError as exc:
                log.error("quota configuration not reloaded, the last one stays: %s", exc)
                self._on_reload(True)
                continue
            self._on_reload(False)
            if config == self.config:
                continue
            if config.tenant_header.lower() != self.header or (config.redis != self.config.redis):
                log.warning(
                    "quota configuration changes tenantHeader or redis; those take effect "
                    "when the pod restarts"
                )
            self.use(config.model_copy(update={"redis": self.config.redis}))
            log.info("quota configuration reloaded", extra={"tenants": len(config.tenants)})

    def identify(self, headers: Mapping[str, str]) -> str:
        """The tenant the request's key names; the default tenant for a missing or unknown
        key, or Unauthorized when the policy has none."""
        raw = headers.get(self.header)
        if raw is not None and self._bearer:
            raw = raw[7:] if raw[:7].lower() == "bearer " else None
        tenant = None
        if raw:
            tenant = self._by_key.get(raw)
            if tenant is None:
                tenant = self._by_hash.get(key_hash(raw.strip()))
                if tenant is not None and len(self._by_key) < len(self._by_hash):
                    self._by_key[raw] = tenant
        if tenant is not None:
            return tenant
        if self.config.default_tenant is not None:
            return DEFAULT_TENANT
        self._on_decision("", "unauthorized")
        what = "no" if not raw else "an unknown"
        raise Unauthorized(f"{what} API key in {self.config.tenant_header}")

    async def admit(self, tenant: str, rows: int, tokens: int = 0) -> Decision:
        """Count the request against every window of the tenant, or refuse it (QuotaExceeded,
        QuotaUnavailable); the Decision's headers go on the answer either way."""
        budget = self._budgets.get(tenant, NO_BUDGET)
        windows = budget.windows
        now = self._clock()
        if not windows:
            return self._decided(Decision(tenant), "admitted")
        costs = []
        for w in windows:
            unit = w.unit
            cost = 1 if unit == "requests" else rows if unit == "rows" else tokens
            if cost > w.limit and unit != "requests":
                return self._never(tenant, w, cost)
            costs.append(cost)
        if self._redis is None:
            admitted, violated, used = self._memory.check_and_count(budget, costs, now)
            if admitted:  # the usual case, written out
                self._on_decision(tenant, "admitted")
                return Decision(tenant, budget, used, now, 0, "memory", costs)
            return self._settle(
                tenant, budget, costs, now, admitted, violated, used, counted_in="memory"
            )
        if now < self._breaker_until:
            return self._fallback(budget, costs, now, self._breaker_why)
        try:
            # The sender bounds each round trip (_within_budget) and answers every request it
            # took, whatever happens to it.
            ref = next(self._ids)
            admitted, violated, used, at = await self._ask_redis(tenant, budget, costs, ref)
        except QuotaUnavailable as exc:
            return self._fallback(budget, costs, now, str(exc))
        # The windows are those of the time the script was sent with (its keys), not `now`.
        return self._settle(
            tenant, budget, costs, at, admitted, violated, used, counted_in="redis", ref=ref
        )

    def refund(self, decision: Decision) -> None:
        """Take back a request that was counted and then not served after all (a full queue,
        a refusal after admission): its cost leaves the windows it was counted in. In
        memory at once; in Redis in the background (`_refund_later`), never holding up an
        answer."""
        if not decision.counted_in:
            return
        tenant, at = decision.tenant, decision.at
        if decision.counted_in == "redis":
            self._refund_later(decision.budget, at, decision.ref, True)
            return
        counters = self._memory if decision.counted_in == "memory" else self._local
        counters.refund(decision.budget, decision.costs, at)
        self._on_decision(tenant, "refunded")

    def _refund_later(self, budget: Budget, at: float, ref: bytes, counted: bool) -> None:
        """Take back, in the background, what request `ref` (charged under `budget`, sent at
        `at`) added in Redis, if anything; `counted`: it was an admission (a refund is a
        decision outcome), not a decision abandoned on its way (which may never have reached
        Redis). At most REFUNDS_IN_FLIGHT at a time: past that, or when Redis does not take
        it within REFUND_TIMEOUT_S, or when the admission's record has expired
        (CHARGE_RECORD_S), the refund is lost, logged, and counted if it was an
        admission's."""
        assert self._refund is not None
        tenant = budget.tenant
        if len(self._refunds) >= REFUNDS_IN_FLIGHT:
            self._lost(tenant, f"{REFUNDS_IN_FLIGHT} refunds already in flight", counted)
            return
        keys: list[str | bytes] = [budget.key(w, at) for w in budget.windows]
        keys.append(budget.charge_prefix + ref)
        call = self._refund(keys=keys, args=[ABANDONED_S])

        async def send() -> None:
            try:
                took_back = await asyncio.wait_for(call, REFUND_TIMEOUT_S)
            except Exception as exc:
                self._lost(tenant, redact(f"{type(exc).__name__}: {exc}"), counted)
                return
            if not counted:
                return
            if took_back == 1:
                self._on_decision(tenant, "refunded")
            else:  # an admission always leaves a record: only its expiry removes it
                self._lost(tenant, f"its charge record expired ({CHARGE_RECORD_S} s)", counted)

        task = asyncio.get_running_loop().create_task(send())
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    def _lost(self, tenant: str, why: str, counted: bool) -> None:
        if counted:
            log.warning("quota refund for tenant %s lost: %s", tenant, why)
            self._on_refund_lost()
        else:
            log.info("quota: an abandoned decision of tenant %s not taken back: %s", tenant, why)

    async def drain(self, timeout_s: float = REFUND_TIMEOUT_S) -> None:
        """Wait for the refunds in flight (at shutdown), at most `timeout_s`."""
        if self._refunds:
            await asyncio.wait(set(self._refunds), timeout=timeout_s)

    async def _ask_redis(
        self, tenant: str, budget: Budget, costs: list[int], ref: bytes
    ) -> tuple[bool, int, list[int], float]:
        """Queue the request for the tenant's next script call, and start the sender if none
        runs: requests arriving during a round trip share the next one."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, int, list[int], float]] = loop.create_future()
        group = (tenant, id(budget))
        self._waiting.setdefault(group, (budget, []))[1].append(_Waiting(costs, ref, future))
        if group not in self._senders:
            self._senders[group] = loop.create_task(self._send(group))
        return await future

    async def _send(self, group: tuple[str, int]) -> None:
        assert self._script is not None
        batch: list[_Waiting] = []
        try:
            while group in self._waiting:
                budget, waiting = self._waiting[group]
                limits = budget.windows
                batch, rest = waiting[:MAX_COALESCED], waiting[MAX_COALESCED:]
                if rest:
                    self._waiting[group] = (budget, rest)
                else:
                    del self._waiting[group]
                now = self._clock()
                args: list[int | str] = [len(limits), CHARGE_RECORD_S]
                args += [lim.limit for lim in limits]
                args += [lim.seconds * 2 for lim in limits]  # outlive the window
                args.append(",".join([str(c) for w in batch for c in w.costs]))
                keys: list[str | bytes] = [budget.key(w, now) for w in limits]
                prefix = budget.charge_prefix
                keys += [prefix + w.ref for w in batch]
                started = time.perf_counter()
                try:
                    reply = await _within_budget(self._script(keys=keys, args=args), self._budget_s)
                except Exception as exc:
                    self._on_redis_seconds(time.perf_counter() - started)
                    why = self._store_failed(exc, now)
                    # The script may still run after this (it was on its way): undo it.
                    for w in batch:
                        self._refund_later(budget, now, w.ref, False)
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(QuotaUnavailable(why))
                    continue
                self._on_redis_seconds(time.perf_counter() - started)
                if self._failures >= BREAKER_FAILURES:
                    log.info("quota store reachable again")
                self._failures = 0
                values = _numbers(reply)
                step = len(limits) + 2
                for j, w in enumerate(batch):
                    if not w.future.done():
                        part = values[j * step : (j + 1) * step]
                        w.future.set_result((part[0] == 1, part[1], part[2:], now))
        finally:
            self._senders.pop(group, None)
            # A sender that ends abnormally (cancelled at shutdown) leaves no request waiting.
            _, left = self._waiting.pop(group, ([], []))
            for w in [*batch, *left]:
                if not w.future.done():
                    w.future.set_exception(QuotaUnavailable("the quota decision was abandoned"))

    def _store_failed(self, exc: BaseException, now: float) -> str:
        """Count a failed round trip (the breaker opens after BREAKER_FAILURES); say what
        failed: Redis unreachable, or reachable and not answering within the budget."""
        if isinstance(exc, TimeoutError | RedisTimeoutError):
            why = f"the quota store did not answer within {self.config.decision_budget_ms} ms"
        elif isinstance(exc, OSError | RedisConnectionError):  # refused, reset, no such host
            why = "the quota store is unreachable"
        else:
            why = f"the quota store failed ({type(exc).__name__})"
        self._failures += 1
        if self._failures >= BREAKER_FAILURES:
            self._breaker_until = now + BREAKER_OPEN_S
            self._breaker_why = f"{why} ({self._failures} times in a row)"
            if self._failures == BREAKER_FAILURES:
                log.warning(
                    "%s (%s); failure mode %s",
                    why,
                    redact(f"{type(exc).__name__}: {exc}"),
                    self.config.failure_mode,
                )
        return why

    def _fallback(self, budget: Budget, costs: list[int], now: float, why: str) -> Decision:
        """Decide without Redis, as failureMode says, with the request's own `budget` (the
        configuration it was charged under, whatever a reload did since)."""
        mode, tenant = self.config.failure_mode, budget.tenant
        if mode == "Local":
            shares = budget.local
            assert shares is not None
            for share, cost in zip(shares.windows, costs, strict=True):
                if cost > share.limit and share.unit != "requests":
                    # Not a 429: no reset makes room in this replica's share; Redis back does.
                    self._on_decision(tenant, "unavailable")
                    raise QuotaUnavailable(
                        f"{why}; meanwhile each replica enforces its share of tenant "
                        f"'{tenant}''s limits, {share.limit} {share.unit} per {share.window} "
                        f"(window {share.name}) here, and the request alone needs {cost}"
                    )
            return self._settle(
                tenant,
                shares,
                costs,
                now,
                *self._local.check_and_count(shares, costs, now),
                counted_in="local",
            )
        if mode == "Open":
            return self._decided(Decision(tenant), "admitted_unchecked")
        self._on_decision(tenant, "unavailable")
        raise QuotaUnavailable(f"{why}; the quota policy refuses requests until it is back")

    def _settle(
        self,
        tenant: str,
        budget: Budget,
        costs: list[int],
        now: float,
        admitted: bool,
        violated: int,
        used: list[int],
        *,
        counted_in: str,
        ref: bytes = b"",
    ) -> Decision:
        # On every request: written for speed.
        if len(used) != len(costs):
            raise ValueError(f"{len(used)} counts for {len(costs)} windows")
        if admitted:
            decision = Decision(tenant, budget, used, now, 0, counted_in, costs, ref)
            self._on_decision(tenant, "admitted")
            return decision
        if self.config.shadow:
            return self._decided(Decision(tenant, budget, used, now), "shadow_refused")
        broken_at = _last_to_reset(budget, used, costs, now) or violated
        refused = Decision(tenant, budget, used, now, broken_at)
        broken = refused.violated
        assert broken is not None
        self._on_decision(tenant, "refused")
        raise QuotaExceeded(
            f"tenant '{tenant}' is over its limit of {broken.limit.limit} {broken.limit.unit} "
            f"per {broken.limit.window} (window {broken.limit.name}); "
            f"retry in {_until(broken.reset_at, now)} s",
            refused,
        )

    def _never(self, tenant: str, lim: Window, cost: int) -> Decision:
        """Refuse, uncounted, a request that costs more than the whole window `lim` holds:
        a 429 would have the client retry after a reset that can never make room for it.
        (A requests window costs 1: only a limit of 0 refuses it, a tenant shut out, which
        stays a 429.)"""
        if self.config.shadow:
            return self._decided(Decision(tenant), "shadow_refused")
        self._on_decision(tenant, "refused")
        raise OverWholeLimit(
            f"the request alone needs {cost} {lim.unit}, over tenant '{tenant}''s whole limit "
            f"of {lim.limit} {lim.unit} per {lim.window} (window {lim.name}): it can never be "
            f"admitted; send it in smaller requests"
        )

    def _decided(self, decision: Decision, outcome: str) -> Decision:
        self._on_decision(decision.tenant, outcome)
        return decision

    async def usage(self, tenant: str) -> dict[str, Any]:
        """The tenant's limits, what is used of each and when each resets (GET /v2/quota)."""
        now = self._clock()
        budget = self._budgets.get(tenant, NO_BUDGET)
        limits = budget.windows
        source = "memory"
        used = [self._memory.used(tenant, lim, now) for lim in limits]
        if self._redis is not None and limits:
            source = "redis"
            try:
                keys = [budget.key(lim, now) for lim in limits]
                values = await _within_budget(self._redis.mget(keys), self._budget_s * 4)
                used = [int(v or 0) for v in values]
            except Exception:
                raise QuotaUnavailable("the quota store is unreachable; usage is unknown") from None
        return {
            "tenant": tenant,
            "policy": self.config.policy,
            "exact": source == "redis",
            "shadow": self.config.shadow,
            "limits": [
                {
                    "unit": lim.unit,
                    "window": lim.window,
                    "limit": lim.limit,
                    "used": u,
                    "remaining": max(0, lim.limit - u),
                    "resetAt": _rfc3339(_reset_at(lim, now)),
                }
                for lim, u in zip(limits, used, strict=True)
            ],
        }


def _numbers(reply: bytes | str) -> list[int]:
    """The check-and-count script's answer: comma-separated integers."""
    if isinstance(reply, bytes):
        return list(map(int, reply.split(b",")))
    return list(map(int, reply.split(",")))


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _on_time(tick: float, waited: float) -> float:
    """The part of a tick of the decision budget the event loop was there for: a tick that
    took `waited` seconds to fire was late by what exceeds its length and TIMER_SLACK_S, and
    that much of it does not count."""
    late = waited - tick - TIMER_SLACK_S
    return tick if late <= 0 else max(0.0, tick - late)


async def _within_budget(call: Awaitable[Any], budget_s: float) -> Any:
    """Await a Redis call (connecting included) for `budget_s` of time this process was there
    to read the answer. The wait is cut into ticks of a fifth of the budget, and a tick
    counts only the part of it the event loop was on time for (`_on_time`): a tick that woke
    late by its own length or more, beyond the timers' own slack, counts nothing, since the
    replica was starved of CPU or its loop busy elsewhere (and the answer may be sitting
    unread). A frozen Redis fails after the budget
    on an idle loop, and after at most LATE_GRACE_S more on a loop that is never on time.
    The call runs as a task of its own, so a call cut by the budget is cancelled without
    holding the decision while it unwinds; a caller cancelled (shutdown) cancels it too.
    (One timer, rescheduled each tick, and a future the task's end or the budget's wakes:
    `asyncio.wait` a tick cost a sixth more.)"""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(call)
    woken = loop.create_future()
    tick = budget_s / BUDGET_TICKS
    spent = 0.0
    started = loop.time()
    give_up = started + budget_s + LATE_GRACE_S
    handle: asyncio.TimerHandle

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    def on_tick() -> None:
        nonlocal spent, started, handle
        now = loop.time()
        spent += _on_time(tick, now - started)
        if spent >= budget_s * 0.999 or now >= give_up:  # (float sums of ticks)
            wake()
        else:
            started = now
            handle = loop.call_at(min(now + tick, give_up), on_tick)

    task.add_done_callback(wake)
    handle = loop.call_at(min(started + tick, give_up), on_tick)
    try:
        await woken
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        handle.cancel()
        task.remove_done_callback(wake)
    if task.done():
        return task.result()
    task.cancel()
    raise TimeoutError(f"no answer from Redis within {budget_s * 1000:.0f} ms")


def connect_redis(backend: RedisBackend, environ: Mapping[str, str]) -> Any:
    """The quota's own Redis client and connection pool (never shared with the asynchronous
    queue's, even on the same Redis); it connects on first use."""
    import redis.asyncio as aioredis

    password = environ.get(backend.password_env) if backend.password_env else None
    return aioredis.Redis.from_url(
        backend.url,
        password=password or None,
        # The round trip's own limit is _within_budget's; this only bounds a stuck socket.
        socket_timeout=10 + LATE_GRACE_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry_on_timeout=False,
        health_check_interval=0,
    )
