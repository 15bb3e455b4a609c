"""QuotaPolicy on the real control plane: the runtime's quota file rendered for every model
that names a policy (its tenants' Secrets mounted beside it), the policy's status, models
without their policy, and CEL refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import children, model, prepare_namespace, ready, until_reason

pytestmark = pytest.mark.e2e


def policy(name: str = "team", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": name},
        "spec": {
            "tenants": [
                {
                    "name": "acme",
                    "apiKeySecret": {"name": "acme-key", "key": "token"},
                    "limits": [{"unit": "requests", "limit": 600, "window": "1m"}],
                },
                {
                    "name": "globex",
                    "apiKeySecret": {"name": "globex-key", "key": "token"},
                    "limits": [{"unit": "rows", "limit": 1000, "window": "1d"}],
                },
            ],
            **spec,
        },
    }


def quota_file(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    config_map = cluster.get("configmap", f"{name}-quota", "-n", ns)
    if config_map is None:
        return None
    result: dict[str, Any] = json.loads(config_map["data"]["config.json"])
    return result


def policy_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    qp = cluster.get("quotapolicy", name, "-n", ns) or {}
    return qp.get("status") or {}


def test_models_that_name_a_policy_get_its_quota_file_and_the_policy_counts_them(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    prepare_namespace(cluster, namespace)
    cluster.create_secret("acme-key", namespace, {"token": "acme-secret-1"})
    cluster.create_secret("globex-key", namespace, {"token": "globex-secret-1"})
    assert cluster.apply(policy(), namespace).returncode == 0
    for name in ("metered-a", "metered-b"):
        assert cluster.apply(model(name, quotaPolicy="team"), namespace).returncode == 0
    for name in ("metered-a", "metered-b"):
        im = ready(cluster, namespace, name)
        config = quota_file(cluster, namespace, name)
        assert config is not None
        tenants = {t["name"]: t for t in config["tenants"]}
        assert tenants["acme"]["keyFile"] == "keys/acme-key/token"  # no key, no hash
        assert tenants["globex"]["limits"] == [{"unit": "rows", "limit": 1000, "window": "1d"}]
        assert "redis" not in config  # counted in each replica's memory
        config_map = cluster.get("configmap", f"{name}-quota", "-n", namespace)
        assert config_map is not None
        (ref,) = config_map["metadata"]["ownerReferences"]
        assert ref["uid"] == im["metadata"]["uid"]
        assert cluster.get("secret", f"{name}-quota", "-n", namespace) is None
        pod = children(cluster, namespace, name)["Deployment"]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        (volume,) = [v for v in pod["volumes"] if v["name"] == "quota"]
        # The kubelet mounts the tenants' Secrets beside the file (and carries a rotation).
        mounted = {
            (src["secret"]["name"], item["path"])
            for src in volume["projected"]["sources"]
            if "secret" in src
            for item in src["secret"]["items"]
        }
        assert mounted == {
            ("acme-key", "keys/acme-key/token"),
            ("globex-key", "keys/globex-key/token"),
        }
        assert env["KUBEONNX_QUOTA_CONFIG"] == "/etc/kubeonnx/quota/config.json"

    status = eventually(
        lambda: (s := policy_status(cluster, namespace, "team")).get("models") == 2 and s,
        60,
        what="QuotaPolicy status counting two models",
    )
    assert status["tenants"] == 2 and status["store"] == "memory"
    (cond,) = status["conditions"]
    assert cond["status"] == "True" and cond["reason"] == "Ready"
    assert "inexact across replicas" in cond["message"]
    header, *rows = cluster.kubectl("get", "qp", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "MODELS", "TENANTS", "STORE", "READY", "REASON", "AGE"]
    assert rows[0].split()[:5] == ["team", "2", "2", "memory", "True"]

    # A model that stops naming the policy loses its quota file; the policy counts one.
    assert cluster.apply(model("metered-b"), namespace).returncode == 0
    eventually(
        lambda: quota_file(cluster, namespace, "metered-b") is None,
        60,
        what="the quota ConfigMap of a model without a policy to be deleted",
    )
    eventually(
        lambda: policy_status(cluster, namespace, "team").get("models") == 1,
        60,
        what="the policy to count one model",
    )


def test_a_model_is_not_served_without_its_policy_or_its_tenants_keys(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    prepare_namespace(cluster, namespace)
    assert cluster.apply(model("waiting", quotaPolicy="later"), namespace).returncode == 0
    cond = until_reason(cluster, namespace, "waiting", "QuotaPolicyNotFound")
    assert cond["status"] == "False" and "'later' does not exist" in cond["message"]
    assert "Deployment" not in children(cluster, namespace, "waiting")

    assert cluster.apply(policy("later"), namespace).returncode == 0
    cond = until_reason(cluster, namespace, "waiting", "QuotaSecretNotFound")
    assert "tenant 'acme'" in cond["message"] and "'acme-key'" in cond["message"]
    status = eventually(
        lambda: (s := policy_status(cluster, namespace, "later")).get("conditions") and s,
        60,
        what="the policy's status",
    )
    assert status["conditions"][0]["reason"] == "SecretNotFound"

    cluster.create_secret("acme-key", namespace, {"token": "a1"})
    cluster.create_secret("globex-key", namespace, {"token": "g1"})
    # The secrets are read on the next reconcile; a policy change (or the resync) brings it.
    assert cluster.apply(policy("later", shadow=True), namespace).returncode == 0
    ready(cluster, namespace, "waiting")
    config = quota_file(cluster, namespace, "waiting")
    assert config is not None and config["shadow"] is True


@pytest.mark.parametrize(
    ("tenants", "message"),
    [
        (
            [
                {
                    "name": "a",
                    "apiKeySecret": {"name": "s", "key": "k"},
                    "limits": [{"unit": "requests", "limit": -1, "window": "1m"}],
                }
            ],
            "should be greater than or equal to 0",
        ),
        (
            [
                {
                    "name": "a",
                    "apiKeySecret": {"name": "s", "key": "k"},
                    "limits": [{"unit": "requests", "limit": 1, "window": "1w"}],
                }
            ],
            'Unsupported value: "1w"',
        ),
        (
            [
                {"name": "a", "apiKeySecret": {"name": "s", "key": "k"}},
                {"name": "a", "apiKeySecret": {"name": "t", "key": "k"}},
            ],
            "Duplicate value",
        ),
        (
            [
                {
                    "name": "a",
                    "apiKeySecret": {"name": "s", "key": "k"},
                    "limits": [
                        {"unit": "rows", "limit": 1, "window": "1m"},
                        {"unit": "rows", "limit": 2, "window": "1m"},
                    ],
                }
            ],
            "each unit and window may have one limit only",
        ),
    ],
)
def test_invalid_policies_are_refused_by_the_api_server(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    tenants: list,
    message: str,  # type: ignore[type-arg]
) -> None:
    bad = policy("bad")
    bad["spec"]["tenants"] = tenants
    refused = cluster.apply(bad, namespace)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    assert cluster.get("quotapolicy", "bad", "-n", namespace) is None


def test_a_redis_url_with_a_password_is_refused(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    bad = policy("leaky", backend={"redis": {"url": "redis://:hunter2@redis:6379/0"}})
    refused = cluster.apply(bad, namespace)
    assert refused.returncode != 0
    assert "must not carry credentials; use passwordSecret" in refused.stderr
