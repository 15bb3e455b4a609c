"""`kubeonnx serve`: fetch and verify the model, load and warm it, then serve until SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn
from prometheus_client import CollectorRegistry, disable_created_metrics

from .app import create_app
from .batching import Batcher
from .dataplane import DataPlane
from .errors import FatalStartupError, write_termination_message
from .fetch import S3Options, fetch_model
from .logs import configure_logging
from .metrics import RuntimeMetrics
from .model import OnnxModel
from .settings import ServeSettings

log = logging.getLogger("kubeonnx.serve")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM, answer not-ready for `drain_seconds` (so endpoints drop the pod),
    then stop accepting and let uvicorn finish the requests in flight."""

    def __init__(self, config: uvicorn.Config, dataplane: DataPlane, drain_seconds: float) -> None:
        super().__init__(config)
        self.dataplane = dataplane
        self.drain_seconds = drain_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
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


def load(settings: ServeSettings, metrics: RuntimeMetrics) -> OnnxModel:
    label = settings.model_name
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
    model = OnnxModel(fetched.path, device=settings.device, threads=settings.threads)
    metrics.load_seconds.labels(label).set(model.load_seconds)
    try:
        model.warm_up()
    except Exception as exc:
        raise FatalStartupError(f"model warm-up run failed: {exc}") from None
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
    configure_logging(settings.log_level)
    disable_created_metrics()
    metrics = RuntimeMetrics(CollectorRegistry())
    try:
        model = load(settings, metrics)
    except FatalStartupError as exc:
        log.error("fatal: %s", exc)
        write_termination_message(settings.termination_log, str(exc))
        return 1

    label = settings.model_name
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
    dataplane = DataPlane(model, batcher, name=settings.model_name, version=settings.model_version)
    app = create_app(dataplane, metrics, route_prefix=settings.route_prefix)
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
        timeout_graceful_shutdown=30,
        lifespan="on",
        http="httptools",
        loop="uvloop",
    )
    server = DrainingServer(config, dataplane, settings.drain_seconds)
    # uvicorn re-raises the signal it caught once it has shut down; after a graceful
    # shutdown that signal should end the process with status 0, not kill it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("serving", extra={"model": settings.model_name, "port": settings.port})
    server.run()
    return 0
