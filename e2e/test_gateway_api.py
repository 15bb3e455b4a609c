"""spec.ingress.gateway against the real API server with the Gateway API's standard CRDs
(the pinned sigs.k8s.io/gateway-api, see e2e/gateway_api.py): without them the model says
GatewayAPINotInstalled and the rest is served; with them the HTTPRoute the operator writes
passes the API server's own validation of it, its weights follow the versions' readiness,
its mirror follows the Gateway's class (status.supportedFeatures), and an idle resync
writes nothing.

No Gateway controller runs here: the GatewayClasses' status is written by the test, as a
controller would write it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e import gateway_api
from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import (
    assert_idle_resync,
    condition,
    prepare_namespace,
    until_reason,
)
from e2e.test_traffic import apply, candidate

pytestmark = pytest.mark.e2e
MIRRORING = ["HTTPRouteRequestMirror", "HTTPRouteRequestPercentageMirror"]
UNSCHEDULABLE = {"requests": {"cpu": "1000"}}  # no node has as much: never ready
SMALL = {"requests": {"cpu": "100m"}}


def model(name: str, gateway: str, *candidates: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": f"s3://models/{name}/1/model.onnx"},
        "scaling": {"minReplicas": 1, "maxReplicas": 1},
        "ingress": {"host": "models.example.com", "gateway": {"parentRefs": [{"name": gateway}]}},
    }
    if candidates:
        spec["traffic"] = {"candidates": list(candidates)}
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": spec,
    }


def route(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    return cluster.get(f"httproutes.{gateway_api.GROUP}", name, "-n", ns)


def split(found: dict[str, Any] | None) -> tuple[list[tuple[str, int]], list[Any]] | None:
    """The route's main rule: (Service, weight) of each backend, and its filters."""
    for rule in (found or {}).get("spec", {}).get("rules", []):
        if len(rule.get("backendRefs", [])) > 1:
            refs = [(r["name"], r["weight"]) for r in rule["backendRefs"]]
            return refs, rule.get("filters", [])
    return None


def mirror_condition(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    im = cluster.get("inferencemodel", name, "-n", ns) or {}
    conditions = (im.get("status") or {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "GatewayMirror"), {})


@pytest.fixture
def without_gateway_api(cluster: Cluster) -> Iterator[None]:
    if not cluster.local:
        pytest.skip("deletes cluster-wide CRDs: only on the local control plane")
    gateway_api.uninstall(cluster)
    yield


@pytest.fixture
def gateways(cluster: Cluster, namespace: str) -> Iterator[None]:
    """GatewayClass kubeonnx-mirroring (lists the mirror features) and kubeonnx-plain (lists
    none), and a Gateway of each in `namespace`: public and plain."""
    if not cluster.local:
        pytest.skip("installs cluster-wide CRDs: only on the local control plane")
    if not gateway_api.served(cluster):
        gateway_api.install(cluster)
    for cls, features in (("kubeonnx-mirroring", MIRRORING), ("kubeonnx-plain", [])):
        doc = {
            "apiVersion": f"{gateway_api.GROUP}/v1",
            "kind": "GatewayClass",
            "metadata": {"name": cls},
            "spec": {"controllerName": "example.com/gateway-controller"},
        }
        assert cluster.apply(doc).returncode == 0
        status = {"status": {"supportedFeatures": [{"name": f} for f in features]}}
        cluster.kubectl(
            "patch", "gatewayclass", cls, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip
    for gateway, cls in (("public", "kubeonnx-mirroring"), ("plain", "kubeonnx-plain")):
        doc = {
            "apiVersion": f"{gateway_api.GROUP}/v1",
            "kind": "Gateway",
            "metadata": {"name": gateway},
            "spec": {
                "gatewayClassName": cls,
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            },
        }
        applied = cluster.apply(doc, namespace)
        assert applied.returncode == 0, applied.stderr
    yield
    cluster.kubectl(
        "delete", "gatewayclass", "kubeonnx-mirroring", "kubeonnx-plain", "--ignore-not-found",
        check=False,
    )  # fmt: skip


def test_without_the_gateway_api_the_model_says_so_and_serves_the_rest(
    cluster: Cluster, operator: OperatorProcess, namespace: str, without_gateway_api: None
) -> None:
    prepare_namespace(cluster, namespace)
    apply(cluster, model("nogw", "public"), namespace)
    cond = until_reason(cluster, namespace, "nogw", "GatewayAPINotInstalled")
    assert cond["status"] == "False"
    assert "gateway.networking.k8s.io/v1 HTTPRoute" in cond["message"]
    assert cluster.get("deployment", "nogw", "-n", namespace) is not None
    assert cluster.get("service", "nogw", "-n", namespace) is not None

    gateway_api.install(cluster)
    found = eventually(
        lambda: route(cluster, namespace, "nogw"), 120, what="the HTTPRoute once installed"
    )
    assert [r["backendRefs"][0]["name"] for r in found["spec"]["rules"]] == ["nogw"]
    eventually(
        lambda: condition(cluster, namespace, "nogw").get("reason") != "GatewayAPINotInstalled",
        60,
        what="a reason other than GatewayAPINotInstalled",
    )


def test_the_route_follows_readiness_and_the_gateways_mirror_feature(
    cluster: Cluster, operator: OperatorProcess, namespace: str, gateways: None
) -> None:
    prepare_namespace(cluster, namespace)
    cluster.create_secret("gw-mirror", namespace, {"secret": "s" * 32})
    starting = candidate("gw", "2", weight=20, mirrorPercent=10, resources=UNSCHEDULABLE)
    apply(cluster, model("gw", "public", starting), namespace)

    # The stable ready, the candidate unschedulable: its backendRef stays, at 0. The API
    # server validated the route against the Gateway API's schema and CEL when it stored it.
    refs, filters = eventually(
        lambda: (s := split(route(cluster, namespace, "gw"))) and s[0][0][1] == 100 and s,
        120,
        what="the stable serving everything",
    )
    assert refs == [("gw-v1", 100), ("gw-v2", 0)]
    assert filters == [
        {
            "type": "RequestMirror",
            "requestMirror": {
                "backendRef": {"group": "", "kind": "Service", "name": "gw-v2", "port": 80},
                "percent": 10,
            },
        }
    ]
    mirrored = mirror_condition(cluster, namespace, "gw")
    assert (mirrored["status"], mirrored["reason"]) == ("True", "Mirrored")
    pins = {
        (r["matches"][0].get("headers") or [{}])[0].get("value") or r["matches"][0]["path"]["value"]
        for r in route(cluster, namespace, "gw")["spec"]["rules"]  # type: ignore[index]
        if len(r["backendRefs"]) == 1
    }
    assert pins == {
        "1",
        "2",
        f"/models/{namespace}/gw/v2/models/gw/versions/1",
        f"/models/{namespace}/gw/v2/models/gw/versions/2",
    }

    # The candidate schedulable: once it has a ready replica it gets its weight.
    ready = candidate("gw", "2", weight=20, mirrorPercent=10, resources=SMALL)
    apply(cluster, model("gw", "public", ready), namespace)
    eventually(
        lambda: (s := split(route(cluster, namespace, "gw"))) and s[0] == [
            ("gw-v1", 80), ("gw-v2", 20),
        ],
        120,
        what="the candidate ready and weighted 20",
    )  # fmt: skip

    # Idle: a resync with nothing new writes nothing, the route included, once the operator
    # watches HTTPRoutes (an optional kind is looked for again every minute after it was
    # missing; until then every resync applies the route again, a no-op on the server).
    eventually(
        lambda: (
            operator.metrics().get('kubeonnx_operator_watched_objects{resource="HTTPRoute"}', 0)
            >= 1
        ),
        120,
        what="the operator watching HTTPRoutes",
    )

    def snapshot() -> tuple[Any, ...]:
        im = cluster.get("inferencemodel", "gw", "-n", namespace) or {}
        found = route(cluster, namespace, "gw") or {}
        return im["metadata"]["resourceVersion"], found["metadata"]["resourceVersion"]

    assert_idle_resync(cluster, operator, namespace, snapshot, settle_s=240)

    # A Gateway whose class lists no mirror feature: the route carries no mirror, and the
    # model says why.
    apply(cluster, model("gw", "plain", ready), namespace)
    off = eventually(
        lambda: (c := mirror_condition(cluster, namespace, "gw")).get("status") == "False" and c,
        60,
        what="GatewayMirror False",
    )
    assert off["reason"] == "FeatureNotSupported"
    assert "kubeonnx-plain" in off["message"] and "HTTPRouteRequestMirror" in off["message"]
    eventually(
        lambda: (s := split(route(cluster, namespace, "gw"))) and s[1] == [] and s,
        60,
        what="the route without a mirror",
    )
    assert route(cluster, namespace, "gw")["spec"]["parentRefs"][0]["name"] == "plain"  # type: ignore[index]
