"""Pure renderers: an InferenceModel's parsed spec (and the operator config) to child manifests.

No I/O, no clock, no randomness. Ownership (ownerReferences) is added by the reconciler.
"""

from __future__ import annotations

from typing import Any

from ..config import OperatorConfig
from ..spec import InferenceModelSpec
from .autoscaler import render_hpa, render_scaled_object
from .deployment import render_deployment
from .gateway import render_gateway, render_gateway_service
from .ingress import render_ingress
from .model import Model
from .monitor import render_pod_monitor
from .pdb import render_pdb
from .quota import render_quota_config
from .service import render_service

__all__ = ["Model", "render_children"]


def render_children(
    model: Model, config: OperatorConfig, *, pod_monitor: bool = False
) -> list[dict[str, Any]]:
    """Every child the InferenceModel needs now, in apply order. `pod_monitor`: the
    cluster has the PodMonitor CRD (and the operator config does not turn it off)."""
    spec: InferenceModelSpec = model.spec
    children = [render_quota_config(model)] if model.quota is not None else []
    children += [render_deployment(model, config), render_service(model)]
    if spec.async_.enabled:
        children += [render_gateway(model, config), render_gateway_service(model)]
    if spec.scaling.autoscaler == "hpa":
        children.append(render_hpa(model))
    elif spec.scaling.autoscaler == "keda":
        children.append(render_scaled_object(model, config))
    if spec.ingress.enabled:
        children.append(render_ingress(model, config))
    if spec.scaling.max_replicas > 1:
        children.append(render_pdb(model))
    if pod_monitor and config.pod_monitor:
        children.append(render_pod_monitor(model))
    return children
