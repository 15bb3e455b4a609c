"""spec.scaling.holdRequests: a model that scales to zero gets the router in front of it,
never scaled to zero, which holds requests while no replica is ready; KEDA wakes the model on
the count it holds (a prometheus trigger), and the router's metrics are scraped (PodMonitor)."""

from __future__ import annotations

import json
from typing import Any

from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.render import Model, render_children
from kubeonnx_operator.render.model import load_model
from kubeonnx_operator.spec import InvalidSpec, parse_spec
from kubeonnx_runtime.router import RouterConfig

from tests.operator.test_reconcile import KEY, FakeKube, body, ready, reconciler, seen_deployment
from tests.operator.test_traffic import candidate, watched

HOLD = {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 3, "holdRequests": True}
INGRESS = {"enabled": True, "host": "models.example.com"}
HELD = 'sum(kubeonnx_router_held_requests{namespace="ns",model="mlp"}) or vector(0)'


def children(
    scaling: dict[str, Any] = HOLD, router_ready: bool | None = None, **more: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    spec = parse_spec({"model": {"uri": "s3://models/mlp/model.onnx"}, "scaling": scaling, **more})
    model = Model("mlp", "ns", spec, router_ready=router_ready)
    rendered = render_children(model, OperatorConfig(), pod_monitor=True)
    return {(c["kind"], c["metadata"]["name"]): c for c in rendered}


def triggers(scaled_object: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in scaled_object["spec"]["triggers"]}


def test_a_holding_model_is_fronted_by_the_router_and_woken_by_what_it_holds() -> None:
    got = children(ingress=INGRESS)
    # The router, in front of the model's own Service, never scaled to zero.
    router = got[("Deployment", "mlp-router")]
    assert router["spec"]["replicas"] >= 1
    autoscaled = [
        c["spec"]["scaleTargetRef"]["name"]
        for (kind, _), c in got.items()
        if kind in ("HorizontalPodAutoscaler", "ScaledObject")
    ]
    assert autoscaled == ["mlp"]
    config = json.loads(got[("ConfigMap", "mlp-router")]["data"]["router.json"])
    RouterConfig.model_validate(config)  # the router starts on it
    assert config["model"] == "mlp"
    assert config["versions"] == [
        {"name": "1", "url": "http://mlp-v1.ns.svc.cluster.local", "weight": 100}
    ]
    assert got[("Service", "mlp-v1")]["spec"]["selector"] == {"kubeonnx.io/inferencemodel": "mlp"}
    # Service mlp (the Ingress's backend) selects the router's pods, which are ready while
    # no version is: they answer their liveness, not the versions' readiness.
    assert got[("Service", "mlp")]["spec"]["selector"] == {"kubeonnx.io/router": "mlp"}
    (rule,) = got[("Ingress", "mlp")]["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == "mlp"
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # KEDA wakes the model on the requests held, from zero (activation above 0).
    scaled = got[("ScaledObject", "mlp")]
    assert scaled["spec"]["minReplicaCount"] == 0
    held = triggers(scaled)["held"]
    assert held["type"] == "prometheus"
    assert held["metadata"]["query"] == HELD
    assert held["metadata"]["activationThreshold"] == "0"
    # The router's metrics are scraped: the held gauge is what the trigger reads.
    monitor = got[("PodMonitor", "mlp-router")]
    assert monitor["spec"]["selector"] == {"matchLabels": {"kubeonnx.io/router": "mlp"}}
    assert router["spec"]["template"]["metadata"]["labels"]["kubeonnx.io/router"] == "mlp"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_without_hold_requests_there_is_no_router() -> None:
    scaling = {**HOLD, "demand": {"prometheusQuery": "up"}}
    del scaling["holdRequests"]
    got = children(scaling)
    assert {k for k, n in got if n == "mlp-router"} == set()
    assert "held" not in triggers(got[("ScaledObject", "mlp")])
    assert got[("Service", "mlp")]["spec"]["selector"] == {"kubeonnx.io/inferencemodel": "mlp"}


def test_until_the_router_is_ready_the_service_keeps_the_models_pods() -> None:
    got = children(router_ready=False)
    assert got[("Service", "mlp")]["spec"]["selector"] == {"kubeonnx.io/inferencemodel": "mlp"}


def test_hold_requests_alone_is_a_demand_signal_and_needs_keda() -> None:
    parse_spec({"model": {"uri": "s3://b/k.onnx"}, "scaling": HOLD})
    for scaling, message in (
        ({**HOLD, "autoscaler": "hpa"}, "spec.scaling.holdRequests needs autoscaler keda"),
        ({**HOLD, "holdRequests": False}, "a demand signal"),
    ):
        try:
            parse_spec({"model": {"uri": "s3://b/k.onnx"}, "scaling": scaling})
        except InvalidSpec as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{scaling} accepted")
    spec = {"model": {"uri": "s3://b/k.onnx"}, "scaling": HOLD}
    try:
        load_model("a" * 57, "ns", spec, OperatorConfig())
    except InvalidSpec as exc:
        assert "at most 56 characters with spec.scaling.holdRequests" in str(exc)
    else:
        raise AssertionError("a name the router's Deployment cannot carry was accepted")


def test_with_candidates_the_stable_alone_is_woken_and_the_route_goes_to_the_router() -> None:
    gateway = {"gateway": {"parentRefs": [{"name": "gw"}]}, "host": "models.example.com"}
    got = children(
        traffic={"candidates": [candidate("2", weight=10)]},
        ingress=gateway,
    )
    assert "held" in triggers(got[("ScaledObject", "mlp")])
    # A request pinned to the candidate is not held (it is not woken): 503 at once.
    config = json.loads(got[("ConfigMap", "mlp-router")]["data"]["router.json"])
    assert [v.get("hold", True) for v in config["versions"]] == [True, False]
    assert "max_held_requests" not in config  # the router's bound (100 per replica)
    candidate_so = got[("ScaledObject", "mlp-v2")]
    assert "held" not in triggers(candidate_so)
    assert candidate_so["spec"]["minReplicaCount"] == 1  # nothing would wake it
    # The router holds, and serves the pins: the route has the one backend, Service mlp.
    route = got[("HTTPRoute", "mlp")]
    backends = [b["name"] for r in route["spec"]["rules"] for b in r["backendRefs"]]
    assert backends == ["mlp"]
    # The router of a model with candidates is scraped too.
    assert ("PodMonitor", "mlp-router") in got


def test_without_hold_requests_the_router_of_candidates_holds_nothing() -> None:
    """Holding is opt-in: a model with candidates has a router, which refuses at once (503)
    a request no ready version may take, as it did before holding existed."""
    scaling = {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 3}
    got = children(scaling, traffic={"candidates": [candidate("2", weight=10)]})
    config = json.loads(got[("ConfigMap", "mlp-router")]["data"]["router.json"])
    assert RouterConfig.model_validate(config).max_held_requests == 0
    assert all("hold" not in v for v in config["versions"])


async def at_zero() -> tuple[FakeKube, ObservedChildren, Any, dict[str, Any]]:
    """A holding model reconciled once, its Deployment seen at 0 replicas (KEDA's)."""
    kube, observed = FakeKube(), ObservedChildren()
    rec = reconciler(kube, observed)
    model = body(scaling=HOLD)
    await rec.reconcile(model)
    gen = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(gen, 0, owns_replicas=False), deleted=False)
    return kube, observed, rec, model


async def test_scaled_to_zero_the_status_names_the_held_requests() -> None:
    kube, observed, rec, model = await at_zero()
    observed.record(KEY, watched(kube, "m-router", ready=1), deleted=False)
    await rec.reconcile(model)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("True", "ScaledToZero")
    query = 'sum(kubeonnx_router_held_requests{namespace="ns",model="m"}) or vector(0)'
    assert cond["message"] == (
        f"scaled to zero; KEDA wakes it when the router m-router holds a request ({query} > 0)"
    )


async def test_turning_hold_off_returns_the_service_to_the_model_before_the_router_goes() -> None:
    kube, observed = FakeKube(), ObservedChildren()
    rec = reconciler(kube, observed)
    router = {"kubeonnx.io/router": "m"}
    held = body(scaling=HOLD)
    await rec.reconcile(held)
    for live in kube.live.values():
        observed.record(KEY, live, deleted=False)
    observed.record(KEY, watched(kube, "m-router", ready=1), deleted=False)
    await rec.reconcile(held)
    assert kube.live[("Service", "m")]["spec"]["selector"] == router
    observed.record(KEY, kube.live[("Service", "m")], deleted=False)

    scaling = {**HOLD, "minReplicas": 1}
    del scaling["holdRequests"]
    await rec.reconcile(body(scaling=scaling))
    assert kube.live[("Service", "m")]["spec"]["selector"] == {"kubeonnx.io/inferencemodel": "m"}
    assert kube.deleted == []
    observed.record(KEY, kube.live[("Service", "m")], deleted=False)
    await rec.reconcile(body(scaling=scaling))
    assert {"m-router", "m-v1"} <= {name for _, name, _ in kube.deleted}


async def test_scaled_to_zero_without_a_ready_router_the_model_is_not_ready() -> None:
    """Nothing holds a request, so nothing wakes the model, while no router pod is ready
    (a bad image, a crash loop): not "KEDA wakes it", but RouterNotReady, naming it."""
    kube, observed, rec, model = await at_zero()
    router = watched(kube, "m-router", ready=0)
    observed.record(KEY, router, deleted=False)
    await rec.reconcile(model)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("False", "Progressing")  # rolling out
    assert cond["message"] == "the router m-router has 0/1 replicas ready"

    late = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    router["status"]["conditions"] = [{**late, "message": "ReplicaSet has timed out"}]
    observed.record(KEY, router, deleted=False)
    await rec.reconcile(model)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("False", "RouterNotReady")
    assert cond["message"] == not_ready_because("ReplicaSet has timed out")


def not_ready_because(reason: str) -> str:
    """RouterNotReady's message for the router of model m, ending in the API server's reason."""
    return (
        "the router m-router has 0/1 replicas ready: no request reaches the model, nor wakes "
        "it from zero, until one is (its pods: kubectl describe pods -l kubeonnx.io/router=m) "
        f"({reason})"
    )


async def test_a_router_that_cannot_create_its_pods_makes_the_model_not_ready() -> None:
    """Pods the router's ReplicaSet cannot create (a missing ServiceAccount, a quota) never
    become ready: RouterNotReady at once, with the API server's reason, not Progressing."""
    kube, observed, rec, model = await at_zero()
    router = watched(kube, "m-router", ready=0)
    router["status"]["conditions"] = [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": 'pods "m-router-5d8f" is forbidden: exceeded quota: pods',
        },
    ]
    observed.record(KEY, router, deleted=False)
    await rec.reconcile(model)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("False", "RouterNotReady")
    assert cond["message"] == not_ready_because(
        'pods "m-router-5d8f" is forbidden: exceeded quota: pods'
    )
