"""The operator as a platform team runs it: it never takes over what it does not own, API
refusals show in status, replicas survive an autoscaler switch, a standby takes over from
a killed leader, and the user's object gets nothing but status."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import children, model, ready, resyncs, until_reason

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def events(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    found = cluster.get(
        "events",
        "-n",
        ns,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=InferenceModel",
    )
    return (found or {}).get("items", [])


def test_a_users_service_of_the_same_name_is_never_taken_over(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    users = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "taken", "labels": {"team": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
    }
    assert cluster.apply(users, namespace).returncode == 0
    assert cluster.apply(model("taken"), namespace).returncode == 0
    cond = until_reason(cluster, namespace, "taken", "ChildConflict")
    assert (
        "Service taken already exists and is not managed by this InferenceModel" in cond["message"]
    )
    service = cluster.get("service", "taken", "-n", namespace) or {}
    assert service["spec"]["selector"] == {"app": "web"}
    assert not service["metadata"].get("ownerReferences")
    # The rest is served; kubectl describe tells the story.
    assert "Deployment" in children(cluster, namespace, "taken")
    eventually(
        lambda: any(
            e["reason"] == "ChildConflict" and e["type"] == "Warning"
            for e in events(cluster, namespace, "taken")
        ),
        20,
        what="a Warning Event ChildConflict",
    )
    # Deleting the model leaves the user's Service alone.
    deployment_uid = (cluster.get("deployment", "taken", "-n", namespace) or {})["metadata"]["uid"]
    cluster.kubectl("delete", "inferencemodel", "taken", "-n", namespace)
    # Once the garbage collector has removed the model's own Deployment, it has been
    # through the model's dependents.
    eventually(
        lambda: (
            (cluster.get("deployment", "taken", "-n", namespace) or {})
            .get("metadata", {})
            .get("uid")
            != deployment_uid
        ),
        60,
        what="the garbage collector to delete the model's Deployment",
    )
    assert (cluster.get("service", "taken", "-n", namespace) or {}).get("spec", {}).get(
        "selector"
    ) == {"app": "web"}


def test_an_api_refusal_is_shown_in_status_with_the_apis_message(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-services"},
        "spec": {"hard": {"services": "0"}},
    }
    assert cluster.apply(quota, namespace).returncode == 0
    # The quota controller fills status.used before the quota admission refuses anything.
    eventually(
        lambda: (
            "services"
            in (
                (cluster.get("resourcequota", "no-services", "-n", namespace) or {}).get("status")
                or {}
            ).get("used", {})
        ),
        30,
        what="the ResourceQuota's status.used",
    )
    assert cluster.apply(model("refused"), namespace).returncode == 0
    cond = until_reason(cluster, namespace, "refused", "ReconcileError")
    assert "API error 403" in cond["message"] and "exceeded quota: no-services" in cond["message"]
    cluster.kubectl("delete", "resourcequota", "no-services", "-n", namespace)
    ready(cluster, namespace, "refused", timeout=90)  # retried with backoff, then served


def test_switching_from_no_autoscaler_to_hpa_keeps_the_replicas(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    fixed = model("handover", scaling={"autoscaler": "none", "minReplicas": 3, "maxReplicas": 3})
    assert cluster.apply(fixed, namespace).returncode == 0
    ready(cluster, namespace, "handover")
    scaled = model("handover", scaling={"autoscaler": "hpa", "minReplicas": 1, "maxReplicas": 5})
    assert cluster.apply(scaled, namespace).returncode == 0
    eventually(
        lambda: "HorizontalPodAutoscaler" in children(cluster, namespace, "handover"),
        30,
        what="the HPA",
    )
    ready(cluster, namespace, "handover")
    for _ in range(6):  # not 1 (the apiserver's default for a dropped field), now or later
        deployment = cluster.get("deployment", "handover", "-n", namespace) or {}
        assert deployment["spec"]["replicas"] == 3
        time.sleep(1)


def test_the_user_object_gets_nothing_but_status(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    # Applied as Argo CD applies it: server-side, under a manager of its own.
    cluster.kubectl(
        "apply",
        "--server-side",
        "--field-manager=argocd-controller",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(model("gitops", scaling={"maxReplicas": 2})),
    )
    ready(cluster, namespace, "gitops")
    resyncs(operator, 1)
    im = cluster.get("inferencemodel", "gitops", "-n", namespace, "--show-managed-fields") or {}
    meta = im["metadata"]
    assert not meta.get("annotations") and not meta.get("finalizers")
    assert not meta.get("labels") and not meta.get("ownerReferences")
    for entry in meta["managedFields"]:
        if entry["manager"] != "argocd-controller":
            assert entry.get("subresource") == "status", entry


def test_operator_metrics_readiness_and_pod_monitor(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    import urllib.request

    assert cluster.apply(model("observed"), namespace).returncode == 0
    ready(cluster, namespace, "observed")
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/readyz") as response:
        assert response.status == 200
    metrics = operator.metrics()
    assert metrics['kubeonnx_operator_reconciles_total{kind="InferenceModel",result="ok"}'] > 0
    assert metrics['kubeonnx_operator_watched_objects{resource="InferenceModel"}'] >= 1
    assert metrics["kubeonnx_operator_leader"] == 1
    assert 'kubeonnx_operator_reconcile_duration_seconds_count{kind="InferenceModel"}' in metrics
    # The test cluster has the PodMonitor CRD: the runtime's metrics are scraped.
    monitor = eventually(
        lambda: cluster.get("podmonitor", "observed", "-n", namespace), 20, what="the PodMonitor"
    )
    assert monitor["spec"]["selector"]["matchLabels"] == {"kubeonnx.io/inferencemodel": "observed"}


def test_a_standby_takes_over_when_the_leader_is_killed(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    standby = OperatorProcess(cluster.operator_kubeconfig or cluster.kubeconfig, tmp_path)
    standby.env["POD_NAME"] = f"standby-{namespace}"  # its identity, sent as its User-Agent
    standby.start()
    try:
        eventually(operator.leads, 30, what="the first operator leading")
        assert cluster.apply(model("ha-one"), namespace).returncode == 0
        ready(cluster, namespace, "ha-one")
        time.sleep(6)  # a resync on both
        # No writes while both run: by its own count (metrics() fails if it cannot be read)
        # and by the API server's audit log, which names the writer.
        assert not standby.leads() and standby.writes() == 0
        if cluster.audit_log is not None:
            standby_writes = [
                json.loads(line)
                for line in cluster.audit_log.read_text().splitlines()
                if f"(standby-{namespace}_" in line
            ]
            assert standby_writes == [], standby_writes
        eventually(
            lambda: (
                standby.metrics().get(
                    'kubeonnx_operator_watched_objects{resource="InferenceModel"}', 0
                )
                >= 1
            ),
            20,
            what="the standby's warm cache",
        )
        operator.stop(signal.SIGKILL)
        killed = time.monotonic()
        assert cluster.apply(model("ha-two"), namespace).returncode == 0
        # The promise (README): the standby leads 15-19 s after the leader's last renewal:
        # 15 s of an unchanged Lease by the standby's own clock, counted from when it first
        # saw that renewal (up to one 2 s retry late), then up to one more retry. The bound
        # below is those 19 s plus 6 s for a loaded test machine; the bound on Ready adds a
        # reconcile.
        eventually(standby.leads, 19 + 6, what="the standby leading")
        ready(cluster, namespace, "ha-two", timeout=30)
        assert time.monotonic() - killed < 19 + 6
        assert "Deployment" in children(cluster, namespace, "ha-two")
    finally:
        operator.start()  # the module's operator, standing by now
        standby.stop()  # SIGTERM: it hands the Lease back
        eventually(operator.leads, 30, what="the module's operator leading again")


def test_a_prune_by_uid_never_deletes_an_object_re_created_under_the_name(
    cluster: Cluster, namespace: str
) -> None:
    import asyncio

    from kubeonnx_operator.kube import Kube
    from lightkube import AsyncClient
    from lightkube.config.kubeconfig import KubeConfig

    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "again"},
        "spec": {"ports": [{"port": 80}]},
    }
    assert cluster.apply(service, namespace).returncode == 0
    old_uid = cluster.get("service", "again", "-n", namespace)["metadata"]["uid"]  # type: ignore[index]
    cluster.kubectl("delete", "service", "again", "-n", namespace)
    assert cluster.apply(service, namespace).returncode == 0  # re-created: a new UID

    async def prune() -> None:
        client = AsyncClient(KubeConfig.from_file(cluster.kubeconfig))
        try:
            await Kube(client).delete("v1", "Service", namespace, "again", uid=old_uid)
        finally:
            await client.close()

    asyncio.run(prune())
    assert cluster.get("service", "again", "-n", namespace), "the new Service was deleted"
