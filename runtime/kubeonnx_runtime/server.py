"""`kubeonnx serve`: fetch and verify the model, load and warm it, then serve until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import httptools
import uvicorn
from prometheus_client import CollectorRegistry, disable_created_metrics
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import create_app
from .asyncinfer import AsyncKeys, AsyncStore, AsyncWorker
from .batching import Batcher
from .dataplane import DataPlane
from .errors import FatalStartupError, write_termination_message
from .fetch import S3Options, fetch_model
from .images import ImagePipeline, load_labels, load_processing
from .ledger import STOP_FLUSH_S, Ledger
from .logs import configure_logging
from .metrics import RuntimeMetrics
from .model import OnnxModel, cpu_quota_threads
from .quota import Quota, connect_redis, load_quota_config
from .settings import ServeSettings
from .tokens import check_token_input

log = logging.getLogger("kubeonnx.serve")

# Of the grace period, kept back from the drain and the requests in flight: the usage
# ledger's last write, its disconnect and its spill (STOP_FLUSH_S + 1 s + the file), and a
# margin for the process to end before the kubelet's SIGKILL.
LEDGER_RESERVE_S = STOP_FLUSH_S + 2.0
STOP_MARGIN_S = 2.0


def stop_budget(grace_s: float, drain_s: float) -> tuple[float, float]:
    """(drain, in flight): the seconds after SIGTERM spent answering not-ready, then those
    given to the requests in flight, such that both plus the ledger's reserve and the margin
    fit in the grace period."""
    room = max(grace_s - LEDGER_RESERVE_S - STOP_MARGIN_S, 2.0)
    drain = min(drain_s, room / 2)
    return drain, max(room - drain, 1.0)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM, answer not-ready for `drain_seconds` (so endpoints drop the pod),
    then stop accepting and let uvicorn finish the requests in flight. `stop_deadline` is
    when everything must be done (the grace period less a margin), from the first signal;
    `on_signal` is called then (in the signal handler: it may only schedule work)."""

    def __init__(
        self,
        config: uvicorn.Config,
        dataplane: DataPlane,
        drain_seconds: float,
        grace_s: float,
        on_signal: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.dataplane = dataplane
        self.drain_seconds = drain_seconds
        self.grace_s = grace_s
        self.on_signal = on_signal
        self.stop_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + self.grace_s - STOP_MARGIN_S
            self.on_signal()
        if self.dataplane.draining or self.drain_seconds <= 0:
            self.dataplane.draining = True
            super().handle_exit(sig, frame)
            return
        self.dataplane.draining = True
        log.info(
            "signal %s: not ready; closing in %.1fs", signal.Signals(sig).name, self.drain_seconds
        )
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, None))
        timer.daemon = True
        timer.start()


class _HeadTooLarge(Exception):
    pass


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits it lacks: a request head (request line
    and headers) of at most `max_head` bytes (431), and a request that arrives whole within
    `read_timeout` seconds of its first byte, a new connection's first request within that
    time of connecting (408). Either way the connection is closed: a slow or endless client
    holds neither memory nor the event loop for long.

    The head is counted before the parser sees it, because httptools gathers a header by
    concatenation, which takes seconds on a header of tens of megabytes. A chunked body's
    trailer fields are dropped: they are not headers (RFC 9110 6.5.1)."""

    max_head = 64 * 1024
    read_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # waiting for (the rest of) a request line and headers
        self._head_bytes = 0
        self._incomplete = True  # a request (or a first one) is on its way
        self._started = self.loop.time()
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, a chunked body's trailer fields: uvicorn appends them to the
        # request's headers, where they would name a tenant, a version or a mirror copy.
        # They are not headers (RFC 9110 6.5.1) and nothing here uses them: dropped.
        if self._in_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        # What arrived while reading the head bounds its size from above; only a request
        # that may be over the limit pays for measuring it.
        if self._head_bytes > self.max_head and self._head_size() > self.max_head:
            raise _HeadTooLarge()
        super().on_headers_complete()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._incomplete = True, 0, False
        if self._deadline is not None:
            self._disarm()
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with the head counted and its limit enforced.
        self._unset_keepalive_if_required()
        if not self._incomplete:  # the first bytes of the next request on this connection
            self._incomplete, self._started = True, self.loop.time()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):  # raised by on_headers_complete
                self._head_too_large()
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and self._head_bytes > self.max_head:
            self._head_too_large()
        elif self._incomplete and self._deadline is None:
            # Only a request that did not arrive in one read costs a timer.
            self._arm()

    def _head_too_large(self) -> None:
        self._refuse(
            431,
            b"Request Header Fields Too Large",
            f"the request line and headers are over the limit of {self.max_head} bytes",
        )

    def _arm(self) -> None:
        self._deadline = self.loop.call_at(self._started + self.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._incomplete and not self.transport.is_closing():
            self._refuse(
                408,
                b"Request Timeout",
                f"the request did not arrive whole within {self.read_timeout:g} seconds",
            )

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        log.info("connection closed: %s", message, extra={"status": status})
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()
        self._incomplete = False


def guarded_protocol(max_head: int, read_timeout: float) -> type[GuardedHttpProtocol]:
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {"max_head": max_head, "read_timeout": read_timeout},
    )


def listen(host: str, port: int) -> socket.socket:
    """Bind the port before the model is fetched: a port in use fails at once, with a
    termination message, not after a long download."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FatalStartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def make_quota(settings: ServeSettings, metrics: RuntimeMetrics) -> Quota | None:
    """The quota policy the mounted configuration describes, if any (FatalStartupError if
    the file is unreadable or invalid)."""
    if settings.quota_config is None:
        return None
    config = load_quota_config(settings.quota_config)
    client = connect_redis(config.redis, os.environ) if config.redis else None
    label = settings.model_name
    refused_gauge = metrics.quota_config_refused.labels(label)
    refused_gauge.set(0)  # the series exists from the start: an alert sees it change
    log.info(
        "quota policy",
        extra={
            "policy": config.policy,
            "tenants": len(config.tenants),
            "store": "redis" if client else "memory (per replica)",
            "failure_mode": config.failure_mode,
            "shadow": config.shadow,
        },
    )
    return Quota(
        config,
        redis_client=client,
        on_decision=metrics.quota_decisions.counter(label),
        on_redis_seconds=metrics.quota_redis_seconds.labels(label).observe,
        on_refund_lost=metrics.quota_refunds_lost.labels(label).inc,
        on_reload=lambda refused: refused_gauge.set(1 if refused else 0),
    )


def make_ledger(
    settings: ServeSettings, quota: Quota | None, metrics: RuntimeMetrics
) -> Ledger | None:
    """The usage ledger the quota configuration asks for, if any."""
    if quota is None or quota.config.ledger is None:
        return None
    variable = quota.config.ledger.dsn_env
    dsn = os.environ.get(variable)
    if not dsn:
        raise FatalStartupError(f"the quota policy's ledger needs {variable}, which is not set")
    label = settings.model_name
    ledger = Ledger(
        dsn,
        policy=quota.config.policy,
        model=label,
        on_written=metrics.ledger_written.labels(label).inc,
        on_dropped=metrics.ledger_dropped.labels(label).inc,
        spill_dir=settings.ledger_spill_dir or settings.cache_dir / "ledger",
    )
    metrics.ledger_pending.labels(label).set_function(lambda: ledger.pending)
    return ledger


def async_client(settings: ServeSettings) -> Any:
    """The Redis client of the asynchronous queue (it connects on first use)."""
    import redis.asyncio as aioredis

    assert settings.async_redis_url is not None
    password = settings.async_redis_password
    return aioredis.Redis.from_url(
        settings.async_redis_url,
        password=password.get_secret_value() if password else None,
        socket_connect_timeout=2.0,
        # Above XREADGROUP's 1 s block: a read that waits for entries is not a dead socket.
        socket_timeout=10.0,
        health_check_interval=15,
    )


def async_keys(settings: ServeSettings) -> AsyncKeys:
    return AsyncKeys(settings.async_prefix or f"kubeonnx:{{{settings.model_name}}}")


def load(settings: ServeSettings, metrics: RuntimeMetrics) -> OnnxModel:
    label = settings.model_name
    assert settings.model_uri is not None
    fetched = fetch_model(
        settings.model_uri,
        settings.cache_dir,
        sha256=settings.model_sha256,
        s3=S3Options(endpoint=settings.s3_endpoint, region=settings.s3_region),
    )
    metrics.download_bytes.labels(label).inc(fetched.downloaded_bytes)
    metrics.download_seconds.labels(label).set(fetched.seconds)
    log.info(
        "model fetched",
        extra={
            "uri": settings.model_uri,
            "sha256": fetched.sha256,
            "bytes": fetched.size,
            "downloaded_bytes": fetched.downloaded_bytes,
            "seconds": round(fetched.seconds, 3),
        },
    )
    model = OnnxModel(
        fetched.path,
        device=settings.device,
        threads=settings.threads,
        spin=settings.processing is None,  # images are decoded on the same CPUs
    )
    metrics.load_seconds.labels(label).set(model.load_seconds)
    model.warm_up()
    log.info(
        "model loaded",
        extra={
            "device": model.device,
            "threads": model.threads,
            "batchable": model.batchable,
            "inputs": [t.metadata() for t in model.inputs],
            "outputs": [t.metadata() for t in model.outputs],
        },
    )
    return model


def serve(settings: ServeSettings) -> int:
    if settings.role == "router":
        from .router import serve_router

        return serve_router(settings)
    configure_logging(settings.log_level)
    disable_created_metrics()
    metrics = RuntimeMetrics(CollectorRegistry(), settings.model_version)
    model: OnnxModel | None = None
    images: ImagePipeline | None = None
    try:
        if settings.model_uri is None:
            raise FatalStartupError(f"role {settings.role} needs --model-uri (KUBEONNX_MODEL_URI)")
        sockets = [listen(settings.host, settings.port)]
        if settings.metrics_port is not None:
            sockets.append(listen(settings.host, settings.metrics_port))
        quota = make_quota(settings, metrics)
        ledger = make_ledger(settings, quota, metrics)
        if settings.role == "gateway":
            if settings.async_redis_url is None:
                raise FatalStartupError(
                    "role gateway takes asynchronous requests only, and no queue is set "
                    "(KUBEONNX_ASYNC_REDIS_URL)"
                )
        else:
            model = load(settings, metrics)
            if quota is not None:
                # The input tokens are counted in is the model's, and an integer one; a
                # reloaded configuration is held to the same (or not taken).
                check_token_input(quota.config, model.inputs)
                inputs = model.inputs
                quota.check_config = lambda config: check_token_input(config, inputs)
            if settings.processing:
                labels = load_labels(settings.labels_file) if settings.labels_file else None
                images = ImagePipeline(
                    load_processing(settings.processing),
                    model.inputs,
                    model.outputs,
                    labels,
                    max_scans=settings.max_jpeg_scans,
                )
    except FatalStartupError as exc:
        log.error("fatal: %s", exc)
        write_termination_message(settings.termination_log, str(exc))
        return 1
    except Exception as exc:  # unforeseen: still one line for the operator's status
        log.exception("fatal: start-up failed")
        write_termination_message(
            settings.termination_log, f"start-up failed: {type(exc).__name__}: {exc}"
        )
        return 1

    label = settings.model_name
    batcher: Batcher | None = None
    if model is not None:
        batch_sizes = metrics.batch_size.labels(label)
        queue_depth = metrics.queue_depth.labels(label)
        batcher = Batcher(
            model.run,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            max_queue=settings.max_queue,
            batchable=model.batchable,
            on_batch=batch_sizes.observe,
            on_queue_depth=queue_depth.set,
        )
    dataplane = DataPlane(
        model,
        batcher,
        name=settings.model_name,
        version=settings.model_version,
        max_json_bytes=settings.max_json_bytes,
    )
    tasks: list[asyncio.Task[None]] = []
    consuming: list[asyncio.Task[None]] = []
    jobs: AsyncStore | None = None
    worker: AsyncWorker | None = None
    loops: list[asyncio.AbstractEventLoop] = []
    if settings.async_redis_url is not None:
        client = async_client(settings)
        keys = async_keys(settings)
        callback_hosts = [h.strip() for h in settings.async_callback_hosts.split(",") if h.strip()]
        jobs = AsyncStore(
            client,
            keys,
            max_queued=settings.async_max_queued,
            max_entry_bytes=settings.async_max_entry_bytes,
            max_queued_bytes=settings.async_max_queued_bytes,
            callback_hosts=callback_hosts,
        )
        if batcher is not None:
            # Enough requests in flight for full batches, never more than the batcher queues.
            concurrency = settings.async_concurrency or max(4, 2 * batcher.max_batch_size)
            worker = AsyncWorker(
                client,
                keys,
                decode=dataplane.decode,
                infer=dataplane.infer,
                model_name=settings.model_name,
                model_version=settings.model_version,
                max_attempts=settings.async_max_attempts,
                result_ttl_s=settings.async_result_ttl_s,
                claim_after_s=settings.async_claim_after_s,
                concurrency=min(concurrency, max(1, settings.max_queue // 2)),
                max_result_bytes=settings.async_max_result_bytes,
                dead_letter_max=settings.async_dead_letter_max_length,
                dead_letter_max_bytes=settings.async_dead_letter_max_bytes,
                max_callbacks=settings.async_max_callbacks,
                callback_hosts=callback_hosts,
                on_outcome=lambda outcome: metrics.async_outcomes.labels(label, outcome).inc(),
                on_queue_length=metrics.async_queue_length.labels(label).set,
                on_result_bytes=metrics.async_result_bytes.labels(label).inc,
                on_callback=lambda outcome: metrics.async_callbacks.labels(label, outcome).inc(),
            )
        log.info(
            "asynchronous queue",
            extra={
                "stream": keys.stream,
                "role": "consume and submit" if worker else "submit only",
                "max_attempts": settings.async_max_attempts,
                "claim_after_s": settings.async_claim_after_s,
            },
        )

    async def start_tasks() -> None:
        loops.append(asyncio.get_running_loop())
        if quota is not None and settings.quota_config is not None:
            tasks.append(
                asyncio.create_task(quota.follow(settings.quota_config, settings.quota_reload_s))
            )
        if ledger is not None:
            tasks.append(asyncio.create_task(ledger.run()))
        if worker is not None:
            consuming.append(asyncio.create_task(worker.run(), name="async-worker"))

    drain_s, in_flight_s = stop_budget(settings.grace_seconds, settings.drain_seconds)

    def left_s() -> float:
        """Seconds until the stop deadline (the whole grace period if no signal came)."""
        deadline = server.stop_deadline
        if deadline is None:
            return settings.grace_seconds - STOP_MARGIN_S
        return deadline - time.monotonic()

    def stop_consuming() -> None:
        """At the first signal, not after the HTTP drain: the worker takes no new entries
        while the pod drains, and answers those in hand within the same stop budget."""
        if worker is not None and loops:
            loops[0].call_soon_threadsafe(worker.stop)

    async def stop_tasks() -> None:
        if worker is not None:
            worker.stop()  # if no signal came: requests in flight are answered, the rest stay
            await asyncio.wait(consuming, timeout=max(left_s() - LEDGER_RESERVE_S, 0.5))
            for task in consuming:
                task.cancel()
            await asyncio.gather(*consuming, return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none still writing
        if quota is not None:
            await quota.drain()  # refunds in flight reach Redis
        if ledger is not None:
            # What is pending, written or spilled before the deadline, whatever came before.
            await ledger.close(flush_s=min(STOP_FLUSH_S, max(left_s() - 2.0, 0.5)))

    app = create_app(
        dataplane,
        metrics,
        on_startup=start_tasks,
        on_shutdown=stop_tasks,
        route_prefix=settings.route_prefix,
        max_body=settings.max_request_bytes,
        quota=quota,
        ledger=ledger,
        jobs=jobs,
        images=images,
        max_images=settings.max_images_per_request,
        image_threads=cpu_quota_threads(),
        metrics_port=settings.metrics_port,
        max_decode_bytes=settings.max_decode_bytes,
        mirror_secret=settings.mirror_secret.get_secret_value().encode()
        if settings.mirror_secret
        else b"",
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # Nothing here reads the client address, so X-Forwarded-* parsing on every request
        # (2% of the event loop in a profile) buys nothing; nor does advertising uvicorn.
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=round(in_flight_s),
        lifespan="on",
        http=guarded_protocol(settings.max_header_bytes, settings.read_timeout_s),
        limit_concurrency=settings.max_connections,
        loop="uvloop",
    )
    server = DrainingServer(
        config, dataplane, drain_s, settings.grace_seconds, on_signal=stop_consuming
    )
    # uvicorn re-raises the signal it caught once it has shut down; after a graceful
    # shutdown that signal should end the process with status 0, not kill it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    frozen = freeze_startup_heap()
    log.info(
        "serving",
        extra={"model": settings.model_name, "port": settings.port, "frozen_objects": frozen},
    )
    server.run(sockets=sockets)
    return 0


def freeze_startup_heap() -> int:
    """Leave what start-up made (modules, the model's session, the app) out of every later
    collection: a full collection otherwise walks all of it, with the GIL held, stalling
    every request in flight (195 to 390 ms under load in docs/performance.md's profile).
    What start-up left as garbage is collected first. Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
