"""The asynchronous gateway and the reconciler's error mapping against the real control
plane (tests/operator/test_reconcile.py has the same cases against a stand-in, for speed):
the gateway pruned when async is turned off, a name too long for its Service refused by
CEL, a gateway of a deleted model of the same name waited for, replicas handed over when
keda at zero becomes hpa, and what the API server's refusals become in status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import condition, model, ready, until_reason

pytestmark = pytest.mark.e2e
ASYNC = {"enabled": True, "redis": {"url": "redis://redis.queues:6379/0"}}


def uid(cluster: Cluster, ns: str, kind: str, name: str) -> str | None:
    found = cluster.get(kind, name, "-n", ns)
    return found["metadata"]["uid"] if found else None


def test_turning_async_off_prunes_the_gateway_and_keeps_the_model(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(model("pruned", **{"async": ASYNC}), namespace).returncode == 0
    ready(cluster, namespace, "pruned")
    gateway = {k: uid(cluster, namespace, k, "pruned-gateway") for k in ("deployment", "service")}
    kept = {k: uid(cluster, namespace, k, "pruned") for k in ("deployment", "service")}
    assert all(gateway.values()) and all(kept.values())
    assert cluster.apply(model("pruned"), namespace).returncode == 0
    eventually(
        lambda: not any(uid(cluster, namespace, k, "pruned-gateway") for k in gateway),
        60,
        what="the gateway's Deployment and Service deleted",
    )
    ready(cluster, namespace, "pruned")
    # The model's own Deployment and Service, same kinds, other names: untouched.
    assert {k: uid(cluster, namespace, k, "pruned") for k in kept} == kept
    assert (
        "asyncURL" not in (cluster.get("inferencemodel", "pruned", "-n", namespace) or {})["status"]
    )


def test_an_async_name_too_long_for_the_gateway_service_is_refused_by_cel(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    longest, too_long = "a" * 55, "a" * 56
    proc = cluster.apply(model(too_long, **{"async": ASYNC}), namespace)
    assert proc.returncode != 0
    assert "metadata.name must be at most 55 characters when spec.async.enabled" in proc.stderr
    # Without async the same name is fine (its children are named NAME).
    assert cluster.apply(model(too_long), namespace).returncode == 0
    assert cluster.apply(model(longest, **{"async": ASYNC}), namespace).returncode == 0
    ready(cluster, namespace, longest)
    assert uid(cluster, namespace, "service", f"{longest}-gateway")  # 63 characters


def test_a_gateway_of_a_deleted_model_of_the_same_name_is_waited_for(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(model("again", **{"async": ASYNC}), namespace).returncode == 0
    ready(cluster, namespace, "again")
    # Hold the old gateway Deployment in deletion, as a slow garbage collector would.
    cluster.kubectl(
        "patch",
        "deployment",
        "again-gateway",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":["e2e.kubeonnx.io/hold"]}}',
    )
    old = uid(cluster, namespace, "inferencemodel", "again")
    cluster.kubectl("delete", "inferencemodel", "again", "-n", namespace, "--wait=false")
    eventually(
        lambda: (
            (cluster.get("deployment", "again-gateway", "-n", namespace) or {})
            .get("metadata", {})
            .get("deletionTimestamp")
        ),
        60,
        what="the old gateway Deployment being deleted",
    )
    eventually(
        lambda: uid(cluster, namespace, "inferencemodel", "again") != old, 30, what="old model gone"
    )
    assert cluster.apply(model("again", **{"async": ASYNC}), namespace).returncode == 0
    eventually(
        lambda: (
            "waiting for the garbage collector to delete Deployment again-gateway"
            in (cond := condition(cluster, namespace, "again")).get("message", "")
            and cond
        ),
        60,
        what="Progressing, waiting for the old gateway",
    )
    assert condition(cluster, namespace, "again")["reason"] != "ChildConflict"
    cluster.kubectl(
        "patch",
        "deployment",
        "again-gateway",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
    )
    ready(cluster, namespace, "again", timeout=90)
    new = uid(cluster, namespace, "inferencemodel", "again")
    gateway = cluster.get("deployment", "again-gateway", "-n", namespace) or {}
    assert [r["uid"] for r in gateway["metadata"]["ownerReferences"]] == [new]


def test_keda_at_zero_replicas_switched_to_hpa_comes_back_to_min_replicas(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    keda = {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 4}
    assert (
        cluster.apply(model("woken", scaling=keda, **{"async": ASYNC}), namespace).returncode == 0
    )
    eventually(
        lambda: uid(cluster, namespace, "scaledobject.keda.sh", "woken"), 60, what="ScaledObject"
    )
    # What KEDA does to an idle model (no KEDA runs here): the Deployment at 0 replicas.
    cluster.kubectl("scale", "deployment", "woken", "-n", namespace, "--replicas=0")
    until_reason(cluster, namespace, "woken", "ScaledToZero")
    hpa = {"autoscaler": "hpa", "minReplicas": 2, "maxReplicas": 4}
    assert cluster.apply(model("woken", scaling=hpa, **{"async": ASYNC}), namespace).returncode == 0
    eventually(
        lambda: (
            (cluster.get("deployment", "woken", "-n", namespace) or {})["spec"]["replicas"] >= 2
        ),
        60,
        what="the Deployment back at minReplicas",
    )
    ready(cluster, namespace, "woken", timeout=90)
    assert not uid(cluster, namespace, "scaledobject.keda.sh", "woken")


def vap(name: str, namespace: str, expression: str, message: str) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy (and its binding) refusing Services in `namespace`."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["services"],
                        }
                    ]
                },
                "validations": [
                    {"expression": expression, "message": message, "reason": "Invalid"}
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
                },
            },
        },
    ]


def test_what_the_api_server_refuses_becomes_a_reason_in_status(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    # The API server's own validation refusing what the spec made (a request above its
    # limit passes the CRD's schema, not the Deployment's): 422, InvalidSpec.
    resources = {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}
    assert cluster.apply(model("bounds", resources=resources), namespace).returncode == 0
    cond = until_reason(cluster, namespace, "bounds", "InvalidSpec")
    assert cond["message"].startswith("Deployment refused: ")
    assert "must be less than or equal to cpu limit" in cond["message"]
    # A ValidatingAdmissionPolicy's refusal is the cluster's policy, not the spec: also a
    # 422, but ReconcileError with the API's message (and retried).
    name = f"{namespace}-no-services"
    policy = vap(name, namespace, "false", "no Services here")
    try:
        for doc in policy:
            assert cluster.apply(doc, namespace).returncode == 0
        # Probe with a server-side dry-run create: it always reaches admission and is never
        # stored. (An apply of a stored probe would come back "unchanged" without asking the
        # API server, so a probe created before the policy took effect never saw it.)
        probe = json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "probe"},
                "spec": {"ports": [{"port": 80}]},
            }
        )
        eventually(
            lambda: (
                "no Services here"
                in cluster.kubectl(
                    "create",
                    "--dry-run=server",
                    "-n",
                    namespace,
                    "-f",
                    "-",
                    input=probe,
                    check=False,
                ).stderr
            ),
            60,
            what="the admission policy in force",
        )
        assert cluster.apply(model("policed"), namespace).returncode == 0
        cond = until_reason(cluster, namespace, "policed", "ReconcileError")
        assert "ValidatingAdmissionPolicy" in cond["message"]
        assert "no Services here" in cond["message"]
    finally:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            cluster.kubectl("delete", kind, name, check=False)
    ready(cluster, namespace, "policed", timeout=120)  # retried with backoff, then served
