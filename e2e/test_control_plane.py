"""Smoke tests that prove the control plane is real: scheduling, CEL, garbage collection."""

from __future__ import annotations

import pytest

from e2e.conftest import Cluster, eventually

pytestmark = pytest.mark.e2e

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_deployment(name: str, gpus: int) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [GPU_TOLERATION],
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.invalid/smoke:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }


def pods_of(cluster: Cluster, namespace: str, app: str) -> list[dict]:
    pods = cluster.get("pods", "-n", namespace, "-l", f"app={app}")
    return pods["items"] if pods else []


def test_gpu_pod_becomes_available_on_a_gpu_node(cluster: Cluster, namespace: str) -> None:
    assert cluster.apply(gpu_deployment("one-gpu", 1), namespace).returncode == 0
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "--timeout=60s", "deployment/one-gpu"
    )
    (pod,) = pods_of(cluster, namespace, "one-gpu")
    node = cluster.get("node", pod["spec"]["nodeName"])
    assert node is not None
    assert node["metadata"]["labels"].get("nvidia.com/gpu.present") == "true"
    assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) >= 1


def test_too_many_gpus_stays_pending_with_the_schedulers_message(
    cluster: Cluster, namespace: str
) -> None:
    assert cluster.apply(gpu_deployment("greedy", 64), namespace).returncode == 0

    def unschedulable() -> str | None:
        for pod in pods_of(cluster, namespace, "greedy"):
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return str(cond["message"])
        return None

    message = eventually(unschedulable, 60, what="an Unschedulable pod")
    assert "Insufficient nvidia.com/gpu" in message
    (pod,) = pods_of(cluster, namespace, "greedy")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


CEL_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.smoke.kubeonnx.io}
spec:
  group: smoke.kubeonnx.io
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: self.min <= self.max
              message: spec.min must not be greater than spec.max
            properties:
              min: {type: integer}
              max: {type: integer}
"""


def test_cel_rule_refuses_an_object_that_breaks_it(cluster: Cluster, namespace: str) -> None:
    assert cluster.apply(CEL_CRD).returncode == 0
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/widgets.smoke.kubeonnx.io"
    )
    try:
        good = {
            "apiVersion": "smoke.kubeonnx.io/v1",
            "kind": "Widget",
            "metadata": {"name": "good"},
            "spec": {"min": 1, "max": 2},
        }
        bad = {**good, "metadata": {"name": "bad"}, "spec": {"min": 3, "max": 2}}
        ok = eventually(
            lambda: cluster.apply(good, namespace).returncode == 0,
            30,
            what="the Widget API to serve",
        )
        assert ok
        refused = cluster.apply(bad, namespace)
        assert refused.returncode != 0
        assert "spec.min must not be greater than spec.max" in refused.stderr
        assert cluster.get("widget", "bad", "-n", namespace) is None
    finally:
        cluster.kubectl("delete", "crd", "widgets.smoke.kubeonnx.io", "--wait=false", check=False)


def test_deleting_an_owner_garbage_collects_its_dependent(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner = cluster.get("configmap", "owner", "-n", namespace)
    assert owner is not None
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
    }
    assert cluster.apply(dependent, namespace).returncode == 0
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    eventually(
        lambda: cluster.get("configmap", "dependent", "-n", namespace) is None,
        60,
        what="the dependent to be garbage-collected",
    )
