"""The reconcile against a recording stand-in for the API: ownership, stale caches,
hand-over of replicas, errors in status, Events."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.reconcile import Reconciler
from kubeonnx_operator.render.model import MODEL_LABEL
from lightkube import ApiError
from lightkube.models.meta_v1 import Status

UID = "uid-1"
HANDOVER_MANAGER = "kubeonnx-replicas-handover"
KEY = ("ns", "m")


def api_error(code: int, message: str) -> ApiError:
    import httpx2

    request = httpx2.Request("PATCH", "https://api/x")
    response = httpx2.Response(
        code, request=request, json={"kind": "Status", "code": code, "message": message}
    )
    return ApiError(request=request, response=response, status=Status(code=code, message=message))


class FakeKube:
    """Records what was written; `live` holds what exists, `refuse` what the API refuses."""

    def __init__(self) -> None:
        self.live: dict[tuple[str, str], dict[str, Any]] = {}
        self.applied: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[tuple[str, str, str | None]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.refuse: dict[str, ApiError] = {}
        self.generation = 1
        self.requests: list[tuple[str, str]] = []  # (verb, kind) of every request
        self.every_field = False  # managedFields as the server writes them (every_field_of)

    async def apply(self, manifest: dict[str, Any], *, manager: str = "kubeonnx") -> dict[str, Any]:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        self.requests.append(("apply", kind))
        if kind in self.refuse:
            raise self.refuse[kind]
        self.applied.append((manager, copy.deepcopy(manifest)))
        obj = copy.deepcopy(manifest)
        obj["metadata"]["uid"] = f"{kind}-uid"
        fields = every_field_of(manifest) if self.every_field else fields_of(manifest)
        obj["metadata"]["managedFields"] = [
            {"manager": manager, "operation": "Apply", "fieldsV1": fields}
        ]
        if kind == "Deployment" and manager != HANDOVER_MANAGER:
            self.generation += 1
            obj["metadata"]["generation"] = self.generation
            obj["status"] = {"observedGeneration": self.generation - 1}
        self.live[(kind, name)] = obj
        return obj

    async def create_absent(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """The API server's answer to an apply with a resourceVersion no object has: created
        if absent, 409 (None) if the name is taken."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if (kind, name) in self.live:
            self.requests.append(("apply", kind))  # refused: the object is left as it is
            return None
        return await self.apply(manifest)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Any:
        self.requests.append(("get", kind))
        return self.live.get((kind, name))

    async def delete(
        self, api_version: str, kind: str, ns: str, name: str, uid: Any = None
    ) -> None:
        self.deleted.append((kind, name, uid))

    async def get_secret(self, namespace: str, name: str) -> None:
        return None

    async def metadata(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return {"kind": "PartialObjectMetadata"}

    async def secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.metadata("Secret", namespace, name)

    async def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(copy.deepcopy(status))

    async def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def fields_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for the server's fieldsV1: which fields are set (not their values)."""
    fields: dict[str, Any] = {"f:spec": {"f:template": {}}}
    if "replicas" in manifest.get("spec", {}):
        fields["f:spec"]["f:replicas"] = {}
    return fields


def every_field_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The server's fieldsV1 of an apply of `manifest`, in full: every field (not its
    value), each list's elements as one, the object's identity left out."""

    def fields(value: Any) -> dict[str, Any]:
        if isinstance(value, list):
            return {"i:0": {}} if value else {}
        if not isinstance(value, dict):
            return {}
        return {f"f:{k}": fields(v) for k, v in value.items() if v is not None}

    out = fields({k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")})
    meta = out.pop("f:metadata", {})
    meta = {k: v for k, v in meta.items() if k not in ("f:name", "f:namespace")}
    return {**out, **({"f:metadata": meta} if meta else {})}


def body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": UID, "generation": 1},
        "spec": {"model": {"uri": "s3://b/m.onnx"}, **spec},
    }


def reconciler(kube: FakeKube, observed: ObservedChildren | None = None) -> Reconciler:
    return Reconciler(kube, OperatorConfig(), observed or ObservedChildren(), now=lambda: "t")  # type: ignore[arg-type]


def observed_with_owned_ingress() -> ObservedChildren:
    """A watch cache holding the model's Ingress, as an earlier reconcile left it."""
    observed = ObservedChildren()
    observed.record(
        KEY,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": {
                "name": "m",
                "namespace": "ns",
                "uid": "ingress-uid",
                "ownerReferences": [{"uid": UID, "controller": True}],
                "managedFields": [],
            },
        },
        deleted=False,
    )
    return observed


def ready(kube: FakeKube) -> dict[str, Any]:
    cond: dict[str, Any] = kube.statuses[-1]["conditions"][0]
    return cond


def seen_deployment(generation: int, replicas: int, *, owns_replicas: bool) -> dict[str, Any]:
    fields = fields_of({"spec": {"replicas": replicas}} if owns_replicas else {})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "uid": "Deployment-uid",
            "generation": generation,
            "ownerReferences": [{"uid": UID, "controller": True}],
            "managedFields": [{"manager": "kubeonnx", "operation": "Apply", "fieldsV1": fields}],
        },
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
        },
    }


def existing(kube: FakeKube, obj: dict[str, Any], cached: bool) -> ObservedChildren:
    """`obj` exists; `cached`: the watch cache holds it too, as it does any object carrying
    the model's label (a hand-applied `kubeonnx render`, a deleted model's child)."""
    obj = copy.deepcopy(obj)
    meta = obj.setdefault("metadata", {})
    obj.setdefault("apiVersion", "v1")
    obj.setdefault("kind", "Service")
    meta.update(namespace="ns", labels={MODEL_LABEL: "m"}, managedFields=[])
    meta.setdefault("uid", "theirs")
    kube.live[(obj["kind"], meta["name"])] = obj
    observed = ObservedChildren()
    if cached:
        observed.record(KEY, obj, deleted=False)
    return observed


@pytest.mark.parametrize("cached", [False, True])
async def test_an_object_it_does_not_own_is_left_alone_and_named_in_status(cached: bool) -> None:
    kube = FakeKube()
    users = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "uid": "theirs"}}
    await reconciler(kube, existing(kube, users, cached)).reconcile(body())
    assert "Service" not in {m["kind"] for _, m in kube.applied}
    assert "Deployment" in {m["kind"] for _, m in kube.applied}
    cond = ready(kube)
    assert cond["status"] == "False" and cond["reason"] == "ChildConflict"
    assert "Service m already exists and is not managed by this InferenceModel" in cond["message"]
    assert ("Warning", "ChildConflict", cond["message"]) in kube.events


def service_controlled_by(name: str, uid: str) -> dict[str, Any]:
    ref = {"kind": "InferenceModel", "name": name, "uid": uid, "controller": True}
    return {"metadata": {"name": "m", "ownerReferences": [ref]}}


@pytest.mark.parametrize("cached", [False, True])
async def test_an_object_controlled_by_another_owner_is_a_conflict_too(cached: bool) -> None:
    kube = FakeKube()
    observed = existing(kube, service_controlled_by("other", "o"), cached)
    await reconciler(kube, observed).reconcile(body())
    assert ready(kube)["reason"] == "ChildConflict"
    assert "controlled by InferenceModel other (uid o)" in ready(kube)["message"]
    assert "Service" not in {m["kind"] for _, m in kube.applied}


@pytest.mark.parametrize("cached", [False, True])
async def test_a_child_of_a_deleted_model_of_the_same_name_is_waited_for(cached: bool) -> None:
    kube = FakeKube()
    observed = existing(kube, service_controlled_by("m", "old"), cached)
    await reconciler(kube, observed).reconcile(body())
    assert ready(kube)["reason"] == "Progressing"
    assert "waiting for the garbage collector to delete Service m" in ready(kube)["message"]
    assert "Service" not in {m["kind"] for _, m in kube.applied}


async def test_status_is_never_derived_from_a_deployment_older_than_the_one_applied() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    await rec.reconcile(body())
    # The watch shows the first Deployment, rolled out: Ready.
    first = kube.live[("Deployment", "m")]
    observed.record(
        KEY, seen_deployment(first["metadata"]["generation"], 1, owns_replicas=False), deleted=False
    )
    await rec.reconcile(body())
    assert ready(kube)["reason"] == "Ready"
    # A spec change that alters only values (the image): applied, but the watch still
    # holds the old, rolled-out Deployment when the next reconcile runs.
    changed = body(runtime={"image": "runtime:2"})
    changed["metadata"]["generation"] = 2
    changed["status"] = kube.statuses[-1]
    await rec.reconcile(changed)
    await rec.reconcile(changed)  # nothing to apply; the cache is what it reads
    assert ready(kube)["status"] == "False" and ready(kube)["reason"] == "Progressing"


async def test_switching_from_no_autoscaler_hands_the_replica_count_over() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    fixed = {"autoscaler": "none", "minReplicas": 3, "maxReplicas": 3}
    await rec.reconcile(body(scaling=fixed))
    gen = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(gen, 3, owns_replicas=True), deleted=False)
    kube.applied.clear()
    await rec.reconcile(body(scaling={"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 5}))
    managers = [(manager, m["kind"]) for manager, m in kube.applied]
    # The count goes to a manager of its own before the apply that drops the field.
    assert managers.index((HANDOVER_MANAGER, "Deployment")) < managers.index(
        ("kubeonnx", "Deployment")
    )
    handover = next(m for manager, m in kube.applied if manager == HANDOVER_MANAGER)
    assert handover["spec"] == {"replicas": 3}
    main = next(
        m for manager, m in kube.applied if manager == "kubeonnx" and m["kind"] == "Deployment"
    )
    assert "replicas" not in main["spec"]


async def test_an_api_failure_reaches_status_and_is_retried() -> None:
    kube = FakeKube()
    kube.refuse["Service"] = api_error(403, 'services "m" is forbidden: exceeded quota: q')
    with pytest.raises(ApiError):
        await reconciler(kube).reconcile(body())
    cond = ready(kube)
    assert cond["reason"] == "ReconcileError"
    assert cond["message"] == 'API error 403: services "m" is forbidden: exceeded quota: q'


async def test_an_admission_webhook_refusal_is_not_an_invalid_spec() -> None:
    kube = FakeKube()
    message = 'admission webhook "policy.example.com" denied the request: no GPUs on Fridays'
    kube.refuse["Deployment"] = api_error(400, message)
    with pytest.raises(ApiError):
        await reconciler(kube).reconcile(body())
    assert ready(kube)["reason"] == "ReconcileError" and message in ready(kube)["message"]
    # The API server's own schema refusing what the spec made: that is the spec.
    kube = FakeKube()
    kube.refuse["Deployment"] = api_error(422, "spec.template.spec.containers[0].image: Required")
    await reconciler(kube).reconcile(body())
    assert ready(kube)["reason"] == "InvalidSpec"


async def test_an_invalid_spec_still_reports_the_replicas_that_serve() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    observed.record(KEY, seen_deployment(4, 2, owns_replicas=False), deleted=False)
    await reconciler(kube, observed).reconcile(body(scaling={"minReplicas": 5, "maxReplicas": 2}))
    status = kube.statuses[-1]
    assert status["conditions"][0]["reason"] == "InvalidSpec"
    assert status["replicaSummary"] == "2/2"  # the old Deployment still serves


async def test_a_fresh_models_first_reconcile_sends_one_request_a_child() -> None:
    """Children the watch has never seen are created in one request each (an apply that
    only creates), not looked up first; then one status write and one Event."""
    kube = FakeKube()
    await reconciler(kube).reconcile(body())
    kinds = [m["kind"] for _, m in kube.applied]
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    assert kube.requests == [("apply", kind) for kind in kinds]
    assert len(kube.statuses) == 1 and [r for _, r, _ in kube.events] == ["Progressing"]


def restarted(kube: FakeKube) -> ObservedChildren:
    """The watch cache of an operator started anew: every child as the API holds it."""
    observed = ObservedChildren()
    for obj in kube.live.values():
        observed.record(KEY, copy.deepcopy(obj), deleted=False)
    kube.requests.clear()
    return observed


async def test_a_restarted_operator_applies_nothing_its_predecessor_applied() -> None:
    kube = FakeKube()
    kube.every_field = True
    await reconciler(kube).reconcile(body(scaling={"maxReplicas": 2}))
    assert len(kube.live) == 4  # Deployment, Service, HPA, PDB
    # A new process: nothing in memory, the children as the watch lists them.
    await reconciler(kube, restarted(kube)).reconcile(body(scaling={"maxReplicas": 2}))
    assert [r for r in kube.requests if r[0] == "apply"] == []
    # The spec changed while no operator ran: what it changes is applied, the rest is not.
    await reconciler(kube, restarted(kube)).reconcile(body(scaling={"maxReplicas": 3}))
    assert kube.requests == [("apply", "HorizontalPodAutoscaler")]


async def test_a_restarted_operator_repairs_a_child_changed_while_it_was_away() -> None:
    kube = FakeKube()
    kube.every_field = True
    await reconciler(kube).reconcile(body())
    # While no operator ran, someone edited the Service's selector: the field left the
    # operator's field set (taken over by the editor, or removed).
    service = kube.live[("Service", "m")]
    del service["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:selector"]
    await reconciler(kube, restarted(kube)).reconcile(body())
    assert kube.requests == [("apply", "Service")]


async def test_one_event_per_change_of_reason() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    b = body()
    await rec.reconcile(b)
    await rec.reconcile(b)
    assert [reason for _, reason, _ in kube.events] == ["Progressing"]
    # The Deployment rolled out: the change of reason is an Event too, once.
    gen = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(gen, 1, owns_replicas=False), deleted=False)
    await rec.reconcile(b)
    await rec.reconcile(b)
    assert ready(kube)["reason"] == "Ready"
    assert [(kind, reason) for kind, reason, _ in kube.events] == [
        ("Normal", "Progressing"),
        ("Normal", "Ready"),
    ]


async def test_children_no_longer_rendered_are_pruned_by_uid() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "uid": "ing-1",
            "ownerReferences": [{"uid": UID}],
        },
    }
    observed.record(KEY, ingress, deleted=False)
    await reconciler(kube, observed).reconcile(body())
    assert kube.deleted == [("Ingress", "m", "ing-1")]


async def test_a_deleted_model_leaves_nothing_behind_in_the_reconciler() -> None:
    kube = FakeKube()
    rec = reconciler(kube)
    await rec.reconcile(body())
    assert rec.applied[KEY] and KEY in rec.applied_deployments
    rec.forget(KEY)
    assert KEY not in rec.applied and KEY not in rec.applied_deployments


def test_the_watch_cache_removes_by_uid_whatever_order_events_arrive_in() -> None:
    observed = ObservedChildren()

    def service(uid: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m", "uid": uid}}

    observed.record(KEY, service("new"), deleted=False)  # re-created...
    observed.record(KEY, service("old"), deleted=True)  # ...before the old one's DELETED
    child = observed.child(KEY, "v1", "Service", "m")
    assert child is not None and child.uid == "new"
    observed.record(KEY, service("new"), deleted=True)
    assert observed.child(KEY, "v1", "Service", "m") is None


ASYNC = {"enabled": True, "redis": {"url": "redis://r:6379/0"}}


async def test_turning_async_off_deletes_the_gateway_but_keeps_the_model_deployment() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    await rec.reconcile(body(**{"async": ASYNC}))
    applied = {(m["kind"], m["metadata"]["name"]) for _, m in kube.applied}
    assert {("Deployment", "m-gateway"), ("Service", "m-gateway"), ("Deployment", "m")} <= applied
    assert kube.statuses[-1]["mode"] == "async"
    assert kube.statuses[-1]["asyncURL"] == (
        "http://m-gateway.ns.svc.cluster.local/v2/models/m/async-infer"
    )
    for (kind, name), obj in kube.live.items():
        obj["metadata"].update(namespace="ns", uid=f"{kind}-{name}", ownerReferences=[{"uid": UID}])
        observed.record(KEY, obj, deleted=False)
    # The Deployment of the same kind and a different name is no longer rendered: pruned.
    sync = body()
    sync["status"] = kube.statuses[-1]
    await rec.reconcile(sync)
    assert sorted(kube.deleted) == [
        ("Deployment", "m-gateway", "Deployment-m-gateway"),
        ("Service", "m-gateway", "Service-m-gateway"),
    ]
    assert kube.statuses[-1]["mode"] == "sync"
    # Status is a merge patch: the URL is removed by a null, not by leaving it out.
    assert "asyncURL" in kube.statuses[-1] and kube.statuses[-1]["asyncURL"] is None


def controlled_by_model(kind: str, name: str, uid: str) -> dict[str, Any]:
    ref = {"kind": "InferenceModel", "name": "m", "uid": uid, "controller": True}
    return {"kind": kind, "metadata": {"name": name, "ownerReferences": [ref]}}


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
async def test_a_gateway_of_a_deleted_model_of_the_same_name_is_waited_for(kind: str) -> None:
    # NAME-gateway is controlled by the old InferenceModel NAME (not by one named
    # NAME-gateway): the garbage collector is about to remove it, no conflict.
    kube = FakeKube()
    kube.live[(kind, "m-gateway")] = controlled_by_model(kind, "m-gateway", "old")
    await reconciler(kube).reconcile(body(**{"async": ASYNC}))
    assert ready(kube)["reason"] == "Progressing", ready(kube)
    assert (
        f"waiting for the garbage collector to delete {kind} m-gateway" in (ready(kube)["message"])
    )
    assert (kind, "m-gateway") not in {(m["kind"], m["metadata"]["name"]) for _, m in kube.applied}


async def test_switching_from_keda_at_zero_replicas_to_hpa_brings_the_model_back() -> None:
    # An HPA never scales a Deployment at 0 replicas ("scaling is disabled"): the
    # operator hands over minReplicas (at least 1) for the HPA to take from there.
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    keda = {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 5}
    await rec.reconcile(body(scaling=keda, **{"async": ASYNC}))
    gen = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(gen, 0, owns_replicas=False), deleted=False)
    observed.record(KEY, seen_gateway(1, "NewReplicaSetAvailable"), deleted=False)
    await rec.reconcile(body(scaling=keda, **{"async": ASYNC}))
    assert not [m for manager, m in kube.applied if manager == HANDOVER_MANAGER]
    assert ready(kube)["reason"] == "ScaledToZero"
    kube.applied.clear()
    hpa = {"autoscaler": "hpa", "minReplicas": 2, "maxReplicas": 5}
    await rec.reconcile(body(scaling=hpa, **{"async": ASYNC}))
    handover = [m for manager, m in kube.applied if manager == HANDOVER_MANAGER]
    assert [m["spec"] for m in handover] == [{"replicas": 2}]
    assert handover[0]["metadata"]["name"] == "m"


def seen_gateway(ready_replicas: int, progressing_reason: str) -> dict[str, Any]:
    gateway = seen_deployment(1, 1, owns_replicas=True)
    gateway["metadata"].update(name="m-gateway", uid="gateway-uid")
    gateway["status"].update(
        readyReplicas=ready_replicas,
        conditions=[
            {
                "type": "Progressing",
                "status": "True",
                "reason": progressing_reason,
                "message": f"ReplicaSet m-gateway-1 {progressing_reason}",
            }
        ],
    )
    return gateway


async def test_an_async_model_is_not_ready_while_its_gateway_has_no_ready_replica() -> None:
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    await rec.reconcile(body(**{"async": ASYNC}))
    gen = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(gen, 1, owns_replicas=False), deleted=False)
    # The gateway still rolling out: Progressing, naming it.
    observed.record(KEY, seen_gateway(0, "ReplicaSetUpdated"), deleted=False)
    await rec.reconcile(body(**{"async": ASYNC}))
    assert ready(kube)["status"] == "False" and ready(kube)["reason"] == "Progressing"
    assert "async gateway m-gateway has 0/1 replicas ready" in ready(kube)["message"]
    observed.record(KEY, seen_gateway(1, "NewReplicaSetAvailable"), deleted=False)
    await rec.reconcile(body(**{"async": ASYNC}))
    assert ready(kube)["status"] == "True" and ready(kube)["reason"] == "Ready"
    # It had rolled out, and then lost its ready replica: every submission fails.
    observed.record(KEY, seen_gateway(0, "NewReplicaSetAvailable"), deleted=False)
    await rec.reconcile(body(**{"async": ASYNC}))
    assert ready(kube)["status"] == "False" and ready(kube)["reason"] == "GatewayNotReady"
    assert "submissions fail" in ready(kube)["message"]
    assert ("Warning", "GatewayNotReady", ready(kube)["message"]) in kube.events
    # The gateway deleted (the watch says so): not Ready either.
    observed.record(KEY, seen_gateway(0, "NewReplicaSetAvailable"), deleted=True)
    await rec.reconcile(body(**{"async": ASYNC}))
    assert ready(kube)["status"] == "False"
    assert "waiting for the async gateway m-gateway" in ready(kube)["message"]


async def test_an_async_model_name_its_gateway_service_cannot_carry_is_an_invalid_spec() -> None:
    # NAME-gateway is a Service name, a DNS label of at most 63 characters.
    for length, accepted in ((55, True), (56, False)):
        kube = FakeKube()
        named = body(**{"async": ASYNC})
        named["metadata"]["name"] = "m" * length
        await reconciler(kube).reconcile(named)
        names = {(m["kind"], m["metadata"]["name"]) for _, m in kube.applied}
        if accepted:
            assert ("Service", "m" * length + "-gateway") in names
            assert len("m" * length + "-gateway") == 63
        else:
            assert names == set()
            assert ready(kube)["reason"] == "InvalidSpec"
            assert "at most 55 characters when spec.async.enabled" in ready(kube)["message"]


async def test_failure_mode_local_shares_the_limits_among_the_gateway_replicas_too() -> None:
    # Both the model's replicas and the async gateway's admit (charge at submission): with
    # Redis down, failureMode Local gives each process limit / replicas, so "replicas"
    # must count every process that admits, or the tenant gets more than its limit.
    import json

    limit = 100
    policy = {
        "spec": {
            "failureMode": "Local",
            "defaultTenant": {"limits": [{"unit": "requests", "limit": limit, "window": "1m"}]},
            "backend": {"redis": {"url": "redis://r:6379/0"}},
        }
    }
    gateway = {**ASYNC, "gateway": {"replicas": 2}}
    for spec, admitting in (({"async": gateway}, 3 + 2), ({}, 3)):
        kube = FakeKube()
        rec = reconciler(kube)
        rec.policies[("ns", "q")] = policy
        scaling = {"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 3}
        await rec.reconcile(body(quotaPolicy="q", scaling=scaling, **spec))
        (quota,) = [m for _, m in kube.applied if m["kind"] == "ConfigMap"]
        config = json.loads(quota["data"]["config.json"])
        assert config["replicas"] == admitting
        # What all of them together admit while Redis is down stays within the limit.
        assert admitting * (limit // config["replicas"]) <= limit


async def test_a_model_scaled_to_zero_is_ready_and_says_what_wakes_it() -> None:
    """README's reason table: ScaledToZero, READY True, MESSAGE says what wakes the model."""
    kube = FakeKube()
    observed = ObservedChildren()
    rec = reconciler(kube, observed)
    scaling = {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2}
    model = body(**{"async": ASYNC}, scaling=scaling)
    await rec.reconcile(model)
    gen = kube.live[("Deployment", "m")]["metadata"]["generation"]
    observed.record(KEY, seen_deployment(gen, 0, owns_replicas=False), deleted=False)
    observed.record(KEY, seen_gateway(1, "NewReplicaSetAvailable"), deleted=False)
    await rec.reconcile(model)
    cond = ready(kube)
    assert (cond["status"], cond["reason"]) == ("True", "ScaledToZero")
    assert cond["message"] == (
        "scaled to zero; KEDA wakes it when requests are queued in kubeonnx:{ns/m}:requests"
    )
