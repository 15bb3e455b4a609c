"""spec.ingress.gateway (issue 19, Gateway API): the HTTPRoute rendered for the model's
route path (one backend without candidates; each version's Service weighted by what it
serves, pinned by header and path with them), its mirrors only where the parent Gateway's
class supports them (condition GatewayMirror), and GatewayAPINotInstalled where the
Gateway API is missing."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.render import render_children
from kubeonnx_operator.render.model import Model, load_model
from kubeonnx_operator.render.versions import version_name
from kubeonnx_operator.spec import InvalidSpec, parse_spec
from kubeonnx_operator.status import MIRROR_REASONS, MODEL_REASONS

from tests.operator.test_reconcile import FakeKube, api_error, body, reconciler
from tests.operator.test_traffic import candidate, watched

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = {"parentRefs": [{"name": "public", "namespace": "edge"}]}
ROUTE = {"host": "models.example.com", "gateway": GATEWAY}


def route_of(model: Model) -> dict[str, Any]:
    (route,) = [c for c in render_children(model, OperatorConfig()) if c["kind"] == "HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    return route


def model(ready: set[str] | None = None, mirror: bool = False, **spec: Any) -> Model:
    m = load_model("m", "ns", {"model": {"uri": "s3://b/m.onnx"}, **spec}, OperatorConfig())
    versions = None if ready is None else frozenset(ready)
    return dataclasses.replace(m, ready_versions=versions, gateway_mirror=mirror)


def main_rule(route: dict[str, Any]) -> dict[str, Any]:
    """The rule of the route path with no header match (the split)."""
    (rule,) = [
        r
        for r in route["spec"]["rules"]
        if r["matches"] == [{"path": {"type": "PathPrefix", "value": "/models/ns/m"}}]
    ]
    return rule


def test_no_gateway_no_httproute() -> None:
    kinds = {c["kind"] for c in render_children(model(), OperatorConfig())}
    assert "HTTPRoute" not in kinds


def test_the_stable_alone_is_one_backend_the_models_service() -> None:
    route = route_of(model(ingress={"gateway": {"parentRefs": [{"name": "public"}]}}))
    assert route["metadata"]["name"] == "m"
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "public",
            "namespace": "ns",
        }
    ]
    assert "hostnames" not in route["spec"]
    assert route["spec"]["rules"] == [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/models/ns/m"}}],
            "backendRefs": [{"kind": "Service", "name": "m", "port": 80}],
        }
    ]


def test_the_async_paths_go_to_the_async_gateway_as_on_the_ingress() -> None:
    spec = {"ingress": ROUTE, "async": {"enabled": True, "redis": {"url": "redis://r:6379"}}}
    paths = {
        r["matches"][0]["path"]["value"]: r["backendRefs"][0]["name"]
        for r in route_of(model(**spec))["spec"]["rules"]
    }
    assert paths == {
        "/models/ns/m/v2/models/m/async-infer": "m-gateway",
        "/models/ns/m/v2/models/m/requests": "m-gateway",
        "/models/ns/m": "m",
    }


@pytest.mark.parametrize(
    ("ready", "weights"),
    [
        ({"1", "2"}, [80, 20]),
        ({"1"}, [100, 0]),  # the candidate starts: its backendRef stays, at 0
        ({"2"}, [0, 100]),
        (set(), [0, 0]),
        (None, [80, 20]),  # `kubeonnx render`: readiness unknown, the desired weights
    ],
)
def test_the_split_weights_each_versions_service_by_what_it_serves(
    ready: set[str] | None, weights: list[int]
) -> None:
    spec = {"ingress": ROUTE, "traffic": {"candidates": [candidate("2", weight=20)]}}
    route = route_of(model(ready, **spec))
    assert route["spec"]["hostnames"] == ["models.example.com"]
    assert route["spec"]["parentRefs"][0]["namespace"] == "edge"
    refs = main_rule(route)["backendRefs"]
    assert [(r["name"], r["weight"]) for r in refs] == list(
        zip(["m-v1", "m-v2"], weights, strict=True)
    )
    assert "filters" not in main_rule(route)


def test_a_version_is_pinned_by_header_and_by_path() -> None:
    traffic = {"candidates": [candidate("2"), candidate("3.1")], "pinHeader": "X-Pin"}
    route = route_of(model({"1"}, ingress=ROUTE, traffic=traffic))
    pins: dict[tuple[str, ...], str] = {}
    for rule in route["spec"]["rules"]:
        (match,) = rule["matches"]
        if len(rule["backendRefs"]) != 1:
            continue  # the split
        path = match["path"]["value"]
        headers = [(h["type"], h["name"], h["value"]) for h in match.get("headers", [])]
        pins[(path, *(part for h in headers for part in h))] = rule["backendRefs"][0]["name"]
    v31 = version_name("m", "3.1")
    assert pins == {
        ("/models/ns/m", "Exact", "X-Pin", "1"): "m-v1",
        ("/models/ns/m", "Exact", "X-Pin", "2"): "m-v2",
        ("/models/ns/m", "Exact", "X-Pin", "3.1"): v31,
        ("/models/ns/m/v2/models/m/versions/1",): "m-v1",
        ("/models/ns/m/v2/models/m/versions/2",): "m-v2",
        ("/models/ns/m/v2/models/m/versions/3.1",): v31,
    }


def test_a_root_path_makes_no_double_slash() -> None:
    ingress = {**ROUTE, "path": "/"}
    route = route_of(model(ingress=ingress, traffic={"candidates": [candidate("2")]}))
    values = {r["matches"][0]["path"]["value"] for r in route["spec"]["rules"]}
    assert values == {"/", "/v2/models/m/versions/1", "/v2/models/m/versions/2"}


def test_a_mirror_is_a_filter_only_where_the_gateway_supports_it() -> None:
    traffic = {"candidates": [candidate("2", weight=10, mirrorPercent=5)]}
    assert "filters" not in main_rule(route_of(model({"1", "2"}, ingress=ROUTE, traffic=traffic)))
    mirrored = main_rule(route_of(model({"1", "2"}, mirror=True, ingress=ROUTE, traffic=traffic)))
    assert mirrored["filters"] == [
        {
            "type": "RequestMirror",
            "requestMirror": {
                "backendRef": {"kind": "Service", "name": "m-v2", "port": 80},
                "percent": 5,
            },
        }
    ]
    whole = {"candidates": [candidate("2", mirrorPercent=100)]}
    (full,) = main_rule(route_of(model(mirror=True, ingress=ROUTE, traffic=whole)))["filters"]
    assert "percent" not in full["requestMirror"]


def test_sticky_sends_the_split_to_the_router() -> None:
    traffic = {"candidates": [candidate("2", weight=10, mirrorPercent=5)], "sticky": True}
    rule = main_rule(route_of(model({"1", "2"}, mirror=True, ingress=ROUTE, traffic=traffic)))
    assert rule == {
        "matches": [{"path": {"type": "PathPrefix", "value": "/models/ns/m"}}],
        "backendRefs": [{"kind": "Service", "name": "m", "port": 80}],
    }


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({"parentRefs": []}, "parentRefs"),
        ({"parentRefs": [{"name": "a"}, {"name": "a"}]}, "must not name the same Gateway"),
        ({"parentRefs": [{"name": "Public"}]}, "name"),
        ({"parentRefs": [{"name": "a", "namespace": "a.b"}]}, "namespace"),
        ({}, "parentRefs"),
    ],
)
def test_the_typed_spec_refuses_what_the_crd_refuses(gateway: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse_spec({"model": {"uri": "s3://b/m.onnx"}, "ingress": {"gateway": gateway}})


def test_the_crd_documents_the_field() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    gateway = spec["properties"]["ingress"]["properties"]["gateway"]
    assert "HTTPRoute" in gateway["description"]
    ref = gateway["properties"]["parentRefs"]["items"]
    assert set(ref["properties"]) == {"name", "namespace", "sectionName"}
    assert all(p.get("description") for p in ref["properties"].values())


def test_the_reasons_are_registered() -> None:
    assert "GatewayAPINotInstalled" in MODEL_REASONS
    assert {"Mirrored", "FeatureNotSupported"} <= set(MIRROR_REASONS)


def gateway_objects(features: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        ("Gateway", "public"): {"spec": {"gatewayClassName": "edge-class"}},
        ("GatewayClass", "edge-class"): {
            "status": {"supportedFeatures": [{"name": f} for f in features]}
        },
    }


def mirror_condition(kube: FakeKube) -> dict[str, Any] | None:
    conditions = kube.statuses[-1]["conditions"]
    return next((c for c in conditions if c["type"] == "GatewayMirror"), None)


def applied_route(kube: FakeKube) -> dict[str, Any]:
    return [m for _, m in kube.applied if m["kind"] == "HTTPRoute"][-1]


@pytest.mark.parametrize(
    ("features", "on", "reason"),
    [
        (["HTTPRouteRequestMirror", "HTTPRouteRequestPercentageMirror"], True, "Mirrored"),
        (["HTTPRouteRequestMirror"], False, "FeatureNotSupported"),  # 5% needs the percentage
        ([], False, "FeatureNotSupported"),
        (None, False, "GatewayClassNotFound"),
    ],
)
async def test_the_mirror_follows_the_gateway_class_features(
    features: list[str] | None, on: bool, reason: str
) -> None:
    kube = FakeKube()
    kube.live.update(gateway_objects(features or []))
    if features is None:
        del kube.live[("GatewayClass", "edge-class")]
    traffic = {"candidates": [candidate("2", weight=10, mirrorPercent=5)]}
    await reconciler(kube).reconcile(body(ingress=ROUTE, traffic=traffic))
    condition = mirror_condition(kube)
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("True" if on else "False", reason)
    filters = main_rule(applied_route(kube)).get("filters")
    assert bool(filters) is on
    if not on:
        assert "mirrorPercent is not applied" in condition["message"]
        assert "edge-class" in condition["message"] or reason == "GatewayNotFound"


async def test_a_missing_gateway_turns_the_mirror_off_and_no_mirror_means_no_condition() -> None:
    kube = FakeKube()
    traffic = {"candidates": [candidate("2", weight=10, mirrorPercent=100)]}
    im = body(ingress=ROUTE, traffic=traffic)
    rec = reconciler(kube)
    await rec.reconcile(im)
    condition = mirror_condition(kube)
    assert condition is not None and condition["reason"] == "GatewayNotFound"
    assert "edge/public" in condition["message"]
    # The mirror removed: the condition goes.
    im["status"] = kube.statuses[-1]
    im["spec"]["traffic"]["candidates"][0]["mirrorPercent"] = 0
    await rec.reconcile(im)
    assert mirror_condition(kube) is None


async def test_without_the_gateway_api_the_model_says_so_and_serves_the_rest() -> None:
    kube = FakeKube()
    kube.refuse["HTTPRoute"] = api_error(404, "404 page not found")
    await reconciler(kube).reconcile(body(ingress=ROUTE))  # no exception: no retry loop
    ready = kube.statuses[-1]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "GatewayAPINotInstalled")
    assert "gateway.networking.k8s.io/v1 HTTPRoute" in ready["message"]
    assert {"Deployment", "Service"} <= {m["kind"] for _, m in kube.applied}


async def test_the_route_follows_readiness_and_an_idle_reconcile_writes_nothing() -> None:
    kube = FakeKube()
    kube.live.update(
        gateway_objects(["HTTPRouteRequestMirror", "HTTPRouteRequestPercentageMirror"])
    )
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    im = body(ingress=ROUTE, traffic={"candidates": [candidate("2", weight=10)]})
    await rec.reconcile(im)
    weights = [r["weight"] for r in main_rule(applied_route(kube))["backendRefs"]]
    assert weights == [0, 0]  # nothing ready yet
    for (kind, _), live in list(kube.live.items()):
        if kind not in ("Gateway", "GatewayClass"):
            observed.record(("ns", "m"), copy.deepcopy(live), deleted=False)
    observed.record(("ns", "m"), watched(kube, "m", ready=1), deleted=False)
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=0), deleted=False)
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    assert [r["weight"] for r in main_rule(applied_route(kube))["backendRefs"]] == [100, 0]
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=1), deleted=False)
    im["status"] = kube.statuses[-1]
    await rec.reconcile(im)
    route = applied_route(kube)
    assert [r["weight"] for r in main_rule(route)["backendRefs"]] == [90, 10]
    # The watch shows the route as applied: the same again writes nothing.
    observed.record(("ns", "m"), copy.deepcopy(kube.live[("HTTPRoute", "m")]), deleted=False)
    im["status"] = kube.statuses[-1]
    writes = (len(kube.applied), len(kube.statuses), len(kube.deleted))
    await rec.reconcile(copy.deepcopy(im))
    assert (len(kube.applied), len(kube.statuses), len(kube.deleted)) == writes
    # spec.ingress.gateway removed: the HTTPRoute is pruned.
    im["spec"]["ingress"] = {"enabled": False}
    await rec.reconcile(im)
    assert ("HTTPRoute", "m", "HTTPRoute-uid") in kube.deleted
