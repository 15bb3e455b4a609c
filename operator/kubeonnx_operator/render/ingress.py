"""The Ingress: a path prefix on a shared host, routed to the Service with no rewrite.

The runtime serves both `/v2/...` and `<prefix>/v2/...` (KUBEONNX_ROUTE_PREFIX), so no
controller-specific rewrite annotation is needed and the in-cluster URL keeps working.
"""

from __future__ import annotations

from typing import Any

from ..config import OperatorConfig
from .model import Model


def _path(path: str, service: str) -> dict[str, Any]:
    return {
        "path": path,
        "pathType": "Prefix",
        "backend": {"service": {"name": service, "port": {"name": "http"}}},
    }


def render_ingress(model: Model, config: OperatorConfig) -> dict[str, Any]:
    ing = model.spec.ingress
    paths = [_path(model.route_path, model.name)]
    if model.spec.async_.enabled:
        # Submissions and their status go to the gateway, which runs while the model's
        # replicas are at zero (the longest matching prefix wins).
        base = model.route_path.rstrip("/") + f"/v2/models/{model.name}"
        paths += [
            _path(f"{base}/async-infer", model.gateway_name),
            _path(f"{base}/requests", model.gateway_name),
        ]
    spec: dict[str, Any] = {"rules": [{"host": ing.host, "http": {"paths": paths}}]}
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
