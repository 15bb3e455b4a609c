"""The HorizontalPodAutoscaler the operator renders for `autoscaler: hpa`, driven for real: kwok
reports the model's pods' CPU (its ResourceUsage, from each pod's kwok.x-k8s.io/usage-cpu
annotation), metrics-server (the pinned build) serves it as metrics.k8s.io through
kube-apiserver's aggregation layer, and the real kube-controller-manager's HPA controller
scales the model's Deployment up. Needs the local control plane (kwok's nodes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.metrics_server import LocalMetricsServer
from e2e.operator_process import OperatorProcess
from e2e.test_operator import model, ready

pytestmark = pytest.mark.e2e

NAME = "cpu-scaled"
REQUEST_CPU = "500m"
TARGET = 70  # percent of the request
BUSY = "900m"  # 180% of the request: over the target


@pytest.fixture(scope="module")
def metrics_server(cluster: Cluster) -> Iterator[LocalMetricsServer]:
    if not cluster.local:
        pytest.skip("kwok's usage and our own metrics-server need the local control plane")

    def kubectl(*args: str, input: str | None = None) -> Any:
        return cluster.kubectl(*args, input=input, check=False)

    server = LocalMetricsServer(cluster.kubeconfig, kubectl)
    try:
        yield server.start()
    finally:
        print(server.logs())  # shown with a failure
        server.stop()


def pods(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    found = cluster.get("pods", "-n", ns, "-l", f"kubeonnx.io/inferencemodel={NAME}")
    return list((found or {}).get("items", []))


def pod_cpu(cluster: Cluster, ns: str) -> dict[str, int]:
    """Each pod's CPU in millicores as metrics.k8s.io reports it (through the aggregator)."""
    raw = cluster.kubectl(
        "get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods", check=False
    )
    if raw.returncode != 0:
        return {}
    out = {}
    for item in json.loads(raw.stdout)["items"]:
        cpu = sum(_millicores(c["usage"]["cpu"]) for c in item["containers"])
        out[item["metadata"]["name"]] = cpu
    return out


def _millicores(q: str) -> int:
    if q.endswith("n"):
        return int(q[:-1]) // 1_000_000
    if q.endswith("u"):
        return int(q[:-1]) // 1_000
    if q.endswith("m"):
        return int(q[:-1])
    return int(float(q) * 1000)


def test_the_hpa_scales_the_deployment_up_on_reported_cpu(
    cluster: Cluster,
    operator: OperatorProcess,
    metrics_server: LocalMetricsServer,
    namespace: str,
) -> None:
    spec = {
        "resources": {"requests": {"cpu": REQUEST_CPU, "memory": "128Mi"}},
        "scaling": {
            "autoscaler": "hpa",
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetCPUUtilization": TARGET,
        },
    }
    applied = cluster.apply(model(NAME, **spec), namespace)
    assert applied.returncode == 0, applied.stderr
    ready(cluster, namespace, NAME, timeout=120)
    hpa = cluster.get("hpa", NAME, "-n", namespace)
    assert hpa is not None
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == TARGET
    (first,) = pods(cluster, namespace)
    name = first["metadata"]["name"]

    # Idle (kwok's default usage, 1m): metrics.k8s.io reports the pod, and the HPA keeps one.
    def reported() -> tuple[int] | None:
        cpu = pod_cpu(cluster, namespace).get(name)
        return None if cpu is None else (cpu,)

    (idle,) = eventually(reported, 120, what=f"metrics.k8s.io reports {name}")
    assert idle < 50, idle

    # Busy: the pod uses 900m of its 500m request (180% against a 70% target).
    cluster.kubectl("annotate", "pod", name, "-n", namespace, f"kwok.x-k8s.io/usage-cpu={BUSY}")
    eventually(
        lambda: pod_cpu(cluster, namespace).get(name, 0) > 700,
        120,
        what=f"metrics.k8s.io reports {name} busy",
    )

    def scaled() -> dict[str, Any] | None:
        h = cluster.get("hpa", NAME, "-n", namespace) or {}
        status = h.get("status") or {}
        deployment = cluster.get("deployment", NAME, "-n", namespace) or {}
        if status.get("desiredReplicas", 0) > 1 and deployment["spec"]["replicas"] > 1:
            return {"hpa": status, "deployment": deployment}
        return None

    got = eventually(scaled, 240, what=f"the HPA scales {NAME} up")
    hpa_status = got["hpa"]
    # The HPA read the utilization metrics-server reported: over the target.
    (current,) = hpa_status["currentMetrics"]
    assert current["resource"]["current"]["averageUtilization"] > TARGET, hpa_status
    # 180% of the request over a 70% target: ceil(1 * 180 / 70) = 3 (its maximum).
    assert got["deployment"]["spec"]["replicas"] == 3, hpa_status
    # And the operator leaves the replicas the HPA set alone.
    ready(cluster, namespace, NAME, timeout=120)
    deployment = cluster.get("deployment", NAME, "-n", namespace)
    assert deployment is not None and deployment["spec"]["replicas"] == 3
