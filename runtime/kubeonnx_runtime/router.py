"""The router role: one model's Open Inference Protocol requests split between versions.

The router serves no model. Each request goes to one version's upstream (a Service of that
version's replicas), chosen in this order: the version in the path (`/versions/V/`), the
pin header (`X-Model-Version`), the tenant's version when sticky (the API key's hash placed
in the weights), else smooth weighted round-robin, which is exact: over any `sum(weights)`
consecutive requests each version gets exactly its weight. Only versions whose upstream
answers its readiness probe take traffic; the weights are shared among those. A version is
a Service over many pods, so a failed connection (one pod failing) does not decide its
readiness: it probes the version at once, and only the probe marks it not ready. A request
whose connection was refused goes to another version (nothing was sent, so this is safe for
any method); that request alone, the weights stay.

With no version ready that may take a request (the model scaled to zero, say), the request is
held: at most `max_held_requests` at a time, each at most `max_hold_s`, and forwarded as
soon as the probes see a version it may go to ready (a first hold has every version probed
at once). A request over the count, or held that long, is answered 503 with Retry-After,
naming why; a client that leaves while held is dropped (code 499). The held count is a
gauge: the demand signal that wakes a model scaled to zero (KEDA's trigger).

A version with `mirror_percent` gets that share of the inference requests copied to it as
well, exactly counted the same way; its answers are dropped. A copy is made only for a body
of known length up to `mirror_max_body_bytes`, is sent after the client's request is
forwarded, is never awaited by it, and is dropped (counted) when `max_mirrors_in_flight`
copies are already in flight or the target is not ready; it is skipped when the target
answered the request itself (pinned to it, say). A copy carries the header
`X-Kubeonnx-Mirror` with the mirror secret; an upstream given the same secret charges no
quota for it. The router removes that header from every client request, so a client
cannot make its request pass for a copy, and the secret never leaves the router and the
upstreams.

The router charges nothing: the upstream version that answers charges the request once,
and its quota headers come back unchanged. Bodies stream both ways (a mirrored body is
held, up to its bound, to be sent twice); hop-by-hop headers are not passed on.

Requests go upstream over the router's own kept-alive connections (`upstream.Pool`,
httptools on the event loop's transports): a general HTTP client cost several times the
CPU per request. The client side is uvicorn's httptools protocol with the server's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.types import Message, Receive, Scope, Send

from .errors import FatalStartupError
from .metrics import ConstantLabels
from .settings import VERSION_PATTERN, ServeSettings
from .upstream import (
    ClientGone,
    ConnectFailed,
    Connection,
    Pool,
    UpstreamClosed,
    UpstreamError,
    UpstreamTimeout,
    request_head,
    send_body,
)

log = logging.getLogger(__name__)

MIRROR_HEADER = b"x-kubeonnx-mirror"
SMALL_BODY = 64 * 1024  # bodies up to this are read whole; larger ones stream
VERSION_IN_PATH = re.compile(r"/v2/models/[^/]+/versions/([^/]+)(?:/|$)")
MIRRORED_PATH = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/(?:infer|predict|predict/batch)$")
# What a client sends to run the model: the only requests held (and counted as demand).
HELD_PATH = re.compile(
    r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/(?:infer|async-infer|predict|predict/batch)$"
)
OIP_PATH = re.compile(r"^/v2(?:/|$)")  # the protocol's paths: 503 while nothing is ready
RETRY_AFTER_S = 5  # Retry-After of the router's own 503s (at least probe_interval_s)
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
}
# Not passed upstream either: the body's framing is the router's own (content-length or
# chunked), the client's marker is never trusted, and the router answered its Expect.
NOT_FORWARDED = HOP_BY_HOP | {b"content-length", MIRROR_HEADER, b"expect"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # sent again on a fresh connection if need be
HOLD_HEAD = "kubeonnx.hold_head"  # in the scope: hold the answer's head for its body
# In the scope: the connection's `holding(on)`, which stops the request's arrival clock
# (the server's read timeout) while the router holds it and restarts it after.
HOLDING = "kubeonnx.holding"
GONE = "kubeonnx.gone"  # in the scope: an event set once the client's connection is lost


MAX_HELD_REQUESTS = 2000


class VersionConfig(BaseModel):
    """One version the router sends to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=VERSION_PATTERN, description="the model version (OIP)")
    url: str = Field(
        pattern=r"^http://[^/?#]+/?$",
        description="its upstream, plain http://HOST[:PORT], e.g. http://mlp-v2.ns.svc:8080",
    )
    weight: int = Field(0, ge=0, le=10000, description="its share of requests, relative")
    mirror_percent: float = Field(
        0, ge=0, le=100, description="percent of inference requests also copied to it"
    )
    hold: bool = Field(
        True,
        strict=True,
        description="a request pinned to it is held while it is not ready; false: 503 at once",
    )


class RouterConfig(BaseModel):
    """The router's configuration file (JSON, or YAML): the runtime contract of the role."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, min_length=1, description="the model's name: every series carries it as `model`"
    )
    versions: list[VersionConfig] = Field(min_length=1, max_length=8)
    sticky: bool = Field(False, description="one tenant (API key) always reaches one version")
    pin_header: str = Field("X-Model-Version", min_length=1)
    tenant_header: str = Field("Authorization", min_length=1, description="the API key")
    probe_interval_s: float = Field(1.0, gt=0, le=60)
    probe_timeout_s: float = Field(1.0, gt=0, le=60)
    connect_timeout_s: float = Field(5.0, gt=0, le=60)
    timeout_s: float = Field(
        60.0, gt=0, le=3600, strict=True, description="longest wait for each read or write"
    )
    max_mirrors_in_flight: int = Field(64, ge=1, le=10000)
    mirror_max_body_bytes: int = Field(4 * 1024 * 1024, ge=0)
    # Each held request costs up to ~140 KiB (its body's first part buffered by the server,
    # the socket's buffers): 2000 fit in the router's 512 MiB limit.
    max_held_requests: int = Field(
        100,
        ge=0,
        le=MAX_HELD_REQUESTS,
        strict=True,
        description="requests held while no version is ready; 0: none",
    )
    max_hold_s: float = Field(
        60.0, ge=0.1, le=3600, strict=True, description="longest a request is held"
    )

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        names = [v.name for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"versions: a version is named twice ({', '.join(names)})")
        if not any(v.weight for v in self.versions):
            raise ValueError("versions: every weight is 0; one version needs a weight")
        return self


def load_config(path: Path) -> RouterConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FatalStartupError(f"router config {path}: {exc.strerror}") from exc
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FatalStartupError(f"router config {path}: neither JSON nor YAML") from exc
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise FatalStartupError(f"router config {path}: {problems}") from exc


class RouterMetrics:
    """The router's metrics on `registry`; with `model`, each series carries it as `model`
    (added at collection, as the runtime adds its version)."""

    def __init__(self, registry: CollectorRegistry, model: str | None = None) -> None:
        self.registry = registry
        if model is not None:
            registry = CollectorRegistry()
            self.registry.register(ConstantLabels(registry, {"model": model}))
        self.requests = Counter(
            "kubeonnx_router_requests",
            "Requests the router answered, by version sent to and status code",
            ["version", "code"],
            registry=registry,
        )
        self.mirrors = Counter(
            "kubeonnx_router_mirrors",
            "Mirrored copies by target version and outcome (sent, dropped, failed, skipped: "
            "the target answered the request itself)",
            ["version", "outcome"],
            registry=registry,
        )
        self.ready = Gauge(
            "kubeonnx_router_upstream_ready",
            "1 while the version's upstream answers its readiness probe",
            ["version"],
            registry=registry,
        )
        self.held = Gauge(
            "kubeonnx_router_held_requests",
            "Requests held now because no version that may take them is ready: the demand "
            "that wakes a model scaled to zero",
            registry=registry,
        )
        self.holds = Counter(
            "kubeonnx_router_holds",
            "Requests held, by outcome (forwarded: a version became ready; full: "
            "max_held_requests were held already, 503; timeout: held max_hold_s, 503; gone: "
            "the client left, 499; shutdown: the router stopped, 503)",
            ["outcome"],
            registry=registry,
        )
        for outcome in HOLD_OUTCOMES:
            self.holds.labels(outcome)


HOLD_OUTCOMES = ("forwarded", "full", "timeout", "gone", "shutdown")


class Upstream:
    def __init__(self, config: VersionConfig) -> None:
        self.name = config.name
        self.url = config.url.rstrip("/")
        split = urlsplit(self.url)
        self.host = split.hostname or ""
        self.port = split.port or 80
        self.netloc = split.netloc.encode()  # the Host header sent to it
        self.weight = config.weight
        self.mirror_percent = config.mirror_percent
        self.hold = config.hold
        self.ready = False
        self.recheck = asyncio.Event()  # set: probe now, a connection to it failed
        self.current = 0  # smooth weighted round-robin state
        self.mirror_credit = 0.0


class Picker:
    """Which version answers: pinned, sticky or weighted, among the ready ones."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self.by_name = {u.name: u for u in upstreams}

    def weighted(self, exclude: set[str] = frozenset()) -> Upstream | None:  # type: ignore[assignment]
        ready = [u for u in self.upstreams if u.ready and u.weight and u.name not in exclude]
        if not ready:
            return None
        total = sum(u.weight for u in ready)
        best = ready[0]
        for u in ready:
            u.current += u.weight
            if u.current > best.current:
                best = u
        best.current -= total
        return best

    def sticky(self, key: str, exclude: set[str] = frozenset()) -> Upstream | None:  # type: ignore[assignment]
        """The key's hash as a point in the ready versions' weights laid end to end."""
        ready = [u for u in self.upstreams if u.ready and u.weight and u.name not in exclude]
        if not ready:
            return None
        total = sum(u.weight for u in ready)
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % total
        for u in ready:
            if point < u.weight:
                return u
            point -= u.weight
        return ready[-1]

    def mirrors(self) -> list[Upstream]:
        """The versions this request is copied to: each exactly its percent of requests."""
        chosen = []
        for u in self.upstreams:
            if u.mirror_percent:
                u.mirror_credit += u.mirror_percent
                if u.mirror_credit >= 100:
                    u.mirror_credit -= 100
                    chosen.append(u)
        return chosen


class Router:
    """The ASGI app of the router role."""

    def __init__(
        self,
        config: RouterConfig,
        metrics: RouterMetrics,
        mirror_secret: str | None,
        metrics_port: int | None = None,
    ) -> None:
        if mirror_secret is None and any(v.mirror_percent for v in config.versions):
            raise FatalStartupError(
                "router config mirrors a version but no mirror secret is set "
                "(KUBEONNX_MIRROR_SECRET): copies would be charged quota"
            )
        self.config = config
        self.metrics = metrics
        self.mirror_secret = (mirror_secret or "").encode()
        self.metrics_port = metrics_port
        self.upstreams = [Upstream(v) for v in config.versions]
        self.picker = Picker(self.upstreams)
        self.mirrored = any(u.mirror_percent for u in self.upstreams)
        self.pin_header = config.pin_header.lower().encode()
        self.tenant_header = config.tenant_header.lower().encode()
        self.retry_after = str(max(RETRY_AFTER_S, math.ceil(config.probe_interval_s))).encode()
        self.pool = Pool(config.connect_timeout_s)
        self.counted: dict[tuple[str, int], Any] = {}  # requests' metric children, by label
        self.mirroring: set[asyncio.Task[None]] = set()
        self.probes: list[asyncio.Task[None]] = []
        self.held = 0
        # Set (and replaced) each time a version turns ready: what held requests wait on.
        self.turned_ready = asyncio.Event()
        self.stopping = asyncio.Event()  # set when the server shuts down: held ones answered
        # Whether an unpinned request is held: a weighted version may be woken for it.
        self.holds_unpinned = any(u.weight and u.hold for u in self.upstreams)
        for u in self.upstreams:
            metrics.ready.labels(u.name).set(0)

    # -- readiness -------------------------------------------------------------------------

    def set_ready(self, upstream: Upstream, ready: bool) -> None:
        if ready != upstream.ready:
            log.info(
                "upstream %s", "ready" if ready else "not ready", extra={"version": upstream.name}
            )
            if ready:
                self.turned_ready.set()
                self.turned_ready = asyncio.Event()
        upstream.ready = ready
        self.metrics.ready.labels(upstream.name).set(1 if ready else 0)

    async def probe(self, upstream: Upstream) -> None:
        while True:
            wait_s = self.config.probe_timeout_s
            # Cleared before the probe: a recheck asked for during it makes another.
            upstream.recheck.clear()
            try:
                status = await asyncio.wait_for(
                    self.fetch(upstream, "GET", b"/v2/health/ready", [], None, wait_s), wait_s
                )
                self.set_ready(upstream, status == 200)
            except (UpstreamError, TimeoutError):
                self.set_ready(upstream, False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(upstream.recheck.wait(), self.config.probe_interval_s)

    async def start(self) -> None:
        self.probes = [asyncio.create_task(self.probe(u)) for u in self.upstreams]

    async def stop(self) -> None:
        for task in [*self.probes, *self.mirroring]:
            task.cancel()
        await asyncio.gather(*self.probes, *self.mirroring, return_exceptions=True)
        self.pool.close()

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        on_metrics_port = (
            self.metrics_port is not None
            and (scope.get("server") or ("", 0))[1] == self.metrics_port
        )
        if on_metrics_port or (self.metrics_port is None and path == "/metrics"):
            if path == "/metrics":
                await _send(send, 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry))
            else:
                await _send_error(send, 404, "the metrics port serves /metrics alone")
            return
        if path == "/v2/health/live":
            await _send(send, 200, "application/json", b'{"live":true}')
            return
        if path == "/v2/health/ready":
            ready = any(u.ready and u.weight for u in self.upstreams)
            await _send(
                send,
                200 if ready else 503,
                "application/json",
                json.dumps({"ready": ready}).encode(),
            )
            return
        await self.proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def choose(self, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[Upstream | str, bool]:
        """The upstream, or why none (an error message; 404 for an unknown pin); and
        whether the request named its version (then no other version may answer it)."""
        match = VERSION_IN_PATH.search(path)
        pinned = match[1] if match else None
        tenant = None
        for k, v in headers:
            if pinned is None and k == self.pin_header:
                pinned = v.decode("latin-1").strip()
            elif k == self.tenant_header:
                tenant = v.decode("latin-1").strip()
        if pinned is not None:
            upstream = self.picker.by_name.get(pinned)
            if upstream is None:
                served = ", ".join(u.name for u in self.upstreams)
                return f"model version '{pinned}' is not served here; versions: {served}", True
            return upstream, True
        if self.config.sticky and tenant:
            picked = self.picker.sticky(tenant)
        else:
            picked = self.picker.weighted()
        return (picked if picked is not None else ""), False

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        received: list[tuple[bytes, bytes]] = scope["headers"]
        headers, length, chunked, codings = _split_headers(received)
        if codings:  # gzip, chunked: sent on as chunked alone, the body would change meaning
            self.count("", 501)
            await _send_error(
                send,
                501,
                f"transfer coding '{codings.decode('latin-1')}' is not supported; "
                "send the body with 'chunked' alone",
            )
            return
        chosen, pinned = self.choose(path, headers)
        deadline = None  # when held: the end of its hold
        if chosen == "" or (isinstance(chosen, Upstream) and not chosen.ready):
            if not self.holdable(scope, chosen):
                await self.refuse(path, chosen, send)
                return
            deadline = asyncio.get_running_loop().time() + self.config.max_hold_s
            waited, pinned = await self.hold(scope, headers, chosen, pinned, send, deadline)
            if waited is None:
                return
            chosen = waited
        if isinstance(chosen, str):
            self.count("", 404)
            await _send_error(send, 404, chosen)
            return
        target: bytes = scope.get("raw_path") or path.encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        method: str = scope["method"]
        mirrors = (
            self.picker.mirrors()
            if self.mirrored and method == "POST" and MIRRORED_PATH.search(path)
            else []
        )
        body = Body(receive, length, chunked)
        try:
            if length is not None and length <= SMALL_BODY:
                await body.read_all()  # one write upstream, not a stream
            if mirrors:
                mirrors = await self._mirrorable(mirrors, headers, body)
            answer = await self.forward(
                chosen, pinned, method, target, headers, body, send, scope, deadline
            )
        except ClientGone:
            # Nobody to answer (counted as nginx does, 499); the upstream connection, if
            # any, was closed: the request on it is incomplete. The upstream is not at fault.
            self.count(chosen.name, 499)
            return
        if answer is None:
            return
        chosen, conn = answer
        for m in mirrors:
            if m is chosen:  # it answered the request itself: a copy would run it twice
                self.metrics.mirrors.labels(m.name, "skipped").inc()
                continue
            self._mirror(m, method, target, headers, body.data or b"")
        try:
            await self.relay(conn, scope, send)
        except UpstreamError:
            log.warning("upstream answer cut", extra={"version": chosen.name})  # started already
        finally:
            self.pool.release(chosen.host, chosen.port, conn)
        self.count(chosen.name, conn.status)

    def holdable(self, scope: Scope, chosen: Upstream | str) -> bool:
        """Whether a request no ready version may take is held: a request to run the model
        (not a metadata or readiness one, nor a stray path) that the version woken from
        zero may take: unpinned, or pinned to a version that is held for (not a candidate)."""
        if scope["method"] != "POST":
            return False
        match = HELD_PATH.match(scope["path"])
        if match is None or (self.config.model is not None and match[1] != self.config.model):
            return False
        return chosen.hold if isinstance(chosen, Upstream) else self.holds_unpinned

    async def refuse(self, path: str, chosen: Upstream | str, send: Send) -> None:
        """A request not held, with no ready version to take it: 503 for the protocol's
        paths (the model's readiness and metadata say it is not ready), else 404."""
        if not OIP_PATH.match(path):
            self.count("", 404)
            await _send_error(send, 404, "not found")
            return
        if isinstance(chosen, Upstream):
            await self._unavailable(send, f"model version '{chosen.name}' is not ready")
        else:
            await self._unavailable(send, "no version of the model is ready")

    async def hold(
        self,
        scope: Scope,
        headers: list[tuple[bytes, bytes]],
        chosen: Upstream | str,
        pinned: bool,
        send: Send,
        deadline: float,
    ) -> tuple[Upstream | None, bool]:
        """A request no ready version may take, held until one may (that version, and
        whether the request named it), or answered 503 (None) when the hold is full, lasts
        until `deadline` or the router stops, or dropped (None, 499) when the client leaves
        meanwhile. The server's read timeout does not run while it is held."""
        why = "no version of the model is ready"
        if isinstance(chosen, Upstream):
            why = f"model version '{chosen.name}' is not ready"
        limit = self.config.max_held_requests
        if limit == 0:
            await self._unavailable(send, why)
            return None, pinned
        if self.held >= limit or self.stopping.is_set():
            outcome = "full" if self.held >= limit else "shutdown"
            self.metrics.holds.labels(outcome).inc()
            more = (
                f", and {limit} requests are held already (max_held_requests)"
                if outcome == "full"
                else ", and the router is shutting down"
            )
            await self._unavailable(send, why + more)
            return None, pinned
        gone: asyncio.Event | None = scope.get(GONE)
        holding = scope.get(HOLDING)
        loop = asyncio.get_running_loop()
        self.held += 1
        self.metrics.held.set(self.held)
        if holding is not None:
            holding(True)
        if self.held == 1:  # a first request held: ask every version now, not at the interval
            for u in self.upstreams:
                u.recheck.set()
        outcome = "timeout"
        try:
            while True:
                waits = [
                    asyncio.ensure_future(self.turned_ready.wait()),
                    asyncio.ensure_future(self.stopping.wait()),
                ]
                if gone is not None:
                    waits.append(asyncio.ensure_future(gone.wait()))
                # The probes' interval bounds a wait: a version ready all along (whose
                # connection was refused, say) is tried again once its probe has run.
                left = min(deadline - loop.time(), self.config.probe_interval_s)
                try:
                    await asyncio.wait(
                        waits, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for w in waits:
                        w.cancel()
                if gone is not None and gone.is_set():
                    outcome = "gone"
                    self.count("", 499)
                    return None, pinned
                if self.stopping.is_set():
                    outcome = "shutdown"
                    break
                again, pinned = self.choose(scope["path"], headers)
                if isinstance(again, Upstream) and again.ready:
                    outcome = "forwarded"
                    return again, pinned
                if loop.time() >= deadline:
                    break
        finally:
            self.held -= 1
            self.metrics.held.set(self.held)
            self.metrics.holds.labels(outcome).inc()
            if holding is not None:
                holding(False)
        if outcome == "shutdown":
            await self._unavailable(send, f"{why}, and the router is shutting down")
            return None, pinned
        waited = self.config.max_hold_s
        await self._unavailable(send, f"{why}: the request was held {waited:g} s (max_hold_s)")
        return None, pinned

    async def _mirrorable(
        self, mirrors: list[Upstream], headers: list[tuple[bytes, bytes]], body: Body
    ) -> list[Upstream]:
        """The mirrors a copy can go to: none for an asynchronous request or a body of
        unknown length or over the bound (each counted as dropped)."""
        if _async_request(headers) or body.length is None:
            ok = False
        elif body.data is None and body.length <= self.config.mirror_max_body_bytes:
            await body.read_all()
            ok = True
        else:
            ok = body.data is not None
        if ok:
            return mirrors
        for m in mirrors:
            self.metrics.mirrors.labels(m.name, "dropped").inc()
        return []

    async def forward(
        self,
        chosen: Upstream,
        pinned: bool,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: Body,
        send: Send,
        scope: Scope,
        deadline: float | None,
    ) -> tuple[Upstream, Connection] | None:
        """The request sent to `chosen` (or, refused, to another version) and its answer's
        head read; None when an error was answered instead. A request that was held
        (`deadline`, the end of its hold) whose connections were all refused is held again
        while time remains: nothing reached an upstream."""
        tried: set[str] = set()
        while True:
            try:
                conn = await self.exchange(
                    chosen, method, target, headers, body, self.config.timeout_s
                )
                return chosen, conn
            except ConnectFailed:
                # Nothing reached the upstream: another version takes this request. Whether
                # the version is gone (or one of its pods) is its probe's to say, at once.
                chosen.recheck.set()
                tried.add(chosen.name)
                again = None if pinned else self.picker.weighted(exclude=tried)
                time_left = deadline is not None and asyncio.get_running_loop().time() < deadline
                if again is None and time_left:
                    assert deadline is not None
                    held, pinned = await self.hold(scope, headers, chosen, pinned, send, deadline)
                    if held is None:
                        return None
                    tried.clear()
                    chosen = held
                    continue
                if again is None:
                    await self._unavailable(
                        send, f"model version '{chosen.name}' is unreachable", 502, chosen.name
                    )
                    return None
                chosen = again
            except UpstreamTimeout:
                self.count(chosen.name, 504)
                await _send_error(
                    send, 504, f"model version '{chosen.name}' did not answer in time"
                )
                return None
            except UpstreamClosed as exc:
                # The upstream dropped the connection: one pod of the version, killed? Its
                # probe says at once whether the version as a whole still answers.
                chosen.recheck.set()
                self.count(chosen.name, 502)
                await _send_error(send, 502, f"model version '{chosen.name}' failed: {exc}")
                return None

    async def exchange(
        self,
        upstream: Upstream,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: Body,
        wait_s: float,
    ) -> Connection:
        """A connection to `upstream` with the request sent and the answer's head read.

        A request that found a kept-alive connection closed under it before any answer is
        sent again on a fresh one only if that cannot do anything twice: a safe method
        without a body."""
        again = method in SAFE_METHODS and not body.length and not body.chunked
        fresh = False
        while True:
            conn, reused = await self.pool.acquire(upstream.host, upstream.port, fresh)
            conn.begin(head_only=method == "HEAD", with_body=bool(body.length) or body.chunked)
            try:
                await body.send(conn, method, target, upstream.netloc, headers, wait_s)
                await conn.read_head(wait_s)
                return conn
            except UpstreamClosed as exc:
                # A write of the body may fail (a reset) before the answer already received
                # is read: only once the connection's end is in is it known.
                await conn.settle(wait_s)
                if conn.status:  # it answered before taking the whole body (a 413?): relayed
                    return conn
                conn.finish()
                if reused and again and not (exc.answered or conn.answered):
                    again, fresh = False, True
                    continue
                raise
            except BaseException:
                conn.close()
                conn.finish()
                raise

    async def relay(self, conn: Connection, scope: Scope, send: Send) -> None:
        """The answer's status, headers and body to the client, as they come."""
        out = [(k, v) for k, v in conn.headers if k.lower() not in HOP_BY_HOP]
        hold = scope.get(HOLD_HEAD)
        if hold is not None:
            hold()  # the head leaves with the first part of the body, in one write
        await send({"type": "http.response.start", "status": conn.status, "headers": out})
        more = True
        while more:
            chunk = await conn.read_chunk(self.config.timeout_s)
            more = bool(chunk) and not (conn.complete and not conn.chunks)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def fetch(
        self,
        upstream: Upstream,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        data: bytes | None,
        wait_s: float,
    ) -> int:
        """A whole exchange whose answer is dropped (a probe, a mirrored copy): its status."""
        body = Body.whole(data)
        conn = await self.exchange(upstream, method, target, headers, body, wait_s)
        try:
            while await conn.read_chunk(wait_s):
                pass
        finally:
            self.pool.release(upstream.host, upstream.port, conn)
        return conn.status

    def count(self, version: str, code: int) -> None:
        child = self.counted.get((version, code))
        if child is None:
            child = self.counted[(version, code)] = self.metrics.requests.labels(version, str(code))
        child.inc()

    def _mirror(
        self,
        upstream: Upstream,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        if not upstream.ready or len(self.mirroring) >= self.config.max_mirrors_in_flight:
            self.metrics.mirrors.labels(upstream.name, "dropped").inc()
            return
        marked = [*headers, (MIRROR_HEADER, self.mirror_secret)]

        async def copy() -> None:
            try:
                status = await self.fetch(
                    upstream, method, target, marked, body, self.config.timeout_s
                )
                outcome = "sent" if status < 500 else "failed"
            except UpstreamError:
                outcome = "failed"
            self.metrics.mirrors.labels(upstream.name, outcome).inc()

        task = asyncio.create_task(copy())
        self.mirroring.add(task)
        task.add_done_callback(self.mirroring.discard)

    async def _unavailable(
        self, send: Send, error: str, status: int = 503, version: str = ""
    ) -> None:
        self.count(version, status)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", self.retry_after),
                ],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps({"error": error}).encode()})


def is_mirror_copy(headers: list[tuple[bytes, bytes]], secret: bytes) -> bool:
    """Whether a request is the router's uncharged copy: it bears the exact secret."""
    if not secret:
        return False
    values = [v for k, v in headers if k == MIRROR_HEADER]
    return len(values) == 1 and hmac.compare_digest(values[0], secret)


def _split_headers(
    received: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], int | None, bool, bytes]:
    """In one pass: the headers passed upstream, the body's length if given, whether the
    body comes with a transfer coding instead (the server gives names in lower case), and
    its transfer codings if they are not `chunked` alone (the router sends only that)."""
    headers = []
    length = None
    codings: list[bytes] = []
    for k, v in received:
        if k not in NOT_FORWARDED:
            headers.append((k, v))
        elif k == b"content-length":
            length = int(v)  # digits: the server's parser refuses any other (400)
        elif k == b"transfer-encoding":
            codings += (c.strip().lower() for c in v.split(b","))
    other = b", ".join(codings) if codings and codings != [b"chunked"] else b""
    return headers, length, bool(codings) and length is None, other


def _async_request(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"prefer" and b"respond-async" in v.lower() for k, v in headers)


class Body:
    """A request's body: read whole (`data`) or streamed from the client as it is sent."""

    def __init__(self, receive: Receive | None, length: int | None, chunked: bool) -> None:
        self.receive = receive
        self.length = length  # the client's content-length
        self.chunked = chunked  # sent with a transfer coding, length unknown
        self.data: bytes | None = None

    @classmethod
    def whole(cls, data: bytes | None) -> Body:
        body = cls(None, None if data is None else len(data), False)
        body.data = data
        return body

    async def read_all(self) -> None:
        assert self.receive is not None
        parts = []
        while True:  # _stream's loop, without an asynchronous generator per request
            message: Message = await self.receive()
            if message["type"] != "http.request":
                raise ClientGone()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self.data = parts[0] if len(parts) == 1 else b"".join(parts)

    async def send(
        self,
        conn: Connection,
        method: str,
        target: bytes,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        wait_s: float,
    ) -> None:
        if self.data is not None:
            framing = b"content-length: %d" % len(self.data) if self.length is not None else b""
            conn.write(request_head(method, target, host, headers, framing) + self.data)
            return
        if self.length is None and not self.chunked:
            conn.write(request_head(method, target, host, headers, b""))
            return
        framing = b"transfer-encoding: chunked" if self.chunked else b"content-length: %d"
        if not self.chunked:
            framing %= self.length
        conn.write(request_head(method, target, host, headers, framing))
        assert self.receive is not None
        await send_body(conn, _stream(self.receive), self.chunked, wait_s)


async def _stream(receive: Receive) -> AsyncIterator[bytes]:
    """The client's body as it arrives; ClientGone if the client leaves before its end."""
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send(send: Send, status: int, content_type: str, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, status: int, error: str) -> None:
    await _send(send, status, "application/json", json.dumps({"error": error}).encode())


class _HeadHolder:
    """A client connection's transport that can hold an answer's head until the first part
    of its body, so that both leave in one write: one segment and one wake-up of the client
    instead of two (uvicorn writes them apart). Anything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._hold = False
        self._held = b""

    def hold(self) -> None:
        self._hold = True

    def write(self, data: bytes) -> None:
        if self._hold:
            self._hold, self._held = False, data
            return
        if self._held:
            data, self._held = self._held + data, b""
        self._transport.write(data)

    def flush(self) -> None:
        self._hold = False
        if self._held:
            data, self._held = self._held, b""
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def router_protocol(max_head: int, read_timeout: float) -> type[Any]:
    """The server's guarded HTTP protocol, its answers' heads held for their bodies."""
    from .server import guarded_protocol

    base: Any = guarded_protocol(max_head, read_timeout)

    class RouterHttpProtocol(base):
        _holding = False  # the request is held: its arrival clock does not run

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.transport = _HeadHolder(transport)
            self.gone = asyncio.Event()

        def holding(self, on: bool) -> None:
            """While the router holds the request, the read timeout (its arrival) stops:
            its body's rest is not read meanwhile. After, the body has the whole timeout."""
            self._holding = on
            if on:
                self._disarm()
            elif self._incomplete and not self.transport.is_closing():
                self._started = self.loop.time()
                self._arm()

        def _arm(self) -> None:
            if not self._holding:
                super()._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self.gone.set()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[HOLD_HEAD] = self.transport.hold
            self.scope[GONE] = self.gone
            self.scope[HOLDING] = self.holding

        def on_response_complete(self) -> None:
            self.transport.flush()  # a HEAD answer's head: no body follows
            super().on_response_complete()

    return RouterHttpProtocol


def serve_router(settings: ServeSettings) -> int:
    """`kubeonnx serve --role router --router-config FILE`."""
    from .errors import write_termination_message
    from .logs import configure_logging
    from .server import listen

    configure_logging(settings.log_level)
    try:
        if settings.router_config is None:
            raise FatalStartupError("role router needs --router-config (KUBEONNX_ROUTER_CONFIG)")
        config = load_config(settings.router_config)
        secret = settings.mirror_secret.get_secret_value() if settings.mirror_secret else None
        metrics = RouterMetrics(CollectorRegistry(), config.model)
        router = Router(config, metrics, secret, settings.metrics_port)
        sockets = [listen(settings.host, settings.port)]
        if settings.metrics_port is not None:
            sockets.append(listen(settings.host, settings.metrics_port))
    except FatalStartupError as exc:
        log.error("fatal: %s", exc)
        write_termination_message(settings.termination_log, str(exc))
        return 1
    config_ = uvicorn.Config(
        router,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,  # the upstream's Date passes through, not a second one
        timeout_graceful_shutdown=30,
        lifespan="on",
        http=router_protocol(settings.max_header_bytes, settings.read_timeout_s),
        limit_concurrency=settings.max_connections,
        loop="uvloop",
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info(
        "routing",
        extra={"port": settings.port, "versions": [(v.name, v.weight) for v in config.versions]},
    )
    RouterServer(config_, router).run(sockets=sockets)
    return 0


class RouterServer(uvicorn.Server):
    """uvicorn's server that, as it shuts down, answers the requests held at once (503 and
    Retry-After: the client tries again, another replica) instead of letting them wait out
    the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, router: Router) -> None:
        super().__init__(config)
        self.router = router

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        self.router.stopping.set()
        await super().shutdown(sockets)
