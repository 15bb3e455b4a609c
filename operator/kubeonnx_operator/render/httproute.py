"""The HTTPRoute (Gateway API, gateway.networking.k8s.io/v1): the model's route path on the
Gateways spec.ingress.gateway names, split between the versions by the Gateway itself.

With candidates each version's own Service is a backend of the route's main rule, weighted
as the router would serve it (`served_weights`: a version with no ready replica gets 0, and
its backendRef stays, so that readiness alone changes a weight and a resync with nothing new
renders the same object). A request naming its version (the pin header, or the path
/v2/models/NAME/versions/V) goes to that version's Service; a mirrored candidate gets a
RequestMirror filter only where every parent Gateway's class supports it
(`model.gateway_mirror`, decided by the reconciler from the GatewayClass's
status.supportedFeatures). With `sticky` the main rule goes to the router (Service NAME),
which alone knows the caller's version. Without candidates, or with spec.scaling.holdRequests
(the router holds requests while nothing is ready, and serves the pins itself), the route has
one backend, the model's Service.
"""

from __future__ import annotations

from typing import Any

from .model import SERVICE_PORT, Model
from .versions import Placed, served_weights

API_VERSION = "gateway.networking.k8s.io/v1"
GATEWAY_GROUP = "gateway.networking.k8s.io"
# The GatewayClass features (status.supportedFeatures[].name, sigs.k8s.io/gateway-api
# pkg/features) a mirror needs: one mirrored candidate of 100%, a percentage, several.
MIRROR = "HTTPRouteRequestMirror"
PERCENTAGE_MIRROR = "HTTPRouteRequestPercentageMirror"
MULTIPLE_MIRRORS = "HTTPRouteRequestMultipleMirrors"


def mirror_features(placed: list[Placed]) -> list[str]:
    """The GatewayClass features the route's mirrors need (none: nothing is mirrored)."""
    mirrored = [p for p in placed if p.mirror_percent]
    if not mirrored:
        return []
    needed = [MIRROR]
    if any(p.mirror_percent < 100 for p in mirrored):
        needed.append(PERCENTAGE_MIRROR)
    if len(mirrored) > 1:
        needed.append(MULTIPLE_MIRRORS)
    return needed


def _backend(service: str, weight: int | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"kind": "Service", "name": service, "port": SERVICE_PORT}
    if weight is not None:
        ref["weight"] = weight
    return ref


def _prefix(path: str) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": path}}


def _rule(matches: list[dict[str, Any]], backends: list[dict[str, Any]]) -> dict[str, Any]:
    return {"matches": matches, "backendRefs": backends}


def _mirror(p: Placed) -> dict[str, Any]:
    mirror: dict[str, Any] = {"backendRef": _backend(p.service)}
    if p.mirror_percent < 100:
        mirror["percent"] = p.mirror_percent
    return {"type": "RequestMirror", "requestMirror": mirror}


def route_weights(model: Model, placed: list[Placed]) -> list[int]:
    """Each version's weight in the route: what it serves now (0 without a ready replica),
    or its desired weight where readiness is unknown (`kubeonnx render`)."""
    desired = [p.weight for p in placed]
    if model.ready_versions is None:
        return desired
    return served_weights(desired, [p.version in model.ready_versions for p in placed])


def render_http_route(model: Model, placed: list[Placed]) -> dict[str, Any]:
    gateway = model.spec.ingress.gateway
    assert gateway is not None, "rendered only with spec.ingress.gateway"
    root = model.route_path.rstrip("/")
    rules = []
    if model.spec.async_.enabled:
        # Submissions and their status go to the async gateway, as on the Ingress (the
        # longest matching prefix wins).
        base = f"{root}/v2/models/{model.name}"
        rules += [
            _rule([_prefix(f"{base}/async-infer")], [_backend(model.gateway_name)]),
            _rule([_prefix(f"{base}/requests")], [_backend(model.gateway_name)]),
        ]
    if len(placed) > 1 and not model.holds_requests:
        pin = model.spec.traffic.pin_header
        for p in placed:
            path = f"{root}/v2/models/{model.name}/versions/{p.version}"
            header = {"type": "Exact", "name": pin, "value": p.version}
            rules += [
                _rule([_prefix(path)], [_backend(p.service)]),
                # The same path as the main rule: the match with more headers wins.
                _rule([{**_prefix(model.route_path), "headers": [header]}], [_backend(p.service)]),
            ]
        if model.spec.traffic.sticky:
            rules.append(_rule([_prefix(model.route_path)], [_backend(model.name)]))
        else:
            weights = route_weights(model, placed)
            main = _rule(
                [_prefix(model.route_path)],
                [_backend(p.service, w) for p, w in zip(placed, weights, strict=True)],
            )
            if model.gateway_mirror:
                main["filters"] = [_mirror(p) for p in placed if p.mirror_percent]
            rules.append(main)
    else:
        # One version, or requests held by the router (which also serves the pins): the
        # model's Service, which selects the router whenever the model has one.
        rules.append(_rule([_prefix(model.route_path)], [_backend(model.name)]))
    spec: dict[str, Any] = {
        "parentRefs": [_parent(model, ref) for ref in gateway.parent_refs],
        "rules": rules,
    }
    if model.spec.ingress.host:
        spec["hostnames"] = [model.spec.ingress.host]
    return {
        "apiVersion": API_VERSION,
        "kind": "HTTPRoute",
        "metadata": model.metadata(),
        "spec": spec,
    }


def _parent(model: Model, ref: Any) -> dict[str, Any]:
    out = {
        "group": GATEWAY_GROUP,
        "kind": "Gateway",
        "name": ref.name,
        "namespace": ref.namespace or model.namespace,
    }
    if ref.section_name:
        out["sectionName"] = ref.section_name
    return out


def parent_gateways(model: Model) -> list[tuple[str, str]]:
    """(namespace, name) of each Gateway the route attaches to."""
    gateway = model.spec.ingress.gateway
    if gateway is None:
        return []
    return [(ref.namespace or model.namespace, ref.name) for ref in gateway.parent_refs]
