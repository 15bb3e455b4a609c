"""The router role: one model's Open Inference Protocol requests split between versions.

The router serves no model. Each request goes to one version's upstream (a Service of that
version's replicas), chosen in this order: the version in the path (`/versions/V/`), the
pin header (`X-Model-Version`), the tenant's version when sticky (the API key's hash placed
in the weights), else smooth weighted round-robin, which is exact: over any `sum(weights)`
consecutive requests each version gets exactly its weight. Only versions whose upstream
answers its readiness probe take traffic; the weights are shared among those. A connection
refused by an upstream marks it not ready and the request goes to another version (nothing
was sent, so this is safe for any method).

A version with `mirror_percent` gets that share of the inference requests copied to it as
well, exactly counted the same way; its answers are dropped. A copy is made only for a body
of known length up to `mirror_max_body_bytes`, is sent after the client's request is
forwarded, is never awaited by it, and is dropped (counted) when `max_mirrors_in_flight`
copies are already in flight or the target is not ready. A copy carries the header
`X-Kubeonnx-Mirror` with the mirror secret; an upstream given the same secret charges no
quota for it. The router removes that header from every client request, so a client
cannot make its request pass for a copy, and the secret never leaves the router and the
upstreams.

The router charges nothing: the upstream version that answers charges the request once,
and its quota headers come back unchanged. Bodies stream both ways (a mirrored body is
held, up to its bound, to be sent twice); hop-by-hop headers are not passed on.
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
import socket
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import uvicorn
from httpx._transports.default import map_httpcore_exceptions
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
from .settings import VERSION_PATTERN, ServeSettings

log = logging.getLogger(__name__)

MIRROR_HEADER = b"x-kubeonnx-mirror"
SMALL_BODY = 64 * 1024  # bodies up to this are read whole; larger ones stream
VERSION_IN_PATH = re.compile(r"/v2/models/[^/]+/versions/([^/]+)(?:/|$)")
MIRRORED_PATH = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/(?:infer|predict|predict/batch)$")
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


class RouterConfig(BaseModel):
    """The router's configuration file (JSON, or YAML): the runtime contract of the role."""

    model_config = ConfigDict(extra="forbid")

    versions: list[VersionConfig] = Field(min_length=1, max_length=8)
    sticky: bool = Field(False, description="one tenant (API key) always reaches one version")
    pin_header: str = Field("X-Model-Version", min_length=1)
    tenant_header: str = Field("Authorization", min_length=1, description="the API key")
    probe_interval_s: float = Field(1.0, gt=0, le=60)
    probe_timeout_s: float = Field(1.0, gt=0, le=60)
    connect_timeout_s: float = Field(5.0, gt=0, le=60)
    timeout_s: float = Field(60.0, gt=0, description="longest wait for each read or write")
    max_mirrors_in_flight: int = Field(64, ge=1, le=10000)
    mirror_max_body_bytes: int = Field(4 * 1024 * 1024, ge=0)

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
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "kubeonnx_router_requests",
            "Requests the router answered, by version sent to and status code",
            ["version", "code"],
            registry=registry,
        )
        self.mirrors = Counter(
            "kubeonnx_router_mirrors",
            "Mirrored copies by target version and outcome (sent, dropped, failed)",
            ["version", "outcome"],
            registry=registry,
        )
        self.ready = Gauge(
            "kubeonnx_router_upstream_ready",
            "1 while the version's upstream answers its readiness probe",
            ["version"],
            registry=registry,
        )


class Upstream:
    def __init__(self, config: VersionConfig) -> None:
        self.name = config.name
        self.url = config.url.rstrip("/")
        self.weight = config.weight
        self.mirror_percent = config.mirror_percent
        self.ready = False
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


class LeanPool(httpx.AsyncBaseTransport):
    """Idle HTTP/1.1 connections per upstream, taken and given back in constant time.
    httpcore's own pool scans every connection for every waiting request: at concurrency
    64 that was most of the router's CPU in a profile. Plain http:// upstreams only (the
    versions' Services)."""

    def __init__(self, max_idle: int = 512) -> None:
        self._idle: dict[tuple[bytes, bytes, int], list[httpcore.AsyncHTTPConnection]] = {}
        self._max_idle = max_idle
        # Headers and body are separate writes: without NODELAY, Nagle holds the body
        # until the upstream's delayed ACK of the headers.
        self._options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port or 80)
        idle = self._idle.setdefault(key, [])
        conn = None
        while idle:
            candidate = idle.pop()
            if candidate.is_idle() and not candidate.has_expired():
                conn = candidate
                break
            await candidate.aclose()
        if conn is None:
            conn = httpcore.AsyncHTTPConnection(httpcore.Origin(*key), socket_options=self._options)
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=key[0], host=key[1], port=key[2], target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with map_httpcore_exceptions():
            try:
                answer = await conn.handle_async_request(core)
            except BaseException:
                await conn.aclose()
                raise
        assert isinstance(answer.stream, AsyncIterable)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_GiveBack(answer.stream, conn, idle, self._max_idle),
            extensions=answer.extensions,
        )

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                await conn.aclose()
        self._idle.clear()


class _GiveBack(httpx.AsyncByteStream):
    """An answer's body; closed, its connection goes back to the idle ones if reusable."""

    def __init__(
        self,
        stream: AsyncIterable[bytes],
        conn: httpcore.AsyncHTTPConnection,
        idle: list[httpcore.AsyncHTTPConnection],
        max_idle: int,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._idle = idle
        self._max_idle = max_idle

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_httpcore_exceptions():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()
        if self._conn.is_idle() and len(self._idle) < self._max_idle:
            self._idle.append(self._conn)
        else:
            await self._conn.aclose()


class Router:
    """The ASGI app of the router role."""

    def __init__(
        self,
        config: RouterConfig,
        metrics: RouterMetrics,
        mirror_secret: str | None,
        metrics_port: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
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
        self.pin_header = config.pin_header.lower().encode()
        self.tenant_header = config.tenant_header.lower().encode()
        self.retry_after = str(max(1, math.ceil(config.probe_interval_s))).encode()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                config.timeout_s, connect=config.connect_timeout_s, pool=config.connect_timeout_s
            ),
            transport=transport or LeanPool(),
        )
        self.mirroring: set[asyncio.Task[None]] = set()
        self.probes: list[asyncio.Task[None]] = []
        for u in self.upstreams:
            metrics.ready.labels(u.name).set(0)

    # -- readiness -------------------------------------------------------------------------

    def set_ready(self, upstream: Upstream, ready: bool) -> None:
        if ready != upstream.ready:
            log.info(
                "upstream %s", "ready" if ready else "not ready", extra={"version": upstream.name}
            )
        upstream.ready = ready
        self.metrics.ready.labels(upstream.name).set(1 if ready else 0)

    async def probe(self, upstream: Upstream) -> None:
        while True:
            try:
                r = await self.client.get(
                    f"{upstream.url}/v2/health/ready", timeout=self.config.probe_timeout_s
                )
                self.set_ready(upstream, r.status_code == 200)
            except httpx.HTTPError:
                self.set_ready(upstream, False)
            await asyncio.sleep(self.config.probe_interval_s)

    async def start(self) -> None:
        self.probes = [asyncio.create_task(self.probe(u)) for u in self.upstreams]

    async def stop(self) -> None:
        for task in [*self.probes, *self.mirroring]:
            task.cancel()
        await asyncio.gather(*self.probes, *self.mirroring, return_exceptions=True)
        await self.client.aclose()

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

    def choose(self, path: str, headers: list[tuple[bytes, bytes]]) -> Upstream | str:
        """The upstream, or why none (an error message; 404 for an unknown pin)."""
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
                return f"model version '{pinned}' is not served here; versions: {served}"
            return upstream
        if self.config.sticky and tenant:
            picked = self.picker.sticky(tenant)
        else:
            picked = self.picker.weighted()
        return picked if picked is not None else ""

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        headers = [
            (k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP and k != MIRROR_HEADER
        ]
        chosen = self.choose(path, headers)
        if isinstance(chosen, str):
            if chosen:
                self.metrics.requests.labels("", "404").inc()
                await _send_error(send, 404, chosen)
            else:
                await self._unavailable(send, "no version of the model is ready")
            return
        pinned = VERSION_IN_PATH.search(path) is not None or any(
            k == self.pin_header for k, _ in headers
        )
        if not chosen.ready:
            await self._unavailable(send, f"model version '{chosen.name}' is not ready")
            return
        target = scope.get("raw_path") or path.encode()
        query = scope.get("query_string") or b""
        url = (
            chosen.url
            + target.decode("latin-1")
            + (("?" + query.decode("latin-1")) if query else "")
        )
        method: str = scope["method"]
        mirrors = self.picker.mirrors() if method == "POST" and MIRRORED_PATH.search(path) else []
        body: bytes | None = None
        length = _content_length(headers)
        if length is not None and length <= SMALL_BODY:
            body = await _read_all(receive, length)  # one write upstream, not a stream
        if mirrors:
            if _async_request(headers) or length is None:
                mirrors_ok = False
            elif body is None and length <= self.config.mirror_max_body_bytes:
                body = await _read_all(receive, length)
                mirrors_ok = True
            else:
                mirrors_ok = body is not None
            if not mirrors_ok:
                for m in mirrors:
                    self.metrics.mirrors.labels(m.name, "dropped").inc()
                mirrors = []
        tried: set[str] = set()
        while True:
            request = self.client.build_request(
                method,
                url,
                headers=headers,
                content=body if body is not None else _stream(receive),
            )
            try:
                response = await self.client.send(request, stream=True)
                break
            except httpx.ConnectError:
                # Nothing reached the upstream: it is gone; another version takes the request.
                self.set_ready(chosen, False)
                tried.add(chosen.name)
                again = None if pinned else self.picker.weighted(exclude=tried)
                if again is None:
                    await self._unavailable(
                        send, f"model version '{chosen.name}' is unreachable", 502
                    )
                    return
                chosen = again
                url = (
                    chosen.url
                    + target.decode("latin-1")
                    + (("?" + query.decode("latin-1")) if query else "")
                )
            except httpx.TimeoutException:
                self.metrics.requests.labels(chosen.name, "504").inc()
                await _send_error(
                    send, 504, f"model version '{chosen.name}' did not answer in time"
                )
                return
            except httpx.HTTPError as exc:
                # The upstream dropped the connection (killed?): no more traffic to it until
                # its probe says it is ready again.
                self.set_ready(chosen, False)
                self.metrics.requests.labels(chosen.name, "502").inc()
                await _send_error(
                    send, 502, f"model version '{chosen.name}' failed: {type(exc).__name__}"
                )
                return
        for m in mirrors:
            self._mirror(m, method, target, query, headers, body or b"")
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError:
            log.warning("upstream answer cut", extra={"version": chosen.name})  # started already
        finally:
            await response.aclose()
        self.metrics.requests.labels(chosen.name, str(response.status_code)).inc()

    def _mirror(
        self,
        upstream: Upstream,
        method: str,
        target: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        if not upstream.ready or len(self.mirroring) >= self.config.max_mirrors_in_flight:
            self.metrics.mirrors.labels(upstream.name, "dropped").inc()
            return
        url = (
            upstream.url
            + target.decode("latin-1")
            + (("?" + query.decode("latin-1")) if query else "")
        )
        marked = [*headers, (MIRROR_HEADER, self.mirror_secret)]

        async def copy() -> None:
            try:
                r = await self.client.request(method, url, headers=marked, content=body)
                outcome = "sent" if r.status_code < 500 else "failed"
            except httpx.HTTPError:
                outcome = "failed"
            self.metrics.mirrors.labels(upstream.name, outcome).inc()

        task = asyncio.create_task(copy())
        self.mirroring.add(task)
        task.add_done_callback(self.mirroring.discard)

    async def _unavailable(self, send: Send, error: str, status: int = 503) -> None:
        self.metrics.requests.labels("", str(status)).inc()
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


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k.lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return int(v)
    return None


def _async_request(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"prefer" and b"respond-async" in v.lower() for k, v in headers)


async def _stream(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _read_all(receive: Receive, length: int) -> bytes:
    parts = [chunk async for chunk in _stream(receive)]
    return b"".join(parts)


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


def serve_router(settings: ServeSettings) -> int:
    """`kubeonnx serve --role router --router-config FILE`."""
    from .errors import write_termination_message
    from .logs import configure_logging
    from .server import guarded_protocol, listen

    configure_logging(settings.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per proxied request
    try:
        if settings.router_config is None:
            raise FatalStartupError("role router needs --router-config (KUBEONNX_ROUTER_CONFIG)")
        config = load_config(settings.router_config)
        secret = settings.mirror_secret.get_secret_value() if settings.mirror_secret else None
        router = Router(config, RouterMetrics(CollectorRegistry()), secret, settings.metrics_port)
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
        http=guarded_protocol(settings.max_header_bytes, settings.read_timeout_s),
        limit_concurrency=settings.max_connections,
        loop="uvloop",
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info(
        "routing",
        extra={"port": settings.port, "versions": [(v.name, v.weight) for v in config.versions]},
    )
    uvicorn.Server(config_).run(sockets=sockets)
    return 0
