"""The operator against the real control plane: children, status, drift, restarts, CEL."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CHILD_KINDS = ",".join(
    [
        "deployments",
        "services",
        "horizontalpodautoscalers",
        "scaledobjects.keda.sh",
        "ingresses",
        "poddisruptionbudgets",
    ]
)


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": f"s3://models/{name}/model.onnx"}, **spec},
    }


def ready(cluster: Cluster, ns: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        im = cluster.get("inferencemodel", name, "-n", ns)
        if not im:
            return None
        status = im.get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions", [])}
        gen = im["metadata"]["generation"]
        if (
            conds.get("Ready", {}).get("status") == "True"
            and status.get("observedGeneration") == gen
        ):
            return im
        return None

    return eventually(check, timeout, what=f"InferenceModel {ns}/{name} Ready")


def condition(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    im = cluster.get("inferencemodel", name, "-n", ns) or {}
    return {c["type"]: c for c in (im.get("status") or {}).get("conditions", [])}.get("Ready", {})


def until_reason(cluster: Cluster, ns: str, name: str, reason: str) -> dict[str, Any]:
    """The model's Ready condition once its reason is `reason` (60 s at most)."""
    return eventually(
        lambda: (c := condition(cluster, ns, name)).get("reason") == reason and c,
        60,
        what=f"InferenceModel {ns}/{name} reason {reason}",
    )


def children(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    found = cluster.get(CHILD_KINDS, "-n", ns, "-l", f"kubeonnx.io/inferencemodel={name}")
    return {o["kind"]: o for o in (found or {}).get("items", [])}


def settled(cluster: Cluster, ns: str, name: str) -> None:
    """Wait until the model's Deployment has rolled out and the model's status says so: no
    pod or Deployment change is left to reconcile."""

    def check() -> bool:
        im = cluster.get("inferencemodel", name, "-n", ns) or {}
        d = cluster.get("deployment", name, "-n", ns) or {}
        status, replicas = d.get("status", {}), d.get("spec", {}).get("replicas")
        rolled_out = status.get("observedGeneration") == d.get("metadata", {}).get(
            "generation"
        ) and replicas == status.get("updatedReplicas") == status.get(
            "readyReplicas"
        ) == status.get("availableReplicas") == status.get("replicas")
        im_status = im.get("status", {})
        return (
            rolled_out
            and im_status.get("observedGeneration") == im["metadata"]["generation"]
            and im_status.get("replicaSummary") == f"{replicas}/{replicas}"
        )

    eventually(check, 60, what=f"{name}'s Deployment and status to settle")


def assert_idle_resync(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    snapshot: Callable[[], Any],
    settle_s: float = 240,
) -> None:
    """Once a resync changes nothing `snapshot` sees, two more resyncs change nothing either
    and (where the audit log is on) the operator sends no write to `namespace`."""

    def settled() -> Any:
        first = snapshot()
        resyncs(operator, 1)
        return first if snapshot() == first else None

    before = eventually(settled, settle_s, interval=0, what="nothing left to reconcile")
    writes = cluster.operator_writes(namespace) if cluster.audit_log else None
    resyncs(operator, 2)
    assert snapshot() == before
    if writes is not None:
        assert cluster.operator_writes(namespace) == writes


def resyncs(operator: OperatorProcess, rounds: int) -> None:
    """Wait until the operator has re-run the reconcile of every model it watches `rounds`
    times more (its resync; counted from its own metrics, not a clock)."""

    def counts() -> tuple[float, float] | None:
        found = operator.metrics()  # empty while it does not answer
        done = found.get('kubeonnx_operator_reconciles_total{kind="InferenceModel",result="ok"}')
        models = found.get('kubeonnx_operator_watched_objects{resource="InferenceModel"}')
        return (done, models) if done is not None and models else None

    start, models = eventually(counts, 30, what="the operator's metrics")

    def advanced() -> bool:
        now = counts()
        return now is not None and now[0] >= start + rounds * models

    eventually(advanced, 60 * rounds, what=f"{rounds} resyncs of {models:.0f} models")


def prepare_namespace(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "serviceaccount", "model-reader", "-n", ns)
    cluster.create_secret(
        "s3-credentials", ns, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    )


def test_every_example_is_served_with_the_right_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    prepare_namespace(cluster, namespace)
    for path in EXAMPLES:
        applied = cluster.apply(path.read_text(), namespace)
        assert applied.returncode == 0, applied.stderr
    names = [
        d["metadata"]["name"]
        for p in EXAMPLES
        for d in yaml.safe_load_all(p.read_text())
        if d and d["kind"] == "InferenceModel"
    ]
    for name in names:
        im = ready(cluster, namespace, name)
        uid = im["metadata"]["uid"]
        kids = children(cluster, namespace, name)
        assert {"Deployment", "Service"} <= set(kids)
        for kid in kids.values():
            (ref,) = kid["metadata"]["ownerReferences"]
            assert ref["uid"] == uid and ref["controller"] is True
        assert im["status"]["url"] == (
            f"http://{name}.{namespace}.svc.cluster.local/v2/models/{name}"
        )

    cpu = children(cluster, namespace, "mlp-cpu")
    assert cpu["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 3
    assert "ScaledObject" not in cpu

    gpu = children(cluster, namespace, "resnet-gpu")
    assert gpu["ScaledObject"]["spec"]["minReplicaCount"] == 0
    assert "HorizontalPodAutoscaler" not in gpu
    pods = cluster.get("pods", "-n", namespace, "-l", "kubeonnx.io/inferencemodel=resnet-gpu")
    assert pods and pods["items"]
    for pod in pods["items"]:
        node = cluster.get("node", pod["spec"]["nodeName"])
        assert (
            node and node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        )
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"

    public = children(cluster, namespace, "mlp-public")
    ingress = public["Ingress"]["spec"]
    assert ingress["tls"][0]["secretName"] == "models-example-com-tls"
    assert public["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    im = cluster.get("inferencemodel", "mlp-public", "-n", namespace)
    assert (
        im
        and im["status"]["externalURL"]
        == f"https://models.example.com/models/{namespace}/mlp-public"
    )

    # The asynchronous model: a gateway whose pods its own Deployment and Service do not
    # select, submissions routed to it, and KEDA scaling the model from zero on the queue.
    scorer = {
        (o["kind"], o["metadata"]["name"]): o
        for o in (
            cluster.get(
                CHILD_KINDS, "-n", namespace, "-l", "kubeonnx.io/inferencemodel=batch-scorer"
            )
            or {}
        ).get("items", [])
    }
    gateway = scorer[("Deployment", "batch-scorer-gateway")]
    assert (
        scorer[("Service", "batch-scorer-gateway")]["spec"]["selector"]
        == (gateway["spec"]["selector"]["matchLabels"])
    )
    gateway_pods = eventually(
        lambda: (
            cluster.get("pods", "-n", namespace, "-l", "kubeonnx.io/async-gateway=batch-scorer")
            or {}
        ).get("items"),
        60,
        what="the gateway's pod",
    )
    model_pods = cluster.get(
        "pods", "-n", namespace, "-l", "kubeonnx.io/inferencemodel=batch-scorer"
    )
    assert model_pods and {p["metadata"]["name"] for p in model_pods["items"]}.isdisjoint(
        p["metadata"]["name"] for p in gateway_pods
    )
    (queue,) = [
        t
        for t in scorer[("ScaledObject", "batch-scorer")]["spec"]["triggers"]
        if t["type"] == "redis-streams"
    ]
    assert queue["metadata"]["stream"] == f"kubeonnx:{{{namespace}/batch-scorer}}:requests"
    assert scorer[("ScaledObject", "batch-scorer")]["spec"]["minReplicaCount"] == 0
    routes = {
        p["path"]: p["backend"]["service"]["name"]
        for p in scorer[("Ingress", "batch-scorer")]["spec"]["rules"][0]["http"]["paths"]
    }
    prefix = f"/models/{namespace}/batch-scorer/v2/models/batch-scorer"
    assert (
        routes[f"{prefix}/async-infer"] == routes[f"{prefix}/requests"] == ("batch-scorer-gateway")
    )
    im = cluster.get("inferencemodel", "batch-scorer", "-n", namespace)
    assert im and im["status"]["asyncURL"] == (
        f"http://batch-scorer-gateway.{namespace}.svc.cluster.local/v2/models/batch-scorer/"
        "async-infer"
    )

    # The image classifier: its labels ConfigMap mounted, its processing in the environment.
    classifier = children(cluster, namespace, "classifier")["Deployment"]
    pod = classifier["spec"]["template"]["spec"]
    labels = next(v for v in pod["volumes"] if v["name"] == "labels")["configMap"]
    assert labels["name"] == "classifier-labels"
    assert labels["items"] == [{"key": "labels.txt", "path": "labels.txt"}]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert json.loads(env["KUBEONNX_PROCESSING"])["input"]["image"]["size"] == [224, 224]

    def table() -> dict[str, dict[str, str]]:
        """`kubectl get im`, each row by column (an unset value is blank)."""
        out = cluster.kubectl("get", "inferencemodels", "-n", namespace).stdout
        header, *rows = out.splitlines()
        names = header.split()
        assert names == [
            *("NAME", "READY", "REASON", "REPLICAS", "VERSION", "CANARY", "PHASE"),
            *("GPU", "MODE", "URL", "AGE"),
        ]
        starts = [header.index(f"{n} ") if n != "AGE" else header.rindex(n) for n in names]
        cells = [slice(a, b) for a, b in zip(starts, [*starts[1:], None], strict=True)]
        return {
            r.split()[0]: {n: r[c].strip() for n, c in zip(names, cells, strict=True)} for r in rows
        }

    by_name = table()
    columns = ("READY", "REASON", "REPLICAS", "VERSION", "CANARY", "PHASE", "GPU", "MODE")
    row = by_name["resnet-gpu"]
    assert [row[c] for c in columns] == ["True", "Ready", "1/1", "1", "", "", "1", "sync"]
    row = by_name["mlp-cpu"]
    assert [row[c] for c in columns] == ["True", "Ready", "1/1", "1", "", "", "0", "sync"]
    assert by_name["batch-scorer"]["MODE"] == "async"
    assert by_name["classifier"]["MODE"] == "image"
    # The canary: the stable version, and the candidate's share once it has a ready replica.
    eventually(lambda: table()["mlp-canary"]["CANARY"] == "10", 60, what="the canary's 10%")
    assert table()["ranker"]["VERSION"] == "a"


def test_spec_change_rolls_the_deployment_and_advances_observed_generation(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(model("roll"), namespace).returncode == 0
    first = ready(cluster, namespace, "roll")
    before = children(cluster, namespace, "roll")["Deployment"]
    assert cluster.apply(model("roll", runtime={"maxBatchSize": 8}), namespace).returncode == 0
    after_im = ready(cluster, namespace, "roll")
    assert after_im["status"]["observedGeneration"] == first["metadata"]["generation"] + 1
    after = children(cluster, namespace, "roll")["Deployment"]
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    env = {
        e["name"]: e.get("value") for e in after["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBEONNX_MAX_BATCH_SIZE"] == "8"
    rs = cluster.get("replicasets", "-n", namespace, "-l", "kubeonnx.io/inferencemodel=roll")
    assert rs and len(rs["items"]) == 2


def test_autoscaler_switch_and_ingress_disable_remove_stale_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ing = {"enabled": True, "host": "h.example"}
    assert (
        cluster.apply(
            model("switch", ingress=ing, scaling={"maxReplicas": 2}), namespace
        ).returncode
        == 0
    )
    ready(cluster, namespace, "switch")
    assert {"HorizontalPodAutoscaler", "Ingress", "PodDisruptionBudget"} <= set(
        children(cluster, namespace, "switch")
    )
    keda = {"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 2}
    assert cluster.apply(model("switch", scaling=keda), namespace).returncode == 0

    def switched() -> set[str] | None:
        kinds = set(children(cluster, namespace, "switch"))
        ok = "ScaledObject" in kinds and not kinds & {"HorizontalPodAutoscaler", "Ingress"}
        return kinds if ok else None

    eventually(switched, 30, what="the HPA and Ingress to be replaced")


def test_a_child_deleted_or_edited_by_hand_comes_back(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(model("drift"), namespace).returncode == 0
    ready(cluster, namespace, "drift")
    cluster.kubectl("delete", "service", "drift", "-n", namespace)
    eventually(
        lambda: cluster.get("service", "drift", "-n", namespace),
        15,
        what="the Service to be restored",
    )
    cluster.kubectl(
        "patch",
        "deployment",
        "drift",
        "-n",
        namespace,
        "--type=json",
        "-p",
        json.dumps(
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/image",
                    "value": "evil/image:1",
                }
            ]
        ),
    )

    def image() -> str | None:
        d = cluster.get("deployment", "drift", "-n", namespace) or {}
        img = d["spec"]["template"]["spec"]["containers"][0]["image"]
        return img if img != "evil/image:1" else None

    assert eventually(image, 15, what="the Deployment edit to be reverted").startswith("ghcr.io/")


def test_unchanged_models_are_not_written_again(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(model("still", scaling={"maxReplicas": 2}), namespace).returncode == 0
    ready(cluster, namespace, "still")
    eventually(lambda: cluster.get("pdb", "still", "-n", namespace), 10, what="the PDB")

    def versions() -> dict[str, Any]:
        # Controllers write status (the HPA's, the PDB's); what must not move is the
        # InferenceModel itself and what the kubeonnx field manager last wrote to each child.
        found = (
            cluster.get(
                CHILD_KINDS,
                "-n",
                namespace,
                "-l",
                "kubeonnx.io/inferencemodel=still",
                "--show-managed-fields",
            )
            or {}
        )
        kids = {o["kind"]: o for o in found.get("items", [])}
        im = cluster.get("inferencemodel", "still", "-n", namespace) or {}
        ours = {
            kind: [
                (m.get("time"), m.get("operation"))
                for m in kid["metadata"]["managedFields"]
                if m["manager"] == "kubeonnx"
            ]
            + [kid["metadata"].get("generation")]
            for kind, kid in kids.items()
        }
        return {"InferenceModel": im["metadata"]["resourceVersion"], **ours}

    settled(cluster, namespace, "still")
    before = versions()
    writes = cluster.operator_writes(namespace) if cluster.audit_log else None
    assert len(before) == 5
    resyncs(operator, 2)  # the reconcile re-runs with nothing changed
    assert versions() == before
    if writes is not None:  # not even a no-op apply reaches the API server
        assert writes > 0 and cluster.operator_writes(namespace) == writes


def test_operator_killed_and_restarted_converges_without_duplicates(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    operator.stop(signal.SIGKILL)
    try:
        assert (
            cluster.apply(model("restart", scaling={"maxReplicas": 3}), namespace).returncode == 0
        )
    finally:
        operator.start()
    ready(cluster, namespace, "restart")
    operator.stop(signal.SIGKILL)
    operator.start()
    ready(cluster, namespace, "restart")
    all_kids = cluster.get(CHILD_KINDS, "-n", namespace)
    kinds = [
        o["kind"] for o in (all_kids or {}).get("items", []) if o["metadata"]["name"] == "restart"
    ]
    assert sorted(kinds) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]


def test_a_restarted_operator_writes_nothing_to_converged_models(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """What an operator applied is on each child (the digest of its manifest), not only in
    its memory: one restarted into converged models sends them no write (the audit log
    counts every write to the namespace; the Lease lives elsewhere). Every kind of child:
    a plain model's Deployment, Service, HPA and PDB, and a holding model's router
    ConfigMap and Deployment, ScaledObjects (its own and its candidate's), PodMonitor and
    Ingress (lists and maps the API server keeps as sent)."""
    if cluster.audit_log is None:
        pytest.skip("counts the operator's writes in the local control plane's audit log")
    assert cluster.apply(model("calm", scaling={"maxReplicas": 2}), namespace).returncode == 0
    held = model(
        "calm-held",
        scaling={"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2, "holdRequests": True},
        ingress={"enabled": True, "host": "calm.example"},
        traffic={
            "candidates": [{"version": "2", "model": {"uri": "s3://models/calm-held/2/model.onnx"}}]
        },
    )
    held["spec"]["model"]["version"] = "1"
    assert cluster.apply(held, namespace).returncode == 0
    ready(cluster, namespace, "calm")
    eventually(lambda: cluster.get("pdb", "calm", "-n", namespace), 30, what="the PDB")
    settled(cluster, namespace, "calm")
    kinds = [
        ("configmap", "calm-held-router"),
        ("deployment", "calm-held-router"),
        ("scaledobject", "calm-held"),
        ("scaledobject", "calm-held-v2"),
        ("podmonitor", "calm-held-router"),
        ("ingress", "calm-held"),
    ]
    for kind, name in kinds:
        eventually(
            lambda k=kind, n=name: cluster.get(k, n, "-n", namespace), 60, what=f"{kind} {name}"
        )

    def snapshot() -> Any:
        return [
            (cluster.get(kind, name, "-n", namespace) or {})
            .get("metadata", {})
            .get("resourceVersion")
            for kind, name in [("inferencemodel", "calm"), ("inferencemodel", "calm-held")]
        ]

    assert_idle_resync(cluster, operator, namespace, snapshot)
    writes = cluster.operator_writes(namespace)
    operator.stop()
    # Restarted to watch this namespace alone: its reconciles are these two models', not
    # those of other tests' models, which could fill the count before these ran.
    restarted = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig, tmp_path, namespaces=[namespace]
    )
    restarted.start()
    try:
        resyncs(restarted, 2)  # each of the two models reconciled twice, on average
        resyncs(restarted, 2)  # and twice more: neither can be left out by the other's
        assert cluster.operator_writes(namespace) == writes
    finally:
        restarted.stop()
        operator.start()


def test_deleting_the_model_removes_every_child(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ing = {"enabled": True, "host": "h.example"}
    assert (
        cluster.apply(model("gone", ingress=ing, scaling={"maxReplicas": 2}), namespace).returncode
        == 0
    )
    ready(cluster, namespace, "gone")
    cluster.kubectl("delete", "inferencemodel", "gone", "-n", namespace)
    eventually(
        lambda: not children(cluster, namespace, "gone"),
        60,
        what="every child to be garbage-collected",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"scaling": {"minReplicas": 3, "maxReplicas": 2}},
            "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas",
        ),
        (
            {"scaling": {"minReplicas": 0, "maxReplicas": 2}},
            "spec.scaling.minReplicas 0 (scale to zero) needs autoscaler keda",
        ),
        ({"scaling": {"autoscaler": "magic"}}, 'Unsupported value: "magic"'),
        (
            {"model": {"uri": "http://example.com/m.onnx"}},
            "spec.model.uri must start with s3:// or file://",
        ),
        ({"model": {"uri": "s3://b/k", "sha256": "abc"}}, "spec.model.sha256"),
        ({"accelerator": {"count": -1}}, "spec.accelerator.count"),
        (
            {"accelerator": {"count": 1}},
            "spec.accelerator.profile is required when spec.accelerator.count > 0",
        ),
        ({"runtime": {"maxBatchSize": 0}}, "spec.runtime.maxBatchSize"),
        (
            {"ingress": {"enabled": True}},
            "spec.ingress.host is required when spec.ingress.enabled is true",
        ),
    ],
)
def test_invalid_objects_are_refused_by_the_api_server(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    spec: dict[str, Any],
    message: str,
) -> None:
    obj = model("bad", **spec)
    obj["spec"] = {**obj["spec"], **spec}
    refused = cluster.apply(obj, namespace)
    assert refused.returncode != 0
    assert message in refused.stderr
    assert cluster.get("inferencemodel", "bad", "-n", namespace) is None


def test_too_many_gpus_shows_unschedulable_with_the_schedulers_message(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    greedy = model("greedy", accelerator={"count": 8, "profile": "nvidia"})
    assert cluster.apply(greedy, namespace).returncode == 0
    cond = until_reason(cluster, namespace, "greedy", "Unschedulable")
    assert cond["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    row = cluster.kubectl("get", "im", "greedy", "-n", namespace, "--no-headers").stdout.split()
    assert row[1:3] == ["False", "Unschedulable"]
    described = cluster.kubectl("describe", "im", "greedy", "-n", namespace).stdout
    assert "Insufficient nvidia.com/gpu" in described


def test_a_model_that_fails_to_load_shows_the_runtimes_message(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    if not cluster.local:
        pytest.skip("simulates the kubelet's report, which only kwok nodes allow")
    assert cluster.apply(model("broken"), namespace).returncode == 0
    ready(cluster, namespace, "broken")
    pods = cluster.get("pods", "-n", namespace, "-l", "kubeonnx.io/inferencemodel=broken")
    assert pods
    pod = pods["items"][0]["metadata"]["name"]
    line = "checksum mismatch for s3://models/broken/model.onnx: sha256 is ab..., expects cd..."
    crashed = {
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "False"},
                {"type": "ContainersReady", "status": "False"},
            ],
            "containerStatuses": [
                {
                    "name": "runtime",
                    "ready": False,
                    "restartCount": 2,
                    "image": "x",
                    "imageID": "",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {"exitCode": 1, "reason": "Error", "message": line}
                    },
                }
            ],
        }
    }
    cluster.kubectl("annotate", "pod", pod, "-n", namespace, "kwok.x-k8s.io/status=custom")
    cluster.kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(crashed),
    )
    cond = eventually(
        lambda: (
            (c := condition(cluster, namespace, "broken")).get("reason") == "ModelLoadFailed" and c
        ),
        30,
        what="REASON ModelLoadFailed",
    )
    assert cond["message"] == line


def test_helm_chart_installs_the_operator(cluster: Cluster, namespace: str) -> None:
    if not cluster.local:
        pytest.skip("installs cluster-scoped RBAC; run against the local plane only")
    from e2e.cluster import build_binaries

    helm = str(build_binaries()["helm"])
    import subprocess

    release = f"kubeonnx-{namespace}"
    proc = subprocess.run(
        [
            helm,
            "--kubeconfig",
            cluster.kubeconfig,
            "install",
            release,
            str(ROOT / "charts" / "kubeonnx"),
            "-n",
            namespace,
            "--skip-crds",
            "--wait",
            "--timeout",
            "60s",
        ],
        capture_output=True,
        text=True,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        dep = cluster.get("deployment", release, "-n", namespace)
        assert dep and dep["status"].get("readyReplicas") == 2  # a leader and a standby
        pdb = cluster.get("pdb", release, "-n", namespace)
        assert pdb and pdb["spec"]["minAvailable"] == 1
    finally:
        subprocess.run(
            [helm, "--kubeconfig", cluster.kubeconfig, "uninstall", release, "-n", namespace],
            capture_output=True,
        )
