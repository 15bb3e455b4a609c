"""Secrets, least privilege: the operator asks whether a tenant's Secret exists (its metadata,
by name, remembered) and never reads a key, lists or watches Secrets, or connects to a
QuotaPolicy's Redis; the kubelet mounts the keys into the model's pods."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.kube import PARTIAL_METADATA, Kube
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.policy import PolicyReconciler
from kubeonnx_operator.presence import MAX_IN_FLIGHT, MISSING_RECHECK_S, SecretPresence
from kubeonnx_operator.reconcile import Reconciler

from tests.operator.test_reconcile import FakeKube, body

ROOT = Path(__file__).resolve().parents[2]


class SecretsKube(FakeKube):
    """FakeKube whose namespace holds `secrets`; counts the existence checks and how many
    run at once, and records every status written (models' and policies')."""

    def __init__(self, secrets: set[str]) -> None:
        super().__init__()
        self.secrets = secrets
        self.asked: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.policy_statuses: list[dict[str, Any]] = []

    async def secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.asked.append(name)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # a round trip: others may start meanwhile
        self.in_flight -= 1
        if name not in self.secrets:
            return None
        return {"kind": "PartialObjectMetadata", "metadata": {"name": name}}

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        raise AssertionError(f"the operator read Secret {name}'s data")

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        self.policy_statuses.append(status)


def policy(tenants: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "team", "namespace": "ns", "uid": "p", "generation": 1},
        "spec": {
            "tenants": [
                {
                    "name": f"t{i}",
                    "apiKeySecret": {"name": f"key-{i}", "key": "token"},
                    "limits": [{"unit": "requests", "limit": 10, "window": "1m"}],
                }
                for i in range(tenants)
            ],
            **spec,
        },
    }


def metered(name: str) -> dict[str, Any]:
    model = body(quotaPolicy="team")
    model["metadata"] = {**model["metadata"], "name": name, "uid": f"uid-{name}"}
    return model


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reconcilers(
    kube: SecretsKube, policy_body: dict[str, Any], clock: Clock
) -> tuple[Reconciler, PolicyReconciler]:
    presence = SecretPresence(kube, clock=clock)  # type: ignore[arg-type]
    models: dict[tuple[str, str], dict[str, Any]] = {}
    model = Reconciler(
        kube,  # type: ignore[arg-type]
        OperatorConfig(),
        ObservedChildren(),
        now=lambda: "t",
        policies={("ns", "team"): policy_body},
        secrets=presence,
    )
    return model, PolicyReconciler(kube, models, now=lambda: "t", secrets=presence)  # type: ignore[arg-type]


def reason(status: dict[str, Any]) -> tuple[str, str]:
    (cond,) = status["conditions"]
    return cond["reason"], cond["message"]


async def test_a_thousand_tenants_cost_one_get_each_once_and_an_idle_resync_asks_nothing() -> None:
    tenants = 1000
    kube = SecretsKube({f"key-{i}" for i in range(tenants)})
    qp = policy(tenants)
    models, policies = reconcilers(kube, qp, Clock())
    # Two models of the policy and the policy itself, at once (as the work queues run them).
    await asyncio.gather(
        models.reconcile(metered("a")), models.reconcile(metered("b")), policies.reconcile(qp)
    )
    assert sorted(kube.asked) == sorted(f"key-{i}" for i in range(tenants))  # once each
    assert kube.most_in_flight <= MAX_IN_FLIGHT
    assert reason(kube.policy_statuses[-1])[0] == "Ready"
    assert kube.policy_statuses[-1]["tenants"] == tenants
    kinds = [m["kind"] for _, m in kube.applied]
    assert kinds.count("Deployment") == 2 and "Secret" not in kinds and "ConfigMap" in kinds

    # The resync: every reconcile runs again, and not one Secret is asked about.
    kube.asked.clear()
    await asyncio.gather(
        models.reconcile(metered("a")), models.reconcile(metered("b")), policies.reconcile(qp)
    )
    assert kube.asked == []


async def test_a_missing_secret_is_in_both_statuses_and_noticed_once_it_exists() -> None:
    kube = SecretsKube({"key-0"})
    qp = policy(2)
    clock = Clock()
    models, policies = reconcilers(kube, qp, clock)
    await models.reconcile(metered("a"))
    assert reason(kube.statuses[-1]) == (
        "QuotaSecretNotFound",
        "QuotaPolicy 'team', tenant 't1': Secret 'key-1' (its API keys, under key 'token') "
        "does not exist",
    )
    assert kube.applied == []  # not served without its tenants' keys
    await policies.reconcile(qp)
    assert reason(kube.policy_statuses[-1]) == (
        "SecretNotFound",
        "no API key Secret for tenants: t1 (Secret key-1)",
    )
    assert kube.policy_statuses[-1]["tenants"] == 1

    # Created: within MISSING_RECHECK_S the answer is remembered, then asked again.
    kube.secrets.add("key-1")
    kube.asked.clear()
    await models.reconcile(metered("a"))
    assert kube.asked == [] and kube.applied == []
    clock.now += MISSING_RECHECK_S
    await models.reconcile(metered("a"))
    assert kube.asked == ["key-1"]
    assert {m["kind"] for _, m in kube.applied} >= {"ConfigMap", "Deployment"}


async def test_a_policy_change_asks_again_about_its_missing_secrets_at_once() -> None:
    kube = SecretsKube(set())
    presence = SecretPresence(kube, clock=Clock())  # type: ignore[arg-type]
    assert await presence.missing("ns", ["a", "b"]) == {"a", "b"}
    kube.secrets.add("a")
    assert await presence.missing("ns", ["a", "b"]) == {"a", "b"}  # remembered
    presence.recheck_missing("ns")
    assert await presence.missing("ns", ["a", "b"]) == {"b"}


async def test_the_policy_status_never_touches_its_redis_nor_tells_of_the_network() -> None:
    # A Redis URL on a closed port and a password Secret: the operator reads neither, and the
    # status says nothing about either (no reachability oracle, no address).
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kube = SecretsKube({"key-0"})
    qp = policy(
        1,
        backend={
            "redis": {
                "url": f"redis://127.0.0.1:{port}/0",
                "passwordSecret": {"name": "db-admin", "key": "password"},
            }
        },
    )
    _, policies = reconcilers(kube, qp, Clock())
    await policies.reconcile(qp)
    status = kube.policy_statuses[-1]
    assert reason(status)[0] == "Ready" and status["store"] == "redis"
    assert "usage" not in status
    assert str(port) not in json.dumps(status) and "127.0.0.1" not in json.dumps(status)
    assert kube.asked == ["key-0"]  # not the password's Secret


def test_the_pods_mount_the_tenants_secrets_and_the_operator_makes_no_secret() -> None:
    from kubeonnx_operator.cli import render_documents

    docs = [
        ("-", policy(2)),
        ("-", {**metered("a"), "apiVersion": "kubeonnx.io/v1alpha1", "kind": "InferenceModel"}),
    ]
    rendered, problems = render_documents(docs, OperatorConfig())
    assert not problems  # rendered without the Secrets: the operator does not need them
    kinds = {c["kind"]: c for c in rendered}
    assert "Secret" not in kinds
    config = json.loads(kinds["ConfigMap"]["data"]["config.json"])
    assert [t["keyFile"] for t in config["tenants"]] == ["keys/key-0/token", "keys/key-1/token"]
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "quota"]
    # The quota file and, beside it, each tenant's Secret (optional: a missing one is named
    # by the runtime at start-up, not hidden in a pod that cannot mount it).
    assert volume["projected"]["sources"] == [
        {"configMap": {"name": "a-quota", "items": [{"key": "config.json", "path": "config.json"}]}}
    ] + [
        {
            "secret": {
                "name": f"key-{i}",
                "items": [{"key": "token", "path": f"keys/key-{i}/token"}],
                "optional": True,
            }
        }
        for i in range(2)
    ]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "quota"]
    assert mount == {"name": "quota", "mountPath": "/etc/kubeonnx/quota", "readOnly": True}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBEONNX_QUOTA_CONFIG"] == "/etc/kubeonnx/quota/config.json"


def chart_rules() -> list[dict[str, Any]]:
    """The chart's rules (ClusterRole, or a Role per watched namespace), read from its
    template without helm (e2e/test_chart.py checks the rendered chart on a real server)."""
    text = (ROOT / "charts" / "kubeonnx" / "templates" / "_helpers.tpl").read_text()
    block = text.split('{{- define "kubeonnx.rules" -}}', 1)[1].split("{{- end -}}", 1)[0]
    rules: list[dict[str, Any]] = yaml.safe_load(block)
    return rules


def test_the_chart_grants_no_list_watch_or_write_on_secrets() -> None:
    verbs = {
        verb
        for rule in chart_rules()
        if "" in rule["apiGroups"] and "secrets" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert verbs == {"get"}
    for rule in chart_rules():
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        # Nothing is updated (apply is a patch), nothing fetched by name but children,
        # Secrets and the Lease; the finalizers' update is what blockOwnerDeletion needs.
        if "update" in rule["verbs"]:
            assert rule["resources"] == ["inferencemodels/finalizers"], rule
        if "inferencemodels" in rule["resources"]:
            assert rule["verbs"] == ["list", "watch"], rule


class _SecretsAPI(BaseHTTPRequestHandler):
    """A stand-in API server for GET of a Secret: metadata only when asked for it, else the
    whole object (as a server would send it)."""

    accepts: list[str] = []

    def do_GET(self) -> None:
        accept = self.headers.get("Accept", "")
        _SecretsAPI.accepts.append(accept)
        name = self.path.rsplit("/", 1)[-1]
        if name == "absent":
            self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        elif accept == PARTIAL_METADATA and name != "old-server":
            meta = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
            self._send(200, {**meta, "metadata": {"name": name, "namespace": "ns"}})
        else:
            whole = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
            self._send(200, {**whole, "data": {"token": "c2VjcmV0"}})

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SecretsAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_an_existence_check_asks_for_metadata_and_never_keeps_a_key(api: str) -> None:
    from lightkube import AsyncClient
    from lightkube.config.kubeconfig import KubeConfig

    config = KubeConfig.from_dict(
        {
            "clusters": [{"name": "c", "cluster": {"server": api}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )
    client = AsyncClient(config=config)
    try:
        kube = Kube(client)
        found = await kube.secret_metadata("ns", "acme-key")
        assert found is not None and found["kind"] == "PartialObjectMetadata"
        assert "data" not in found
        assert await kube.secret_metadata("ns", "absent") is None
        # A server that ignores the Accept header sends the whole Secret: refused, not kept.
        with pytest.raises(ValueError, match="the API server sent Secret"):
            await kube.secret_metadata("ns", "old-server")
        assert _SecretsAPI.accepts and set(_SecretsAPI.accepts) == {PARTIAL_METADATA}
    finally:
        await client.close()


async def test_a_policy_that_cannot_be_read_keeps_its_models_unapplied_until_it_can() -> None:
    """README's reason table: QuotaPolicyInvalid, and nothing applied until it can be read."""
    kube = SecretsKube({"key-0"})
    qp = policy(1)
    qp["spec"]["tenants"][0]["name"] = "default"  # reserved: the policy cannot be read
    models, _ = reconcilers(kube, qp, Clock())
    await models.reconcile(metered("a"))
    got, message = reason(kube.statuses[-1])
    assert got == "QuotaPolicyInvalid" and "'default' is reserved" in message, message
    assert kube.applied == []
    qp["spec"]["tenants"][0]["name"] = "t0"  # fixed: the model is served
    await models.reconcile(metered("a"))
    assert reason(kube.statuses[-1])[0] != "QuotaPolicyInvalid"
    assert {m["kind"] for _, m in kube.applied} >= {"ConfigMap", "Deployment"}
