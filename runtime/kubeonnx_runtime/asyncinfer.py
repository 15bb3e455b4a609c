"""Asynchronous inference through a Redis Stream: submission, results with a TTL, and the
worker that consumes the stream with the model's own batcher.

Delivery is at least once and results are written once. A request is an entry of the stream
`<prefix>:requests`, read by the consumer group `kubeonnx`; its record (status, attempts,
result) is the hash `<prefix>:request:<id>`. A worker writes the result only if none is
written yet (one Lua script), calls the callback, and only then acknowledges and deletes the
entry: a worker killed at any point leaves the entry pending, and another worker claims it
(XAUTOCLAIM) once it has been idle for `claim_after_s`. An entry delivered more than
`max_attempts` times goes to the dead-letter stream `<prefix>:dead` (capped at
`dead_letter_max` entries, the oldest trimmed) and its record says why. Every key shares the
hash tag in the prefix, so the scripts run on Redis Cluster too.

What a client can make Redis hold is bounded: a request's body (`max_entry_bytes`, 413 at
submission), its result (`max_result_bytes`: a larger result is a failed request, not a
write), the dead letters. Callbacks are delivered by a task set of their own, bounded in
number and time, so a callback URL that never answers holds no inference slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .codec import InferRequest, encode_response
from .errors import InvalidRequest, PayloadTooLarge, RuntimeServeError, ServerBusy

log = logging.getLogger(__name__)

GROUP = "kubeonnx"
# A record waits this long for its request to be processed before it expires; a result is
# kept for the model's resultTTL from the moment it is written.
PENDING_TTL_S = 7 * 86400
CALLBACK_TIMEOUT_S = 5.0
CALLBACK_TRIES = 3
# A callback's tries together end within this; at shutdown, callbacks get CALLBACK_STOP_S
# more, and those still running are left pending (another replica calls back).
CALLBACK_DEADLINE_S = 15.0
CALLBACK_STOP_S = 5.0

# KEYS: stream, record, queued bytes. ARGV: max queued, pending TTL, id, body, header length,
# callback, tenant, submitted at, max queued bytes. Refuses when the stream holds max queued
# entries already (0) or their bodies would pass max queued bytes (-1). The group is made with
# the stream: its lag (what KEDA scales on) counts from the first entry, before any replica
# has run; the byte counter starts over with it.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], 'kubeonnx', '0', 'MKSTREAM')
  redis.call('SET', KEYS[3], 0)
elseif redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
elseif tonumber(redis.call('GET', KEYS[3]) or '0') + #ARGV[4] > tonumber(ARGV[9]) then
  return -1
end
redis.call('INCRBY', KEYS[3], #ARGV[4])
redis.call('HSET', KEYS[2], 'status', 'pending', 'attempts', 0, 'submitted', ARGV[8],
           'tenant', ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[1], '*', 'id', ARGV[3], 'body', ARGV[4], 'hl', ARGV[5],
           'callback', ARGV[6], 'tenant', ARGV[7])
return 1
"""

# Acknowledges and deletes the entry ARGV[1] of the stream KEYS[1], taking its body's bytes
# (ARGV[2]) off the queued-bytes counter KEYS[2] once (only if this call deleted it).
_ACK_LUA = """
redis.call('XACK', KEYS[1], 'kubeonnx', ARGV[1])
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('DECRBY', KEYS[2], ARGV[2]) < 0 then redis.call('SET', KEYS[2], 0) end
end
"""

# KEYS: record, completed counter, dead-letter stream, request stream, queued bytes, dead-letter
# bytes. ARGV: status, HTTP code, content type, result or error, header length, completed
# at, TTL, tenant, attempts, the entry to acknowledge and delete ("" to leave it for later),
# then, to dead-letter the request ("" otherwise): "1", callback, the request's header length
# and body, and the dead-letter stream's maximum length; then the entry's body bytes and the
# dead-letter stream's maximum bytes (its oldest entries are trimmed past either maximum).
# Writes only the first outcome of a request: a redelivered one changes nothing (0).
_COMPLETE = """
local status = redis.call('HGET', KEYS[1], 'status')
local written = 0
if status ~= 'done' and status ~= 'failed' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'code', ARGV[2], 'content_type', ARGV[3],
             'result', ARGV[4], 'hl', ARGV[5], 'completed', ARGV[6], 'tenant', ARGV[8],
             'attempts', ARGV[9])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('INCR', KEYS[2])
  if ARGV[11] ~= '' then
    redis.call('XADD', KEYS[3], '*', 'id', string.match(KEYS[1], '[^:]+$'),
               'reason', ARGV[4],
               'attempts', ARGV[9], 'tenant', ARGV[8], 'callback', ARGV[12], 'hl', ARGV[13],
               'body', ARGV[14])
    local bytes = redis.call('INCRBY', KEYS[6], #ARGV[14])
    while redis.call('XLEN', KEYS[3]) > tonumber(ARGV[15]) or bytes > tonumber(ARGV[17]) do
      local oldest = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)
      if #oldest == 0 then
        redis.call('SET', KEYS[6], 0)
        break
      end
      local fields, size = oldest[1][2], 0
      for i = 1, #fields, 2 do
        if fields[i] == 'body' then size = #fields[i + 1] end
      end
      redis.call('XDEL', KEYS[3], oldest[1][1])
      bytes = redis.call('DECRBY', KEYS[6], size)
    end
  end
  written = 1
end
if ARGV[10] ~= '' then
  redis.call('XACK', KEYS[4], 'kubeonnx', ARGV[10])
  if redis.call('XDEL', KEYS[4], ARGV[10]) == 1 then
    if redis.call('DECRBY', KEYS[5], ARGV[16]) < 0 then redis.call('SET', KEYS[5], 0) end
  end
end
return written
"""


@dataclass(frozen=True)
class AsyncKeys:
    prefix: str  # e.g. "kubeonnx:{vision/resnet50}": the braces are the Redis Cluster hash tag

    @property
    def stream(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def completed(self) -> str:
        return f"{self.prefix}:completed"

    @property
    def queued_bytes(self) -> str:
        return f"{self.prefix}:queued-bytes"

    @property
    def dead_bytes(self) -> str:
        return f"{self.prefix}:dead-bytes"

    def record(self, request_id: str) -> str:
        return f"{self.prefix}:request:{request_id}"


class QueueFull(ServerBusy):
    """The stream holds as many requests as the model accepts (HTTP 503)."""


class QueueUnavailable(ServerBusy):
    """Redis did not answer in time, or refused (HTTP 503)."""


# A submission or a lookup waits this long for Redis before answering 503.
STORE_TIMEOUT_S = 2.0


async def _store_call(call: Awaitable[Any]) -> Any:
    import redis.exceptions

    try:
        return await asyncio.wait_for(call, STORE_TIMEOUT_S)
    except (TimeoutError, redis.exceptions.RedisError, OSError) as exc:
        raise QueueUnavailable(
            f"the asynchronous queue (Redis) is unavailable: {exc or type(exc).__name__}; "
            "retry shortly"
        ) from None


class RequestNotFound(RuntimeServeError):
    """No such request: never submitted, or its result has expired (HTTP 404)."""


# An IDNA-encoded host name: dot-separated labels of letters, digits, '-' and '_'.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
)


def check_callback(url: str, allowed_hosts: list[str]) -> None:
    """Refuse a callback URL the model may not call: anything but http(s) to a listed host
    (a callback is a request made from inside the cluster, so an open one would let any
    client reach internal services), and anything the HTTP client would not call as it
    reads (both parsers must agree on the host and port, so the allowlist sees the host
    that is called). The refusal does not list the allowed hosts."""
    import httpx

    shown = url if len(url) <= 200 else url[:200] + "..."
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()  # IDNA-encoded, as it is resolved
        # The client decodes it as well, and refuses a malformed A-label then.
        host = host if parsed.host else ""
        split = urlsplit(url)
        read = (_idna(split.hostname) if split.hostname else None, split.port)
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors too
        raise InvalidRequest(f"callback URL {shown!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise InvalidRequest(f"callback URL {shown!r} must be an http or https URL with a host")
    default = 80 if parsed.scheme == "http" else 443
    if read[0] is None or (read[0], read[1] or default) != (host, parsed.port or default):
        raise InvalidRequest(f"callback URL {shown!r} is not a valid URL: an ambiguous host/port")
    if read[1] == 0:
        raise InvalidRequest(f"callback URL {shown!r} is not a valid URL: port 0")
    if not _is_ip(host) and not _HOST_NAME.fullmatch(host):
        raise InvalidRequest(f"callback URL {shown!r} is not a valid URL: a malformed host name")
    if not allowed_hosts:
        raise InvalidRequest(
            "this model calls no callbacks: its spec.async.callbackHosts lists none"
        )
    port = parsed.port or default
    host_allowed = False
    for pattern in allowed_hosts:
        name, listed_port = _entry(pattern)
        if not _host_matches(host, name):
            continue
        host_allowed = True
        if listed_port == "*" or (listed_port or str(default)) == str(port):
            return
    if host_allowed:
        raise InvalidRequest(
            f"callback port {port} of {host!r} is not allowed: spec.async.callbackHosts "
            f"allows this host on port {default} only, unless an entry names the port "
            f"({host}:{port}, or {host}:* for any)"
        )
    raise InvalidRequest(
        f"callback host {host!r} is not allowed: it is not in spec.async.callbackHosts"
    )


def _entry(pattern: str) -> tuple[str, str | None]:
    """An allowlist entry as (host, port): a name, `*.domain`, an IP or a CIDR, with
    `:port` or `:*` (any port) after it, `[IPv6]:port` for IPv6; no port: the scheme's."""
    pattern = pattern.strip().lower()
    if pattern.startswith("["):
        host, _, rest = pattern[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if pattern.count(":") == 1:
        host, _, port = pattern.partition(":")
        return host, port
    return pattern, None


def _network(name: str) -> Any:
    """The IP network an allowlist host names (an IP or a CIDR), or None for a name."""
    import ipaddress

    try:
        return ipaddress.ip_network(name, strict=False)
    except ValueError:
        return None


def _host_matches(host: str, name: str) -> bool:
    import ipaddress

    if host == name or (name.startswith("*.") and host.endswith(name[1:])):
        return True
    network = _network(name)
    if network is None or not _is_ip(host):
        return False
    return ipaddress.ip_address(host) in network


def _listed_networks(allowed_hosts: list[str]) -> list[Any]:
    """The IPs and CIDRs listed: the only non-public addresses a callback may reach."""
    listed = (_network(_entry(pattern)[0]) for pattern in allowed_hosts)
    return [network for network in listed if network is not None]


def _idna(host: str) -> str:
    import idna

    return host.lower() if host.isascii() else idna.encode(host.lower()).decode("ascii")


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class Record:
    """What GET /v2/models/{name}/requests/{id} answers, read from the request's hash."""

    id: str
    status: str
    attempts: int
    tenant: str
    code: int
    content_type: str
    result: bytes
    header_length: int | None

    @classmethod
    def from_hash(cls, request_id: str, raw: Mapping[bytes, bytes]) -> Record:
        def text(key: str, default: str = "") -> str:
            value = raw.get(key.encode())
            return value.decode() if value is not None else default

        hl = text("hl")
        return cls(
            id=request_id,
            status=text("status", "pending"),
            attempts=int(text("attempts", "0") or 0),
            tenant=text("tenant"),
            code=int(text("code", "200") or 200),
            content_type=text("content_type", "application/json"),
            result=raw.get(b"result", b""),
            header_length=int(hl) if hl else None,
        )


class AsyncStore:
    """Submission and lookup: what both the gateway and the model's replicas do."""

    def __init__(
        self,
        client: Any,
        keys: AsyncKeys,
        *,
        max_queued: int,
        callback_hosts: list[str],
        max_entry_bytes: int = 4 * 1024 * 1024,
        max_queued_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.keys = keys
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.callback_hosts = callback_hosts
        self.max_entry_bytes = max_entry_bytes
        self._submit = client.register_script(_SUBMIT)

    def check_callback(self, url: str | None) -> None:
        """400 for a callback URL this model may not call (before the body is read)."""
        if url:
            check_callback(url, self.callback_hosts)

    def check_size(self, size: int) -> None:
        """413 for a request body (as queued: inflated) over the entry limit."""
        if size > self.max_entry_bytes:
            raise PayloadTooLarge(
                f"the request body is {size} bytes, over the limit of {self.max_entry_bytes} "
                "bytes for an asynchronous request (spec.async.maxEntryBytes)"
            )

    async def submit(
        self, body: bytes, header_length: int | None, *, tenant: str, callback: str | None
    ) -> str:
        """Queue a request whose body is already checked; return its id. The id is random
        (122 bits): knowing it is what lets a client read the result."""
        self.check_callback(callback)
        self.check_size(len(body))
        request_id = uuid.uuid4().hex
        queued = await _store_call(
            self._submit(
                keys=[self.keys.stream, self.keys.record(request_id), self.keys.queued_bytes],
                args=[
                    self.max_queued,
                    PENDING_TTL_S,
                    request_id,
                    body,
                    "" if header_length is None else header_length,
                    callback or "",
                    tenant,
                    f"{time.time():.3f}",
                    self.max_queued_bytes,
                ],
            )
        )
        if queued == -1:
            raise QueueFull(
                f"the asynchronous queue holds its limit of {self.max_queued_bytes} bytes of "
                "requests (spec.async.maxQueuedBytes); retry later"
            )
        if not queued:
            raise QueueFull(
                f"the asynchronous queue is full ({self.max_queued} requests); retry later"
            )
        return request_id

    async def lookup(self, request_id: str, tenant: str | None) -> Record:
        """The request's record. With quotas, `tenant` is the caller's: another tenant's
        request is answered as not found, as if it did not exist, and so is a record that
        names no tenant (it fails closed: no tenant's key reads it)."""
        unknown = RequestNotFound(
            f"no request {request_id!r}: never submitted, or its result has expired"
        )
        if not request_id.isalnum() or len(request_id) > 64:
            raise unknown
        raw = await _store_call(self.client.hgetall(self.keys.record(request_id)))
        if not raw:
            raise unknown
        record = Record.from_hash(request_id, raw)
        if tenant is not None and record.tenant != tenant:
            raise unknown
        return record


def status_document(record: Record, location: str) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "attempts": record.attempts,
        "location": location,
    }
    if record.status == "failed":
        doc["error"] = record.result.decode(errors="replace")
    return doc


# What the worker reports: outcome ("done", "failed", "dead_lettered", "retry") per request.
Outcome = Callable[[str], None]


class Transient(Exception):
    """The request may succeed on another attempt (the server, not the request, failed)."""


class CallbackRefused(Exception):
    """The callback's host resolves to an address it may not call."""


@dataclass
class _Call:
    url: str
    request_id: str
    status: str
    entry_id: str
    acknowledge: Callable[[str], Awaitable[None]]
    tenant: str
    host: str
    since: float


class Callbacks:
    """Callbacks of answered requests, made apart from inference, so a URL that never
    answers holds no inference slot: at most `limit` at once, at most `per_tenant` of one
    tenant and `per_host` to one host, each within CALLBACK_DEADLINE_S, its entry
    acknowledged after it. A callback over a cap waits in a local queue (at most
    `4 * limit`, at most `max_wait_s`, fairly over tenants) and is made as soon as a slot
    frees; beyond that, or cut short by a stop, it is made when its entry is claimed again
    (at least once holds).

    The host is resolved at delivery and the request sent to the address checked: a name
    that resolves to a loopback, link-local, private or otherwise non-public address is
    refused unless that address is listed in `allowed_hosts` as an IP or CIDR. Only the
    status of the answer is read: its body is never read."""

    def __init__(
        self,
        model_name: str,
        limit: int,
        on_outcome: Outcome | None = None,
        *,
        allowed_hosts: list[str] | None = None,
        per_tenant: int | None = None,
        per_host: int | None = None,
        max_wait_s: float = 60.0,
    ) -> None:
        self.model_name = model_name
        self.limit = limit
        self.per_tenant = per_tenant or max(1, limit // 4)
        self.per_host = per_host or max(1, limit // 4)
        self.max_wait_s = max_wait_s
        self.networks = _listed_networks(allowed_hosts or [])
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._tasks: set[asyncio.Task[None]] = set()
        self._tenants: Counter[str] = Counter()
        self._hosts: Counter[str] = Counter()
        self._waiting: deque[_Call] = deque()
        self._http: Any = None

    def start(
        self,
        url: str,
        request_id: str,
        status: str,
        entry_id: str,
        acknowledge: Callable[[str], Awaitable[None]],
        tenant: str = "",
    ) -> None:
        try:  # the endpoint; a URL the client refuses fails in call()
            split = urlsplit(url)
            host = f"{(split.hostname or '').lower()}:{split.port or split.scheme}"
        except ValueError:
            host = ""
        call = _Call(url, request_id, status, entry_id, acknowledge, tenant, host, time.monotonic())
        if self._fits(call):
            self._launch(call)
        elif len(self._waiting) < 4 * self.limit:
            self._waiting.append(call)
        else:
            self._defer(call, "the local queue of callbacks is full")

    def _fits(self, call: _Call) -> bool:
        return (
            len(self._tasks) < self.limit
            and self._tenants[call.tenant] < self.per_tenant
            and self._hosts[call.host] < self.per_host
        )

    def _defer(self, call: _Call, why: str) -> None:
        self._on_outcome("deferred")
        log.warning(
            "callback for %s deferred (%s); it is made when the request is claimed again",
            call.request_id,
            why,
        )

    def _launch(self, call: _Call) -> None:
        async def call_then_acknowledge() -> None:
            self._on_outcome(await self.call(call.url, call.request_id, call.status))
            try:
                await call.acknowledge(call.entry_id)
            except Exception as exc:  # left pending: claimed again, called back again
                log.warning(
                    "request %s: not acknowledged after its callback: %s", call.request_id, exc
                )

        self._tenants[call.tenant] += 1
        self._hosts[call.host] += 1
        task = asyncio.create_task(call_then_acknowledge())
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._tenants[call.tenant] -= 1
            self._hosts[call.host] -= 1
            self._next()

        task.add_done_callback(done)

    def _next(self) -> None:
        """Start the waiting callbacks that fit now, oldest first; those that waited too
        long are left to be claimed again."""
        now = time.monotonic()
        kept: deque[_Call] = deque()
        while self._waiting:
            call = self._waiting.popleft()
            if now - call.since > self.max_wait_s:
                self._defer(call, f"waited {self.max_wait_s:.0f}s for a free slot")
            elif self._fits(call):
                self._launch(call)
            else:
                kept.append(call)
        self._waiting = kept

    async def stop(self) -> None:
        """Wait CALLBACK_STOP_S for the callbacks in flight; the rest stay pending."""
        self._waiting.clear()  # their entries stay pending: claimed again
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=CALLBACK_STOP_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    async def _target(self, url: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The URL with its host replaced by a checked address, the Host header, and the
        name for TLS (SNI and the certificate's check)."""
        import ipaddress

        import httpx

        parsed = httpx.URL(url)
        host = parsed.host
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise CallbackRefused(f"{host} does not resolve")
        for address in addresses:
            if not address.is_global and not any(address in net for net in self.networks):
                raise CallbackRefused(
                    f"{host} resolves to {address}, a non-public address not listed as an "
                    "IP or CIDR in spec.async.callbackHosts"
                )
        address = addresses[0]
        literal = f"[{address}]" if address.version == 6 else str(address)
        headers = {"Host": parsed.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return str(parsed.copy_with(host=literal)), headers, extensions

    async def call(self, url: str, request_id: str, status: str) -> str:
        """POST the request's id and status to its callback URL. Never raises; ends within
        CALLBACK_DEADLINE_S. Returns the outcome: delivered or failed."""
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=CALLBACK_TIMEOUT_S, follow_redirects=False)
        body = {"id": request_id, "model": self.model_name, "status": status}
        try:
            async with asyncio.timeout(CALLBACK_DEADLINE_S):
                for attempt in range(CALLBACK_TRIES):
                    try:
                        target, headers, extensions = await self._target(url)
                        request = self._http.build_request(
                            "POST", target, json=body, headers=headers, extensions=extensions
                        )
                        # Only the status: the body, however large, is never read.
                        response = await self._http.send(request, stream=True)
                        await response.aclose()
                        if response.status_code < 500:
                            return "delivered"
                    except (httpx.HTTPError, OSError) as exc:
                        log.info("callback for %s failed: %s", request_id, exc)
                    await asyncio.sleep(0.5 * 2**attempt)
        except TimeoutError:
            pass
        except CallbackRefused as exc:
            log.warning("callback for %s refused: %s", request_id, exc)
            return "refused"
        except Exception as exc:  # a URL the client refuses: no try would succeed
            log.warning("callback for %s not made: %s: %s", request_id, type(exc).__name__, exc)
            return "failed"
        log.warning("callback for %s not delivered after %d tries", request_id, CALLBACK_TRIES)
        return "failed"


class AsyncWorker:
    """Consumes the stream: new entries, and entries other consumers left pending."""

    forget_after_ms = 3600_000  # see _forget_departed

    def __init__(
        self,
        client: Any,
        keys: AsyncKeys,
        *,
        decode: Callable[[bytes, int | None], InferRequest],
        infer: Callable[[InferRequest], Awaitable[dict[str, Any]]],
        model_name: str,
        model_version: str,
        max_attempts: int,
        result_ttl_s: int,
        claim_after_s: float,
        concurrency: int,
        consumer: str | None = None,
        max_result_bytes: int = 4 * 1024 * 1024,
        dead_letter_max: int = 1000,
        dead_letter_max_bytes: int = 256 * 1024 * 1024,
        max_callbacks: int = 64,
        callback_hosts: list[str] | None = None,
        on_outcome: Outcome | None = None,
        on_queue_length: Callable[[int], None] | None = None,
        on_result_bytes: Callable[[int], None] | None = None,
        on_callback: Outcome | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self._decode = decode
        self._infer = infer
        self.model_name = model_name
        self.model_version = model_version
        self.max_attempts = max_attempts
        self.result_ttl_s = result_ttl_s
        self.claim_after_ms = max(1, int(claim_after_s * 1000))
        self.concurrency = concurrency
        self.max_result_bytes = max_result_bytes
        self.dead_letter_max = dead_letter_max
        self.dead_letter_max_bytes = dead_letter_max_bytes
        # Unique per process: a restarted pod must not inherit a dead one's pending entries
        # by name (they are reclaimed by idle time, like any other consumer's).
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._on_queue_length = on_queue_length or (lambda n: None)
        self._on_result_bytes = on_result_bytes or (lambda n: None)
        # A deferred callback waits locally for less than claim_after: by then its entry
        # may be claimed again (and called back from there).
        self.callbacks = Callbacks(
            model_name,
            max_callbacks,
            on_callback,
            allowed_hosts=callback_hosts,
            max_wait_s=max(1.0, claim_after_s / 2),
        )
        self._complete = client.register_script(_COMPLETE)
        self._ack = client.register_script(_ACK_LUA)
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._claims = 0

    def stop(self) -> None:
        """Take no new entries (at most the read in progress, a second long, still brings
        some, which are answered too); `run` returns once those in flight are answered."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info(
            "stopping: answering the %d requests in hand; the rest stay queued", len(self._inflight)
        )

    async def _ensure_group(self) -> None:
        import redis.exceptions

        try:
            await self.client.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        next_claim = 0.0
        failures = 1  # the group is made (if missing) before the first read
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                if failures:
                    await self._ensure_group()
                entries: list[tuple[str, dict[bytes, bytes], int]] = []
                now = time.monotonic()
                if now >= next_claim:
                    entries = await self._claim(free)
                    next_claim = now + max(0.5, self.claim_after_ms / 2000)
                if not entries:
                    entries = await self._read(free)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarted: keep trying, gently
                failures += 1
                log.warning("async queue unreachable (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), min(5.0, 0.2 * 2**failures))
                continue
            for entry_id, fields, delivered in entries:
                task = asyncio.create_task(self._handle(entry_id, fields, delivered))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        if self._inflight:
            await asyncio.wait(self._inflight)
        await self.callbacks.stop()

    async def _read(self, count: int) -> list[tuple[str, dict[bytes, bytes], int]]:
        # Block for at most a second, so a stop is noticed and reclaiming happens.
        reply = await self.client.xreadgroup(
            GROUP, self.consumer, {self.keys.stream: ">"}, count=count, block=1000
        )
        entries = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append((_text(entry_id), fields, 1))
        return entries

    async def _forget_departed(self) -> None:
        """Remove consumers that hold nothing and have not been seen for an hour: every
        process is a consumer of its own, and the group would otherwise list every pod that
        ever ran. A live one removed by mistake is made again by its next read."""
        for consumer in await self.client.xinfo_consumers(self.keys.stream, GROUP):
            name = _text(consumer["name"])
            idle = consumer["idle"]
            if name != self.consumer and not consumer["pending"] and idle > self.forget_after_ms:
                await self.client.xgroup_delconsumer(self.keys.stream, GROUP, name)

    async def _claim(self, count: int) -> list[tuple[str, dict[bytes, bytes], int]]:
        """Entries other consumers were given and have not acknowledged for claim_after:
        their consumer died or hangs. XAUTOCLAIM hands them over (and counts the delivery)."""
        self._on_queue_length(int(await self.client.xlen(self.keys.stream)))
        self._claims += 1
        if self._claims % 100 == 1:
            await self._forget_departed()
        reply = await self.client.xautoclaim(
            self.keys.stream, GROUP, self.consumer, self.claim_after_ms, "0-0", count=count
        )
        claimed = [(_text(i), f) for i, f in reply[1] if f]
        if not claimed:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id, _ in claimed:
                pipe.xpending_range(self.keys.stream, GROUP, entry_id, entry_id, 1)
            pending = await pipe.execute()
        entries = []
        for (entry_id, fields), info in zip(claimed, pending, strict=True):
            delivered = int(info[0]["times_delivered"]) if info else self.max_attempts + 1
            entries.append((entry_id, fields, delivered))
        log.info("reclaimed %d pending requests", len(entries))
        return entries

    async def _handle(self, entry_id: str, fields: dict[bytes, bytes], delivered: int) -> None:
        request_id = _text(fields.get(b"id", b""))
        tenant = _text(fields.get(b"tenant", b""))
        callback = _text(fields.get(b"callback", b""))
        record = self.keys.record(request_id)
        size = len(fields.get(b"body", b""))  # taken off the queued bytes when deleted
        try:
            written: str | None = None  # the outcome a previous delivery already wrote
            if delivered > 1:  # redelivered: its replica may have died after writing the result
                before = _text(await self.client.hget(record, "status") or b"")
                written = before if before in ("done", "failed") else None
            # Without a callback, the result and the acknowledgement are one script call.
            ack = "" if callback else entry_id
            acked = False
            if written is not None:
                status = written  # only the callback and the acknowledgement were lost
            elif delivered > self.max_attempts:
                last = await self.client.hget(record, "last_error")
                reason = f"gave up after {self.max_attempts} attempts: " + (
                    _text(last)
                    if last
                    else "the replica processing it stopped (killed or restarted) each time"
                )
                dead = [
                    "1",
                    callback,
                    fields.get(b"hl", b""),
                    fields.get(b"body", b""),
                    self.dead_letter_max,
                ]
                await self._finish(
                    request_id,
                    "failed",
                    500,
                    reason.encode(),
                    None,
                    tenant,
                    delivered - 1,
                    ack,
                    size,
                    dead,
                )
                status, acked = "failed", bool(ack)
                self._on_outcome("dead_lettered")
                log.warning("request %s dead-lettered: %s", request_id, reason)
            else:
                if delivered > 1:  # the status shows that it is being tried again
                    await self.client.hset(record, "attempts", delivered)
                heartbeat = asyncio.create_task(self._keep_claimed(entry_id))
                try:
                    status, code, payload, hl = await self._run(request_id, fields)
                finally:
                    heartbeat.cancel()
                await self._finish(
                    request_id, status, code, payload, hl, tenant, delivered, ack, size
                )
                acked = bool(ack)
                self._on_outcome(status)
                self._on_result_bytes(len(payload))
            if callback:  # then acknowledged, apart from the inference slots
                self.callbacks.start(
                    callback,
                    request_id,
                    status,
                    entry_id,
                    functools.partial(self._acknowledge, size=size),
                    tenant,
                )
            elif not acked:
                await self._acknowledge(entry_id, size)
        except Transient as exc:
            # Left pending: another attempt comes when it has been idle for claim_after.
            self._on_outcome("retry")
            log.warning("request %s attempt %d failed: %s", request_id, delivered, exc)
            with contextlib.suppress(Exception):
                await self.client.hset(record, "last_error", str(exc)[:1000])
        except Exception:
            self._on_outcome("retry")
            log.exception(
                "request %s: the queue could not be updated; it stays pending", request_id
            )

    async def _acknowledge(self, entry_id: str, size: int = 0) -> None:
        await self._ack(keys=[self.keys.stream, self.keys.queued_bytes], args=[entry_id, size])

    async def _keep_claimed(self, entry_id: str) -> None:
        """While a request runs, reset its idle time every third of claim_after, so a run
        longer than claim_after is not taken over and run again by another replica. The
        claim asks for some idle time itself: an entry another replica has just taken over
        (this process stalled) is not taken back."""
        period = self.claim_after_ms / 3000
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):  # a missed beat costs at most a second run
                await self.client.xclaim(
                    self.keys.stream,
                    GROUP,
                    self.consumer,
                    int(period * 500),
                    [entry_id],
                    justid=True,
                )

    async def _run(
        self, request_id: str, fields: dict[bytes, bytes]
    ) -> tuple[str, int, bytes, int | None]:
        """(status, HTTP code, payload, binary header length) of one request."""
        hl = _text(fields.get(b"hl", b""))
        try:
            request = self._decode(fields.get(b"body", b""), int(hl) if hl else None)
            outputs = await self._infer(request)
            payload, out_hl = encode_response(self.model_name, self.model_version, request, outputs)
        except InvalidRequest as exc:  # the same request would fail again: it is the answer
            return "failed", 400, str(exc).encode(), None
        except RuntimeServeError as exc:  # our own words, meant for the client
            raise Transient(str(exc)) from None
        except Exception:
            # What the synchronous path answers too: the detail (onnxruntime's text, paths)
            # is for the log, under the request's id.
            log.exception("request %s: the model run failed", request_id)
            raise Transient(f"internal error (request {request_id})") from None
        if len(payload) > self.max_result_bytes:
            # Kept in Redis for result_ttl: bounded like a request's body; the client is told.
            message = (
                f"the result is {len(payload)} bytes, over the limit of {self.max_result_bytes} "
                "bytes for an asynchronous result (spec.async.maxResultBytes); send fewer rows "
                "per request, or call /infer synchronously"
            )
            return "failed", 413, message.encode(), None
        return "done", 200, payload, out_hl

    async def _finish(
        self,
        request_id: str,
        status: str,
        code: int,
        payload: bytes,
        header_length: int | None,
        tenant: str,
        attempts: int,
        ack: str,
        size: int,
        dead: list[Any] | None = None,
    ) -> None:
        ctype = "application/octet-stream" if header_length is not None else "application/json"
        keys = self.keys
        await self._complete(
            keys=[
                keys.record(request_id),
                keys.completed,
                keys.dead,
                keys.stream,
                keys.queued_bytes,
                keys.dead_bytes,
            ],
            args=[
                status,
                code,
                ctype,
                payload,
                "" if header_length is None else header_length,
                f"{time.time():.3f}",
                self.result_ttl_s,
                tenant,
                attempts,
                ack,
                *(dead or ["", "", "", "", ""]),
                size,
                self.dead_letter_max_bytes,
            ],
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
