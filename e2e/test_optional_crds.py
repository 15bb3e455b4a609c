"""A cluster without an optional CRD (KEDA's ScaledObject): the API answers a text/plain
404 for the whole group, and the model shows KedaNotInstalled instead of retrying without
a status. Once KEDA is installed, the next resync creates the ScaledObject.

The CRD is deleted for this test and put back however it ends, on the local control plane
only (the suite's other tests run after it, in the same cluster, and need it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import children, condition, model, until_reason

pytestmark = pytest.mark.e2e
KEDA_CRD = Path(__file__).resolve().parent / "manifests" / "keda-scaledobject-crd.yaml"


def keda_served(cluster: Cluster) -> bool:
    return cluster.kubectl("get", "--raw", "/apis/keda.sh/v1alpha1", check=False).returncode == 0


def install_keda(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(KEDA_CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/scaledobjects.keda.sh"
    )
    eventually(lambda: keda_served(cluster), 60, what="keda.sh/v1alpha1 served")


@pytest.fixture
def without_keda(cluster: Cluster) -> Iterator[None]:
    if not cluster.local:
        pytest.skip("deletes a cluster-wide CRD: only on the local control plane")
    cluster.kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=true", "--timeout=60s")
    try:
        eventually(lambda: not keda_served(cluster), 60, what="keda.sh no longer served")
        yield
    finally:
        if not keda_served(cluster):
            install_keda(cluster)


def test_a_keda_model_without_keda_shows_keda_not_installed(
    cluster: Cluster, operator: OperatorProcess, namespace: str, without_keda: None
) -> None:
    scaling = {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}
    assert cluster.apply(model("scaled", scaling=scaling), namespace).returncode == 0
    cond = until_reason(cluster, namespace, "scaled", "KedaNotInstalled")
    assert cond["status"] == "False"
    assert "keda.sh/v1alpha1 ScaledObject" in cond["message"]
    # The rest is served meanwhile.
    served = cluster.get(
        "deployments,services", "-n", namespace, "-l", "kubeonnx.io/inferencemodel=scaled"
    )
    assert {o["kind"] for o in (served or {}).get("items", [])} == {"Deployment", "Service"}

    install_keda(cluster)
    eventually(
        lambda: "ScaledObject" in children(cluster, namespace, "scaled"),
        90,
        what="the ScaledObject once KEDA is installed",
    )
    eventually(
        lambda: condition(cluster, namespace, "scaled").get("reason") != "KedaNotInstalled",
        60,
        what="a reason other than KedaNotInstalled",
    )
