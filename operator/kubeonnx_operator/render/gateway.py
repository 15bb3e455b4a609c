"""The asynchronous gateway: a small Deployment of the runtime in role gateway, and its Service.

It takes asynchronous requests and answers their status while the model's own replicas are
scaled to zero (KEDA wakes them on the queue's lag); it loads no model and needs no GPU.
"""

from __future__ import annotations

from typing import Any

from ..config import OperatorConfig
from .deployment import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    TERMINATION_LOG,
    async_env,
    plain_env,
    probe,
    quota_env,
    quota_volume,
)
from .model import (
    CONTAINER,
    GATEWAY_LABEL,
    HTTP_PORT,
    METRICS_PORT,
    MODEL_LABEL,
    SERVICE_PORT,
    Model,
)


def _labels(model: Model) -> dict[str, str]:
    """The model's labels (so the operator watches its gateway), with the component told
    apart; the pods carry the gateway's label instead of the model's."""
    return {**model.labels, "app.kubernetes.io/component": "async-gateway"}


def _pod_labels(model: Model) -> dict[str, str]:
    labels = {k: v for k, v in _labels(model).items() if k != MODEL_LABEL}
    return {**labels, GATEWAY_LABEL: model.name}


def _metadata(model: Model) -> dict[str, Any]:
    return {"name": model.gateway_name, "namespace": model.namespace, "labels": _labels(model)}


def render_gateway(model: Model, config: OperatorConfig) -> dict[str, Any]:
    spec = model.spec
    gateway = spec.async_.gateway
    values: list[tuple[str, str | None]] = [
        ("KUBEONNX_ROLE", "gateway"),
        ("KUBEONNX_MODEL_URI", spec.model.uri),  # not fetched: the gateway runs no model
        ("KUBEONNX_MODEL_NAME", model.name),
        ("KUBEONNX_MODEL_VERSION", spec.model.version),
        ("KUBEONNX_PORT", str(HTTP_PORT)),
        ("KUBEONNX_METRICS_PORT", str(METRICS_PORT)),
        ("KUBEONNX_ROUTE_PREFIX", model.route_path),
        ("KUBEONNX_TERMINATION_LOG", TERMINATION_LOG),
    ]
    env = plain_env(values) + async_env(model) + quota_env(model)
    resources: dict[str, Any] = {
        "requests": {k: str(v) for k, v in gateway.resources.requests.items()}
    }
    if gateway.resources.limits:
        resources["limits"] = {k: str(v) for k, v in gateway.resources.limits.items()}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.runtime.image or config.runtime_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["kubeonnx"],
        "args": ["serve"],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe("/v2/health/ready", 5, 2),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "resources": resources,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
    }
    quota_volume(model, container, pod_spec)
    if spec.pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = spec.pod.image_pull_secrets
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(model),
        "spec": {
            "replicas": gateway.replicas,
            "selector": {"matchLabels": model.gateway_selector},
            "revisionHistoryLimit": 3,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": _pod_labels(model)}, "spec": pod_spec},
        },
    }


def render_gateway_service(model: Model) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(model),
        "spec": {
            "type": "ClusterIP",
            "selector": model.gateway_selector,
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
