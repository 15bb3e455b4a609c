"""The Service in front of the runtime pods."""

from __future__ import annotations

from typing import Any

from .model import SERVICE_PORT, Model


def render_service(model: Model) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": model.metadata(),
        "spec": {
            "type": "ClusterIP",
            "selector": model.selector,
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
