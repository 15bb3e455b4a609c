"""A PodMonitor (Prometheus operator) for the runtime's /metrics, on the pods' metrics port
(which no Service carries): the KEDA trigger and the dashboards read the in-flight gauge
from there. Rendered only where the CRD exists; the prometheus.io/* pod annotations serve a
Prometheus configured to honour them."""

from __future__ import annotations

from typing import Any

from .model import Model


def render_pod_monitor(model: Model) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": model.metadata(),
        "spec": {
            "selector": {"matchLabels": model.selector},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }
