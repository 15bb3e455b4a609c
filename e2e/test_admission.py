"""Admission that teaches, through the real API server: maxReplicas follows minReplicas when
left out, CEL refuses what would silently do something else (naming the field and, for the
replica bounds, both values), `kubectl explain` says the defaults, `kubectl get qp` has REASON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("crds")]


@pytest.fixture(scope="module")
def crds(cluster: Cluster, repo_root: Path) -> None:
    """The CRDs installed; admission needs no operator."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(repo_root / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/inferencemodels.kubeonnx.io",
        "crd/quotapolicies.kubeonnx.io",
    )


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": f"s3://models/{name}/model.onnx"}, **spec},
    }


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        ({"minReplicas": 3}, {"minReplicas": 3, "autoscaler": "hpa"}),
        (None, {"minReplicas": 1, "autoscaler": "hpa"}),
    ],
)
def test_min_replicas_alone_is_admitted_and_max_replicas_left_to_follow_it(
    cluster: Cluster, namespace: str, scaling: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    spec = {"scaling": scaling} if scaling is not None else {}
    applied = cluster.apply(model("three", **spec), namespace)
    assert applied.returncode == 0, applied.stderr
    im = cluster.get("inferencemodel", "three", "-n", namespace)
    assert im is not None
    stored = im["spec"]["scaling"]
    assert {k: stored[k] for k in expected} == expected
    assert "maxReplicas" not in stored  # the operator takes max(minReplicas, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"scaling": {"minReplicas": 3, "maxReplicas": 2}},
            "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas",
        ),
        (
            {"accelerator": {"profile": "h100"}},
            "spec.accelerator.count (GPUs per replica) is required when "
            "spec.accelerator.profile is set",
        ),
        ({"model": {"uri": "s3://bucket"}}, "spec.model.uri must be s3://BUCKET/KEY"),
        ({"model": {"uri": "s3://bucket/models/"}}, "spec.model.uri must be s3://BUCKET/KEY"),
    ],
)
def test_what_would_silently_do_something_else_is_refused_naming_the_field(
    cluster: Cluster, namespace: str, spec: dict[str, Any], message: str
) -> None:
    refused = cluster.apply(model("refused", **spec), namespace)
    assert refused.returncode != 0
    assert message in " ".join(refused.stderr.split()), refused.stderr
    assert cluster.get("inferencemodel", "refused", "-n", namespace) is None


def test_a_key_in_a_folder_and_a_profile_with_a_count_are_admitted(
    cluster: Cluster, namespace: str
) -> None:
    spec = {
        "model": {"uri": "s3://bucket/models/m.onnx"},
        "accelerator": {"count": 1, "profile": "h100"},
    }
    applied = cluster.apply(model("admitted", **spec), namespace)
    assert applied.returncode == 0, applied.stderr


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("spec.runtime.maxQueue", "default 256"),
        ("spec.runtime.maxBatchDelayMs", "default 2"),
        ("spec.scaling.maxReplicas", "default: minReplicas"),
        ("spec.scaling.targetCPUUtilization", "default 70"),
        ("spec.async.maxAttempts", "default 3"),
    ],
)
def test_kubectl_explain_says_the_default(cluster: Cluster, field: str, default: str) -> None:
    explained = cluster.kubectl("explain", f"inferencemodels.{field}")
    assert explained.returncode == 0, explained.stderr
    assert default in " ".join(explained.stdout.split()), explained.stdout


def test_kubectl_get_qp_has_a_reason_column(cluster: Cluster, namespace: str) -> None:
    policy = {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "plain"},
        "spec": {"tenants": [{"name": "a", "apiKeySecret": {"name": "a-key", "key": "key"}}]},
    }
    applied = cluster.apply(policy, namespace)
    assert applied.returncode == 0, applied.stderr
    listed = cluster.kubectl("get", "qp", "-n", namespace)
    assert listed.returncode == 0, listed.stderr
    assert "REASON" in listed.stdout.splitlines()[0].split()


LABELLED = {
    "input": {"image": {"size": [8, 8]}},
    "output": {"classification": {"labelsConfigMap": {"name": "labels", "key": "labels.txt"}}},
}


@pytest.mark.parametrize(
    ("spec", "kind", "reason", "named"),
    [
        (
            {"model": {"uri": "s3://models/m.onnx", "s3": {"credentialsSecret": "s3-creds"}}},
            "secret",
            "CredentialsSecretNotFound",
            "spec.model.s3.credentialsSecret names Secret 's3-creds'",
        ),
        (
            {"processing": LABELLED},
            "configmap",
            "LabelsConfigMapNotFound",
            "spec.processing.output.classification.labelsConfigMap names ConfigMap 'labels'",
        ),
    ],
)
def test_a_missing_secret_or_config_map_is_named_by_the_operator(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    spec: dict[str, Any],
    kind: str,
    reason: str,
    named: str,
) -> None:
    assert cluster.apply(model("refs", **spec), namespace).returncode == 0

    def ready() -> str | None:
        im = cluster.get("inferencemodel", "refs", "-n", namespace) or {}
        for condition in (im.get("status") or {}).get("conditions") or []:
            if condition["type"] == "Ready":
                return str(condition["reason"]) + ": " + str(condition["message"])
        return None

    shown = eventually(
        lambda: (r := ready()) and r.startswith(reason) and r, 90, what=f"the {reason} reason"
    )
    assert named in shown
    assert cluster.get("deployment", "refs", "-n", namespace) is None
    name = named.split("'")[1]
    if kind == "secret":
        cluster.create_secret(
            name, namespace, {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
        )
    else:
        cluster.kubectl("create", "configmap", name, "-n", namespace, "--from-literal=labels.txt=a")
    eventually(
        lambda: cluster.get("deployment", "refs", "-n", namespace),
        180,
        what=f"the Deployment once the {kind} exists",
    )
