"""spec.traffic on the local control plane: one Deployment and autoscaler per version, the
router in front, the stable's Deployment and pods untouched while candidates are added,
changed and removed, a promotion keeping the candidate's pods, and an idle resync writing
nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import assert_idle_resync, prepare_namespace, ready, until_reason

pytestmark = pytest.mark.e2e
MODEL_LABEL = "kubeonnx.io/inferencemodel"


def model(name: str, *candidates: dict[str, Any], version: str = "1") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": f"s3://models/{name}/{version}/model.onnx", "version": version},
        "scaling": {"minReplicas": 1, "maxReplicas": 2},
    }
    if candidates:
        spec["traffic"] = {"candidates": list(candidates)}
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": spec,
    }


def candidate(name: str, version: str, **fields: Any) -> dict[str, Any]:
    return {
        "version": version,
        "model": {"uri": f"s3://models/{name}/{version}/model.onnx"},
        **fields,
    }


def apply(cluster: Cluster, doc: dict[str, Any], ns: str) -> None:
    applied = cluster.apply(doc, ns)
    assert applied.returncode == 0, applied.stderr


def kids(cluster: Cluster, ns: str, name: str) -> dict[tuple[str, str], dict[str, Any]]:
    kinds = "deployments,services,horizontalpodautoscalers,configmaps,poddisruptionbudgets"
    found = cluster.get(kinds, "-n", ns, "-l", f"{MODEL_LABEL}={name}") or {}
    return {(o["kind"], o["metadata"]["name"]): o for o in found.get("items", [])}


def pods(cluster: Cluster, ns: str, selector: dict[str, str]) -> dict[str, str]:
    """Running pods selected, name -> UID."""
    labels = ",".join(f"{k}={v}" for k, v in selector.items())
    found = cluster.get("pods", "-n", ns, "-l", labels) or {}
    return {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in found.get("items", [])
        if not p["metadata"].get("deletionTimestamp")
    }


def stable_state(cluster: Cluster, ns: str, name: str) -> tuple[Any, ...]:
    """What a restart or a scale-down of the stable's pods would change."""
    d = cluster.get("deployment", name, "-n", ns) or {}
    return (
        d["metadata"]["generation"],
        d["spec"]["template"],
        d["spec"]["replicas"],
        pods(cluster, ns, d["spec"]["selector"]["matchLabels"]),
    )


def versions(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]] | None:
    im = cluster.get("inferencemodel", name, "-n", ns) or {}
    status = im.get("status") or {}
    if status.get("observedGeneration") != im.get("metadata", {}).get("generation"):
        return None
    return status.get("versions") or []


def test_candidates_come_and_go_without_touching_the_stable(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    prepare_namespace(cluster, namespace)
    apply(cluster, model("tr"), namespace)
    ready(cluster, namespace, "tr")
    stable = stable_state(cluster, namespace, "tr")
    assert stable[3], "the stable's pods"

    apply(cluster, model("tr", candidate("tr", "2", weight=10)), namespace)
    served = eventually(
        lambda: (v := versions(cluster, namespace, "tr")) and v[-1]["weight"] == 10 and v,
        90,
        what="the candidate ready and serving 10%",
    )
    assert [(v["version"], v["role"], v["deployment"]) for v in served] == [
        ("1", "stable", "tr"),
        ("2", "candidate", "tr-v2"),
    ]
    got = kids(cluster, namespace, "tr")
    for kind in ("Deployment", "HorizontalPodAutoscaler", "Service"):
        assert (kind, "tr-v2") in got, kind
    assert got[("HorizontalPodAutoscaler", "tr-v2")]["spec"]["scaleTargetRef"]["name"] == "tr-v2"
    router = got[("Deployment", "tr-router")]
    assert ("ConfigMap", "tr-router") in got
    assert got[("Service", "tr")]["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    assert stable_state(cluster, namespace, "tr") == stable

    # Changed (weight, runtime): the router rolls, the stable does not.
    changed = candidate("tr", "2", weight=40, runtime={"threads": 2})
    apply(cluster, model("tr", changed), namespace)
    eventually(
        lambda: (v := versions(cluster, namespace, "tr")) and v[-1]["desiredWeight"] == 40,
        60,
        what="the new weight",
    )
    assert stable_state(cluster, namespace, "tr") == stable

    # Removed: its children and the router go, the model's Service selects the stable.
    apply(cluster, model("tr"), namespace)
    eventually(
        lambda: (
            not {("Deployment", "tr-v2"), ("Deployment", "tr-router")}
            & set(kids(cluster, namespace, "tr"))
        ),
        60,
        what="the candidate's and the router's Deployments deleted",
    )
    service = kids(cluster, namespace, "tr")[("Service", "tr")]
    assert service["spec"]["selector"] == {MODEL_LABEL: "tr"}
    assert versions(cluster, namespace, "tr") == []
    assert stable_state(cluster, namespace, "tr") == stable


def test_promotion_keeps_the_candidates_pods(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    prepare_namespace(cluster, namespace)
    apply(cluster, model("pr", candidate("pr", "2", weight=50)), namespace)
    eventually(
        lambda: (v := versions(cluster, namespace, "pr")) and all(x["readyReplicas"] for x in v),
        90,
        what="both versions ready",
    )
    before = stable_state(cluster, namespace, "pr-v2")
    assert before[3], "the candidate's pods"

    promoted = model("pr", version="2")
    apply(cluster, promoted, namespace)
    ready(cluster, namespace, "pr")
    eventually(
        lambda: ("Deployment", "pr") not in kids(cluster, namespace, "pr"),
        60,
        what="the old stable's Deployment deleted",
    )
    im = cluster.get("inferencemodel", "pr", "-n", namespace) or {}
    assert im["status"]["version"] == "2" and not im["status"].get("versions")
    assert stable_state(cluster, namespace, "pr-v2") == before  # same pods, no rollout
    got = kids(cluster, namespace, "pr")
    selector = got[("Deployment", "pr-v2")]["spec"]["selector"]["matchLabels"]
    assert got[("Service", "pr")]["spec"]["selector"] == selector
    assert ("Deployment", "pr-router") not in got


def test_an_idle_resync_writes_nothing_with_candidates(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    prepare_namespace(cluster, namespace)
    doc = model("idle", candidate("idle", "2", weight=20, mirrorPercent=10))
    apply(cluster, doc, namespace)
    # Mirrored: nothing is applied until the user makes the mirror Secret.
    cond = until_reason(cluster, namespace, "idle", "MirrorSecretNotFound")
    assert "'idle-mirror'" in cond["message"]
    assert cluster.get("deployment", "idle", "-n", namespace) is None
    cluster.create_secret("idle-mirror", namespace, {"secret": "s" * 32})
    eventually(
        lambda: (v := versions(cluster, namespace, "idle")) and v[-1]["weight"] == 20,
        90,
        what="the candidate serving",
    )
    router = cluster.get("deployment", "idle-router", "-n", namespace) or {}
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEONNX_MIRROR_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "idle-mirror"

    # Controllers write the status of what has one (the HPA's conditions and current
    # metrics, a Deployment's replicas, a PDB's allowed disruptions) at their own pace:
    # those are compared by what the operator writes (spec, labels, annotations); the
    # rest, and the model itself, by resourceVersion. The audit log below counts the
    # operator's writes whatever they touch.
    with_status = {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"}

    def written(kind: str, o: dict[str, Any]) -> str:
        if kind not in with_status:
            return str(o["metadata"]["resourceVersion"])
        meta = o["metadata"]
        return json.dumps(
            [o.get("spec"), meta.get("labels"), meta.get("annotations")], sort_keys=True
        )

    def snapshot() -> tuple[Any, ...]:
        im = cluster.get("inferencemodel", "idle", "-n", namespace) or {}
        found = kids(cluster, namespace, "idle")
        return (
            im["metadata"]["resourceVersion"],
            sorted((k, written(k[0], o)) for k, o in found.items()),
        )

    assert_idle_resync(cluster, operator, namespace, snapshot, settle_s=240)
    columns = cluster.kubectl("get", "inferencemodel", "idle", "-n", namespace).stdout.split("\n")
    header = columns[0].split()
    assert {"VERSION", "CANARY", "PHASE"} <= set(header)
    row = dict(zip(header, columns[1].split(), strict=False))
    assert (row["VERSION"], row["CANARY"]) == ("1", "20")
