"""Prometheus metrics of the runtime, on a registry the caller owns."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ConstantLabels(Collector):
    """A collector that exposes another registry's series with labels added: the labels
    every series of this process carries (Prometheus's Go client calls them const labels)."""

    def __init__(self, inner: CollectorRegistry, labels: dict[str, str]) -> None:
        self.inner = inner
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [
                s._replace(labels={**s.labels, **self.labels}) for s in family.samples
            ]
            yield family


class DecisionCounter(Collector):
    """kubeonnx_quota_decisions_total, counted in a plain dict and read when scraped. Every
    quota decision counts one, on the request path, where a prometheus_client child's `inc`
    (a lock taken and released) cost about a tenth of the decision itself."""

    HELP = (
        "Quota decisions by tenant: admitted, refused, refunded (admitted, then not "
        "served), shadow_refused (counted, not refused), admitted_unchecked (Redis down, "
        "failureMode Open), unavailable (Redis down, failureMode Closed), unauthorized."
    )

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}

    def counter(self, model: str) -> Callable[[str, str], None]:
        """`count(tenant, decision)` for `model`'s decisions."""
        counts = self.counts

        def count(tenant: str, decision: str) -> None:
            key = (model, tenant, decision)
            counts[key] = counts.get(key, 0) + 1

        return count

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kubeonnx_quota_decisions", self.HELP, labels=("model", "tenant", "decision")
        )
        for labels, value in self.counts.copy().items():  # a copy: the loop counts meanwhile
            family.add_metric(labels, value)
        yield family


class RuntimeMetrics:
    """The runtime's metrics on `registry`; each series is labelled with the model's name
    (`model`) and its Open Inference Protocol version (`version`)."""

    def __init__(self, registry: CollectorRegistry, version: str = "1") -> None:
        self.registry = registry
        # The version is the same for every series of the process: added at collection,
        # so no call site (nor a metric added later) can leave it out.
        registry = CollectorRegistry()
        self.registry.register(ConstantLabels(registry, {"version": version}))
        self.requests = Counter(
            "kubeonnx_requests",
            "Inference requests answered, by model and HTTP status code.",
            ["model", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "kubeonnx_request_duration_seconds",
            "Inference request latency, queueing included.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "kubeonnx_batch_size",
            "Rows per model run after dynamic batching.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "kubeonnx_queue_depth",
            "Requests waiting for a model run.",
            ["model"],
            registry=registry,
        )
        self.inflight = Gauge(
            "kubeonnx_inflight_requests",
            "Inference requests being handled now (queued or running); KEDA scales on it.",
            ["model"],
            registry=registry,
        )
        self.download_bytes = Counter(
            "kubeonnx_model_download_bytes",
            "Bytes of model downloaded at start-up.",
            ["model"],
            registry=registry,
        )
        self.download_seconds = Gauge(
            "kubeonnx_model_download_seconds",
            "Seconds spent fetching and verifying the model.",
            ["model"],
            registry=registry,
        )
        self.quota_decisions = DecisionCounter()
        registry.register(self.quota_decisions)
        self.quota_refunds_lost = Counter(
            "kubeonnx_quota_refunds_lost",
            "Refunds that never reached the quota store (Redis unreachable, too slow, or too "
            "many in flight): those requests stay counted though not served.",
            ["model"],
            registry=registry,
        )
        self.quota_config_refused = Gauge(
            "kubeonnx_quota_config_refused",
            "1 while the last change to the quota configuration file was refused (invalid, or "
            "not matching the model: the reason is in the log) and the last good one stays in "
            "force; 0 once a change loads.",
            ["model"],
            registry=registry,
        )
        self.quota_redis_seconds = Histogram(
            "kubeonnx_quota_redis_seconds",
            "Round trips to the quota store (Redis), timeouts included.",
            ["model"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05),
            registry=registry,
        )
        self.ledger_written = Counter(
            "kubeonnx_ledger_written_rows",
            "Usage rows committed to the PostgreSQL ledger.",
            ["model"],
            registry=registry,
        )
        self.ledger_dropped = Counter(
            "kubeonnx_ledger_dropped_rows",
            "Usage rows dropped because the ledger was unreachable for too long.",
            ["model"],
            registry=registry,
        )
        self.ledger_pending = Gauge(
            "kubeonnx_ledger_pending_rows",
            "Usage rows waiting to be written to the ledger.",
            ["model"],
            registry=registry,
        )
        self.load_seconds = Gauge(
            "kubeonnx_model_load_seconds",
            "Seconds spent creating the inference session.",
            ["model"],
            registry=registry,
        )
        self.async_submitted = Counter(
            "kubeonnx_async_submitted",
            "Asynchronous requests queued (202 answered).",
            ["model"],
            registry=registry,
        )
        self.async_outcomes = Counter(
            "kubeonnx_async_outcomes",
            "Asynchronous requests processed by this replica, by outcome: done, failed (the "
            "request itself was refused), dead_lettered (after maxAttempts), retry (left "
            "pending for another attempt).",
            ["model", "outcome"],
            registry=registry,
        )
        self.async_submitted_bytes = Counter(
            "kubeonnx_async_submitted_bytes",
            "Bytes of asynchronous request bodies queued (as stored: inflated).",
            ["model"],
            registry=registry,
        )
        self.async_result_bytes = Counter(
            "kubeonnx_async_result_bytes",
            "Bytes of asynchronous results (and failed requests' messages) written by this "
            "replica.",
            ["model"],
            registry=registry,
        )
        self.async_callbacks = Counter(
            "kubeonnx_async_callbacks",
            "Callbacks by outcome: delivered, failed (after its tries, or a URL the client "
            "refuses), deferred (too many in flight: made when the request is claimed again).",
            ["model", "outcome"],
            registry=registry,
        )
        self.async_queue_length = Gauge(
            "kubeonnx_async_queue_length",
            "Entries in the asynchronous request stream (queued or being processed), as last "
            "seen by this replica.",
            ["model"],
            registry=registry,
        )
