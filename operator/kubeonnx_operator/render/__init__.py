"""Pure renderers: an InferenceModel's parsed spec (and the operator config) to child manifests.

No I/O, no clock, no randomness. Ownership (ownerReferences) is added by the reconciler.
"""

from __future__ import annotations

from typing import Any

from ..config import OperatorConfig
from ..spec import InferenceModelSpec
from .autoscaler import inflight_query, render_hpa, render_scaled_object
from .deployment import render_deployment
from .gateway import render_gateway, render_gateway_service
from .httproute import render_http_route
from .ingress import render_ingress
from .model import Model
from .monitor import render_pod_monitor
from .pdb import render_pdb
from .quota import render_quota_config
from .service import render_service
from .versions import (
    Placed,
    place,
    relabel_version,
    render_router,
    render_router_config_map,
    render_router_pdb,
    render_router_pod_monitor,
    routed,
    router_selector,
    version_deployment,
    version_model,
    version_service,
)

__all__ = ["Model", "render_children"]


def render_children(
    model: Model, config: OperatorConfig, *, pod_monitor: bool = False
) -> list[dict[str, Any]]:
    """Every child the InferenceModel needs now, in apply order. `pod_monitor`: the
    cluster has the PodMonitor CRD (and the operator config does not turn it off)."""
    spec: InferenceModelSpec = model.spec
    placed = place(model)
    versions = [_version_children(model, config, p, pod_monitor, len(placed) > 1) for p in placed]
    children = [render_quota_config(model)] if model.quota is not None else []
    children += [v["deployment"] for v in versions]
    if routed(model):
        children += [version_service(model, p) for p in placed]
        config_map = render_router_config_map(model, config, placed)
        children += [config_map, render_router(model, config, config_map)]
        children.append(render_router_pdb(model))
        # Not before the router can answer: the stable's pods serve until then.
        selector = router_selector(model) if model.router_ready is not False else placed[0].selector
    else:
        selector = placed[0].selector
    service = render_service(model)
    service["spec"]["selector"] = selector
    children.append(service)
    if spec.async_.enabled:
        children += [render_gateway(model, config), render_gateway_service(model)]
    children += [v["autoscaler"] for v in versions if "autoscaler" in v]
    if spec.ingress.enabled:
        children.append(render_ingress(model, config))
    if spec.ingress.gateway is not None:
        children.append(render_http_route(model, placed))
    children += [v[kind] for kind in ("pdb", "monitor") for v in versions if kind in v]
    if routed(model) and pod_monitor and config.pod_monitor:
        children.append(render_router_pod_monitor(model))
    return children


def _version_children(
    model: Model, config: OperatorConfig, placed: Placed, pod_monitor: bool, several: bool
) -> dict[str, dict[str, Any]]:
    """A version's Deployment, autoscaler, disruption budget and PodMonitor, named after
    its Deployment."""
    version = version_model(model, placed)
    scaling = placed.spec.scaling
    children = {"deployment": version_deployment(model, placed, render_deployment(version, config))}
    if scaling.autoscaler == "hpa":
        children["autoscaler"] = render_hpa(version)
    elif scaling.autoscaler == "keda":
        scaled = render_scaled_object(version, config)
        if several:  # every version's runtimes report model=NAME: count this one's alone
            for trigger in scaled["spec"]["triggers"]:
                if trigger["name"] == "inflight":
                    trigger["metadata"]["query"] = inflight_query(version, placed.version)
        children["autoscaler"] = scaled
    if scaling.max_replicas > 1:
        children["pdb"] = render_pdb(version)
    if pod_monitor and config.pod_monitor:
        children["monitor"] = render_pod_monitor(version)
    for kind, child in children.items():
        if kind != "deployment":
            relabel_version(model, placed, child)
    return children
