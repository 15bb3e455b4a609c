"""The Ingress: a path prefix on a shared host, routed to the Service with no rewrite.

The runtime serves both `/v2/...` and `<prefix>/v2/...` (KUBEONNX_ROUTE_PREFIX), so no
controller-specific rewrite annotation is needed and the in-cluster URL keeps working.
"""

from __future__ import annotations

from typing import Any

from ..config import OperatorConfig
from .model import Model


def render_ingress(model: Model, config: OperatorConfig) -> dict[str, Any]:
    ing = model.spec.ingress
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": ing.host,
                "http": {
                    "paths": [
                        {
                            "path": model.route_path,
                            "pathType": "Prefix",
                            "backend": {"service": {"name": model.name, "port": {"name": "http"}}},
                        }
                    ]
                },
            }
        ]
    }
    class_name = ing.class_name or config.ingress_class
    if class_name:
        spec["ingressClassName"] = class_name
    if ing.tls_secret:
        spec["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": model.metadata(),
        "spec": spec,
    }
