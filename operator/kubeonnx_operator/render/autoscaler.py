"""The autoscaler: an HPA on CPU, or a KEDA ScaledObject on in-flight requests."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..config import OperatorConfig
from .deployment import ASYNC_PASSWORD_ENV
from .model import Model


def _target(model: Model) -> dict[str, str]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "name": model.name}


def render_hpa(model: Model) -> dict[str, Any]:
    scaling = model.spec.scaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": model.metadata(),
        "spec": {
            "scaleTargetRef": _target(model),
            "minReplicas": max(scaling.min_replicas, 1),
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": scaling.target_cpu_utilization,
                        },
                    },
                }
            ],
        },
    }


def inflight_query(model: Model, version: str | None = None) -> str:
    """The PromQL that KEDA scales on: the runtime's in-flight gauge, summed over replicas
    (of one version's, when the model has several: every runtime series has `version`)."""
    only = f',version="{version}"' if version else ""
    return (
        f'sum(kubeonnx_inflight_requests{{namespace="{model.namespace}",model="{model.name}"'
        f"{only}}}) or vector(0)"
    )


def queue_trigger(model: Model) -> dict[str, Any]:
    """KEDA's redis-streams trigger on the consumer group's lag: requests queued that no
    replica has taken yet. Lag exists at zero replicas (the group is made with the stream),
    so it wakes a model scaled to zero; KEDA needs Redis 7 for it."""
    spec = model.spec.async_
    assert spec.redis is not None
    url = urlsplit(spec.redis.url)
    metadata = {
        "address": f"{url.hostname}:{url.port or 6379}",
        "stream": f"{model.async_prefix}:requests",
        "consumerGroup": "kubeonnx",
        "lagCount": str(spec.target_queue_length),
        "activationLagCount": "0",
        "databaseIndex": url.path.strip("/") or "0",
    }
    if url.scheme == "rediss":
        metadata["enableTLS"] = "true"
    if spec.redis.password_secret is not None:
        # Read from the scale target's container, which has it from the Secret.
        metadata["passwordFromEnv"] = ASYNC_PASSWORD_ENV
    return {"type": "redis-streams", "name": "queue", "metadata": metadata}


def render_scaled_object(model: Model, config: OperatorConfig) -> dict[str, Any]:
    scaling = model.spec.scaling
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "name": "inflight",
            "metadata": {
                "serverAddress": config.prometheus_address,
                "query": inflight_query(model),
                "threshold": str(scaling.target_inflight_requests),
            },
        }
    ]
    if scaling.demand is not None:
        # Exists at zero replicas (the in-flight gauge does not): what wakes the model.
        triggers.append(
            {
                "type": "prometheus",
                "name": "demand",
                "metadata": {
                    "serverAddress": config.prometheus_address,
                    "query": model.demand_query(),
                    "threshold": scaling.demand.threshold,
                    "activationThreshold": "0",
                },
            }
        )
    if scaling.hold_requests:
        # The requests the router holds while no replica is ready: at zero replicas too.
        triggers.append(
            {
                "type": "prometheus",
                "name": "held",
                "metadata": {
                    "serverAddress": config.prometheus_address,
                    "query": model.held_query(),
                    "threshold": str(scaling.target_inflight_requests),
                    "activationThreshold": "0",
                },
            }
        )
    if model.spec.async_.enabled:
        triggers.append(queue_trigger(model))
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": model.metadata(),
        "spec": {
            "scaleTargetRef": _target(model),
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "pollingInterval": config.keda_polling_seconds,
            "cooldownPeriod": config.keda_cooldown_seconds,
            "triggers": triggers,
        },
    }
