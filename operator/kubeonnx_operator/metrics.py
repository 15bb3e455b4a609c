"""The operator's own metrics (on the health port's /metrics) and its health endpoints.

/healthz answers 200 while the event loop runs and every background task (the watches, the
elector, the resync) still runs, 500 once one has ended (liveness: the kubelet restarts
the process); /readyz answers 200 once every
watch has listed its kind (readiness), on the leader and on a standby alike, so that a
standby counts as available and a rollout of the operator does not wait on the lease.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()

RECONCILES = Counter(
    "kubeonnx_operator_reconciles_total",
    "Reconciles run, by kind and result (ok, error).",
    ["kind", "result"],
)
RECONCILE_SECONDS = Histogram(
    "kubeonnx_operator_reconcile_duration_seconds",
    "How long one reconcile took.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_DEPTH = Gauge(
    "kubeonnx_operator_queue_depth",
    "Objects being reconciled (or waiting for a slot) or waiting for a retry.",
    ["kind"],
)
WATCHED = Gauge(
    "kubeonnx_operator_watched_objects", "Objects in the watch caches, by resource.", ["resource"]
)
RELISTS = Counter(
    "kubeonnx_operator_relists_total",
    "Watches that expired or broke and listed their kind again.",
    ["resource"],
)
API_WRITES = Counter(
    "kubeonnx_operator_api_writes_total",
    "Writes sent to the API server (apply, delete, status, event).",
    ["verb"],
)
API_READS = Counter(
    "kubeonnx_operator_api_reads_total",
    "Reads sent to the API server outside the watches (get: one object by name), by kind.",
    ["verb", "kind"],
)
API_ERRORS = Counter(
    "kubeonnx_operator_api_errors_total", "API calls refused or failed, by HTTP code.", ["code"]
)
LEADER = Gauge("kubeonnx_operator_leader", "1 while this replica holds the leader Lease.")
MODEL_READY = Gauge(
    "kubeonnx_operator_model_ready",
    "1 while an InferenceModel is Ready (its Ready condition True), else 0; the condition's "
    "reason in `reason` (one series per model). Written by the leader: a standby's series "
    "are as it last reconciled.",
    ["namespace", "model", "reason"],
)
_model_reasons: dict[tuple[str, str], str] = {}


def set_model_ready(namespace: str, model: str, ready: bool, reason: str) -> None:
    """The model's Ready condition, as last reported; a changed reason replaces its series."""
    before = _model_reasons.get((namespace, model))
    if before is not None and before != reason:
        MODEL_READY.remove(namespace, model, before)
    _model_reasons[(namespace, model)] = reason
    MODEL_READY.labels(namespace, model, reason).set(1 if ready else 0)


def forget_model(namespace: str, model: str) -> None:
    """A deleted model's series goes with it."""
    before = _model_reasons.pop((namespace, model), None)
    if before is not None:
        MODEL_READY.remove(namespace, model, before)


EVENTS = Counter(
    "kubeonnx_operator_events_total",
    "Kubernetes Events posted, by type and reason.",
    ["type", "reason"],
)


def health_app(
    ready: Callable[[], str | None], alive: Callable[[], str | None] = lambda: None
) -> web.Application:
    """`ready()` returns None when ready, else what is still awaited; `alive()` None while
    the process works, else what broke."""

    async def healthz(_: web.Request) -> web.Response:
        broken = alive()
        if broken is None:
            return web.Response(text="ok\n")
        return web.Response(status=500, text=f"broken: {broken}\n")

    async def readyz(_: web.Request) -> web.Response:
        waiting = ready()
        if waiting is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"not ready: {waiting}\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_health(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # probes come from the kubelet
    return runner
