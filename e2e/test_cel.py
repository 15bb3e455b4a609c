"""Every CEL rule of the CRDs, and the chart's admission policy, refuses through the real API
server, with a message that names the field.

The table below holds one refusal per rule (several for the route's characters); a test
checks that it covers every rule the CRDs carry, so a rule added without a refusal here
fails. Each object is sent with a server-side dry run, so nothing is stored; the valid
objects they are made from are accepted the same way.
"""

from __future__ import annotations

import copy
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import Cluster, eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubeonnx"
NAMESPACE_RULE = "admission policy: spec.ingress.path in the model's namespace"

IMAGE = {"input": {"image": {"size": [8, 8]}}}


def model(name: str = "m", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "s3://models/m/model.onnx"}, **spec},
    }


def policy(**spec: Any) -> dict[str, Any]:
    tenant = {
        "name": "acme",
        "apiKeySecret": {"name": "k", "key": "token"},
        "limits": [{"unit": "requests", "limit": 10, "window": "1m"}],
    }
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "q"},
        "spec": {"tenants": [tenant], **spec},
    }


def tenant_policy(
    name: str = "acme", key: str = "token", limits: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    tenant: dict[str, Any] = {"name": name, "apiKeySecret": {"name": "k", "key": key}}
    if limits is not None:
        tenant["limits"] = limits
    return {**policy(), "spec": {"tenants": [tenant]}}


def ingress(path: str) -> dict[str, Any]:
    return {"enabled": True, "host": "models.example.com", "path": path}


TWICE = [{"unit": "requests", "limit": 1, "window": "1m"}] * 2
TOKENS = {"unit": "tokens", "limit": 1000, "window": "1m"}


def gateway(*refs: dict[str, Any]) -> dict[str, Any]:
    return {"gateway": {"parentRefs": list(refs)}}


def candidate(version: str = "2", **fields: Any) -> dict[str, Any]:
    return {"version": version, "model": {"uri": "s3://models/m/v2/model.onnx"}, **fields}


def traffic(*candidates: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"traffic": {"candidates": list(candidates), **fields}}


ROLLOUT = {"steps": [{"weight": 10}, {"pause": {}}]}

# (the rule, as the CRD writes it (or NAMESPACE_RULE), the object, what the refusal says)
REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    (
        "self.metadata.name.size() <= 63",
        model("a" * 64),
        "metadata.name must be at most 63 characters",
    ),
    (
        "!has(self.spec.async) || !self.spec.async.enabled || self.metadata.name.size() <= 55",
        model("a" * 56, **{"async": {"enabled": True, "redis": {"url": "redis://redis:6379"}}}),
        "metadata.name must be at most 55 characters when spec.async.enabled is true",
    ),
    (
        "self.matches('^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$')",
        model(model={"uri": "s3://models/m/model.onnx", "version": "-v1"}),
        "spec.model.version must be letters, digits, '.', '_' and '-'",
    ),
    (
        "self.scaling.minReplicas > 0 ||",
        model(scaling={"minReplicas": 0, "maxReplicas": 2}),
        "spec.scaling.minReplicas 0 (scale to zero) needs autoscaler keda",
    ),
    (
        "self.startsWith('s3://') || self.startsWith('file://')",
        model(model={"uri": "https://example.com/m.onnx"}),
        "spec.model.uri must start with s3:// or file://",
    ),
    (
        "!self.startsWith('s3://') || self.matches('^s3://[^/]+/.*[^/]$')",
        model(model={"uri": "s3://models/m/"}),
        "spec.model.uri must be s3://BUCKET/KEY naming the model file",
    ),
    (
        "self.count != 0 || !has(self.profile) || self.profile == ''",
        model(accelerator={"profile": "nvidia"}),
        "spec.accelerator.count (GPUs per replica) is required when spec.accelerator.profile",
    ),
    (
        "self.count <= 0 ||",
        model(accelerator={"count": 1}),
        "spec.accelerator.profile is required when spec.accelerator.count > 0",
    ),
    (
        "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        model(scaling={"minReplicas": 3, "maxReplicas": 2}),
        "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas",
    ),
    (
        "!has(self.holdRequests) || !self.holdRequests ||",
        model(scaling={"holdRequests": True}),
        "spec.scaling.holdRequests needs autoscaler keda",
    ),
    (
        '!self.enabled || (has(self.host) && self.host != "")',
        model(ingress={"enabled": True}),
        "spec.ingress.host is required when spec.ingress.enabled is true",
    ),
    *[
        (
            "self.matches('^/$|^(/[A-Za-z0-9_-]+)+/?$')",
            model(ingress=ingress(path)),
            "spec.ingress.path must be '/' or segments of letters, digits, '_' and '-'",
        )
        for path in [
            "/models/ns/m;",
            "/models/ns/m{}",
            "/models/ns/$host",
            "/models/ns/m x",
            "/models/ns/../other/m",
            "/models/ns//m",
            "/models/ns/m%2F",
            "/models/ns/m.*",
            "/models/ns/(m)",
            "/models/ns/m\\x",
            "models/ns/m",
        ]
    ],
    (
        "!self.enabled || has(self.redis)",
        model(**{"async": {"enabled": True}}),
        "spec.async.redis.url is required when spec.async.enabled is true",
    ),
    (
        "self.startsWith('redis://') || self.startsWith('rediss://')",
        model(**{"async": {"redis": {"url": "http://redis:6379"}}}),
        "spec.async.redis.url must start with redis:// or rediss://",
    ),
    (
        '!self.contains("@")',
        model(**{"async": {"redis": {"url": "redis://user:pw@redis:6379"}}}),
        "spec.async.redis.url must not carry credentials",
    ),
    (
        "!has(self.spec.traffic) || !has(self.spec.traffic.candidates) ||",
        model("a" * 57, **traffic(candidate())),
        "metadata.name must be at most 56 characters with spec.traffic.candidates",
    ),
    (
        "!has(self.spec.scaling) || !has(self.spec.scaling.holdRequests) ||",
        model("a" * 57, scaling={"autoscaler": "keda", "holdRequests": True}),
        "metadata.name must be at most 56 characters with spec.scaling.holdRequests",
    ),
    (
        "!has(self.traffic) || !has(self.traffic.candidates) ||",
        model(**traffic(candidate("1"))),
        "spec.traffic.candidates[].version must differ from spec.model.version",
    ),
    (
        "!has(self.candidates) || self.candidates.all(c, self.candidates.exists_one(",
        model(**traffic(candidate("2"), candidate("2"))),
        "spec.traffic.candidates[].version must be unique",
    ),
    (
        "!has(self.candidates) || (size(self.candidates) > 0",
        model(**traffic(candidate("2", weight=60), candidate("3", weight=50))),
        "spec.traffic.candidates[].weight must not sum to more than 100",
    ),
    (
        "!has(self.rollout) || (has(self.candidates) && size(self.candidates) == 1)",
        model(**traffic(candidate("2"), candidate("3"), rollout=ROLLOUT)),
        "spec.traffic.rollout needs exactly one candidate",
    ),
    (
        "!has(self.rollout) || !has(self.candidates) || self.candidates.all(",
        model(**traffic(candidate("2", weight=10), rollout=ROLLOUT)),
        "spec.traffic.candidates[].weight must be 0 (unset) with spec.traffic.rollout",
    ),
    (
        "has(self.weight) != has(self.pause)",
        model(**traffic(candidate(), rollout={"steps": [{"weight": 10, "pause": {}}]})),
        "spec.traffic.rollout.steps[] takes exactly one of weight or pause",
    ),
    (
        "!has(self.scaling) || !has(self.scaling.maxReplicas) ||",
        model(**traffic(candidate(scaling={"minReplicas": 3, "maxReplicas": 2}))),
        "spec.traffic.candidates[].scaling.minReplicas must not be greater than its maxReplicas",
    ),
    (
        "!has(self.scaling) || self.scaling.minReplicas > 0 ||",
        model(**traffic(candidate(scaling={"minReplicas": 0, "maxReplicas": 2}))),
        "spec.traffic.candidates[].scaling.minReplicas 0 needs autoscaler keda",
    ),
    (
        "!has(self.scaling) || !has(self.scaling.holdRequests) ||",
        model(**traffic(candidate(scaling={"autoscaler": "keda", "holdRequests": True}))),
        "spec.traffic.candidates[].scaling.holdRequests is not taken",
    ),
    (
        "self.matches('^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$')",
        model(**traffic(candidate("v2-"))),
        "spec.traffic.candidates[].version must be letters, digits, '.', '_' and '-'",
    ),
    (
        "self.startsWith('s3://') || self.startsWith('file://')",
        model(**traffic({"version": "2", "model": {"uri": "https://example.com/m.onnx"}})),
        "spec.traffic.candidates[].model.uri must start with s3:// or file://",
    ),
    (
        "!self.startsWith('s3://') || self.matches('^s3://[^/]+/.*[^/]$')",
        model(**traffic({"version": "2", "model": {"uri": "s3://models/m/"}})),
        "spec.traffic.candidates[].model.uri must be s3://BUCKET/KEY naming the model file",
    ),
    (
        "self.all(x, x != 0.0)",
        model(processing={"input": {"image": {"size": [8, 8], "std": [1.0, 0.0, 1.0]}}}),
        "spec.processing.input.image.std must not contain 0",
    ),
    (
        "self > 0.0",
        model(processing={"input": {"image": {"size": [8, 8], "scale": 0.0}}}),
        "spec.processing.input.image.scale must be greater than 0",
    ),
    (
        "!(has(self.classification) && has(self.detection))",
        model(processing={**IMAGE, "output": {"classification": {}, "detection": {}}}),
        "spec.processing.output takes classification or detection, not both",
    ),
    (
        "self > 0.0",
        model(processing={**IMAGE, "output": {"detection": {"iouThreshold": 0.0}}}),
        "spec.processing.output.detection.iouThreshold must be greater than 0",
    ),
    (
        "!has(self.volumeMounts) ||",
        model(pod={"volumeMounts": [{"name": "extra", "mountPath": "/extra"}]}),
        "every spec.pod.volumeMounts name must be a volume in spec.pod.volumes",
    ),
    (
        "self.all(e, !e.name.startsWith('KUBEONNX_'))",
        model(pod={"env": [{"name": "KUBEONNX_MODEL_URI", "value": "s3://x/y"}]}),
        "spec.pod.env must not set KUBEONNX_* variables",
    ),
    (
        "self.all(v, !(v.name in ['model-cache', 'tmp', 'quota', 'labels']))",
        model(pod={"volumes": [{"name": "tmp", "emptyDir": {}}]}),
        "spec.pod.volumes must not use the runtime's own names",
    ),
    *[
        (
            NAMESPACE_RULE,
            model(ingress=ingress(path)),
            f"spec.ingress.path {path}: paths under /models/ belong to the namespace they name",
        )
        for path in ["/models/victim/their-model", "/models", "/MODELS/victim/their-model"]
    ],
    (
        "self.all(a, self.exists_one(b, a == b))",
        model(ingress=gateway({"name": "gw"}, {"name": "gw"})),
        "spec.ingress.gateway.parentRefs must not name the same Gateway (and sectionName) twice",
    ),
    (
        "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
        model(ingress=gateway({"name": "Public"})),
        "spec.ingress.gateway.parentRefs[].name must be a Gateway's name",
    ),
    (
        "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
        model(ingress=gateway({"name": "gw", "sectionName": "HTTP"})),
        "spec.ingress.gateway.parentRefs[].sectionName must be a listener's name",
    ),
    (
        "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        model(ingress=gateway({"name": "gw", "namespace": "a.b"})),
        "spec.ingress.gateway.parentRefs[].namespace must be a namespace's name",
    ),
    (
        "self.all(l, self.exists_one(m, m.unit == l.unit && m.window == l.window))",
        policy(defaultTenant={"limits": TWICE}),
        "spec.defaultTenant.limits",
    ),
    (
        "self.all(l, self.exists_one(m, m.unit == l.unit && m.window == l.window))",
        {
            **policy(),
            "spec": {
                "tenants": [
                    {"name": "acme", "apiKeySecret": {"name": "k", "key": "t"}, "limits": TWICE}
                ]
            },
        },
        "spec.tenants[0].limits",
    ),
    (
        "self != 'default'",
        tenant_policy(name="default"),
        'spec.tenants[].name "default" is reserved for requests without a known key',
    ),
    (
        '!self.startsWith("..") && self != "."',
        tenant_policy(key="..data"),
        "spec.tenants[].apiKeySecret.key must be a Secret key",
    ),
    (
        "self.startsWith('redis://') || self.startsWith('rediss://')",
        policy(backend={"redis": {"url": "http://redis:6379"}}),
        "spec.backend.redis.url must start with redis:// or rediss://",
    ),
    (
        '!self.contains("@")',
        policy(backend={"redis": {"url": "redis://user:pw@redis:6379"}}),
        "spec.backend.redis.url must not carry credentials",
    ),
    (
        "has(self.tokens) ||",
        policy(defaultTenant={"limits": [TOKENS]}),
        "a limit of unit tokens needs spec.tokens",
    ),
    (
        "has(self.tokens) ||",
        tenant_policy(limits=[TOKENS]),
        "a limit of unit tokens needs spec.tokens",
    ),
]


def crd_rules() -> list[str]:
    rules: list[str] = []

    def walk(schema: dict[str, Any]) -> None:
        rules.extend(v["rule"] for v in schema.get("x-kubernetes-validations") or [])
        for sub in (schema.get("properties") or {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                walk(schema[key])

    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for version in yaml.safe_load(path.read_text())["spec"]["versions"]:
            walk(version["schema"]["openAPIV3Schema"])
    return [" ".join(rule.split()) for rule in rules]


def test_the_table_refuses_through_every_rule() -> None:
    """Each CRD rule has a refusal below (counted by how often it is written)."""
    rules = crd_rules()
    assert len(rules) >= 27
    for rule in set(rules):
        covering = {id(obj) for r, obj, _ in REFUSALS if rule.startswith(r)}
        assert len(covering) >= rules.count(rule), f"no refusal for the rule: {rule}"


def helm() -> str:
    from e2e.cluster import build_binaries

    return str(build_binaries()["helm"])


def dry_run(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> Any:
    return cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(obj),
        check=False,
    )


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[tuple[Cluster, str]]:
    """The CRDs and the chart's admission policy installed, and a namespace to send to."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/inferencemodels.kubeonnx.io",
        "crd/quotapolicies.kubeonnx.io",
    )
    rendered = subprocess.run(
        [helm(), "template", "cel", str(CHART), "-s", "templates/admission-policy.yaml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)
    namespace = f"e2e-cel-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        # The policy takes effect once the API server has compiled it and seen its binding.
        hijack = model(ingress=ingress("/models/victim/m"))
        eventually(
            lambda: dry_run(cluster, namespace, hijack).returncode != 0,
            60,
            what="the admission policy in force",
        )
        yield cluster, namespace
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


def test_the_objects_refused_below_come_from_valid_ones(api: tuple[Cluster, str]) -> None:
    cluster, namespace = api
    own = f"/models/{namespace}/m"
    for obj in [
        model(),
        model(ingress=ingress(own)),
        model(ingress=ingress(f"/models/{namespace}")),
        model(ingress=ingress("/")),
        model(ingress=ingress("/api/v1_m-2/")),
        model(processing={**IMAGE, "output": {"detection": {}}}),
        model(**{"async": {"enabled": True, "redis": {"url": "redis://redis:6379"}}}),
        model(pod={"volumes": [{"name": "extra", "emptyDir": {}}]}),
        model(
            "a" * 56,
            **traffic(
                candidate("2", weight=60, mirrorPercent=5),
                candidate("3", weight=40, scaling={"minReplicas": 2}),
                sticky=True,
            ),
        ),
        model(**traffic(candidate(), rollout=ROLLOUT)),
        model(
            ingress={
                **ingress(own),
                **gateway(
                    {"name": "gw", "namespace": "edge", "sectionName": "https"},
                    {"name": "gw", "namespace": "edge", "sectionName": "http"},
                    {"name": "gw.internal"},
                ),
            }
        ),
        policy(),
        policy(
            tokens={"input": "attention_mask", "count": "nonzero"},
            defaultTenant={"limits": [TOKENS]},
        ),
    ]:
        accepted = dry_run(cluster, namespace, obj)
        assert accepted.returncode == 0, (obj, accepted.stderr)


@pytest.mark.parametrize(
    ("rule", "obj", "message"),
    REFUSALS,
    ids=[f"{i}-{message[:40]}" for i, (_, _, message) in enumerate(REFUSALS)],
)
def test_the_api_server_refuses_naming_the_field(
    api: tuple[Cluster, str], rule: str, obj: dict[str, Any], message: str
) -> None:
    cluster, namespace = api
    refused = dry_run(cluster, namespace, copy.deepcopy(obj))
    assert refused.returncode != 0
    stderr = " ".join(refused.stderr.split())
    assert message in stderr, stderr
    if rule == NAMESPACE_RULE:
        assert "ValidatingAdmissionPolicy" in stderr, stderr


def test_an_update_to_another_namespaces_route_is_refused(api: tuple[Cluster, str]) -> None:
    """The admission policy holds on UPDATE, not only CREATE: a model created on its own
    prefix cannot be patched onto another namespace's."""
    cluster, namespace = api
    own = f"/models/{namespace}/patched"
    created = cluster.kubectl(
        "apply", "-n", namespace, "-f", "-",
        input=yaml.safe_dump(model("patched", ingress=ingress(own))),
        check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    hijack = '{"spec": {"ingress": {"path": "/models/victim/their-model"}}}'
    patched = cluster.kubectl(
        "patch", "inferencemodel", "patched", "-n", namespace, "--type=merge", "-p", hijack,
        check=False,
    )  # fmt: skip
    assert patched.returncode != 0
    stderr = " ".join(patched.stderr.split())
    assert "ValidatingAdmissionPolicy" in stderr, stderr
    assert "spec.ingress.path /models/victim/their-model: paths under /models/" in stderr, stderr
    stored = cluster.get("inferencemodel", "patched", "-n", namespace)
    assert stored is not None and stored["spec"]["ingress"]["path"] == own


def test_a_refusal_names_metadata_name_and_a_negative_count_only_its_minimum(
    api: tuple[Cluster, str],
) -> None:
    """The name rules are the root's, but their refusal names metadata.name (not `<nil>`);
    a count of -1 given with a profile is refused for its minimum alone, not as missing."""
    cluster, namespace = api
    refused = dry_run(cluster, namespace, model("bad-name-" + "a" * 60))
    assert refused.returncode != 0
    stderr = " ".join(refused.stderr.split())
    assert "<nil>" not in stderr, stderr
    assert "metadata.name: Invalid value" in stderr and "at most 63 characters" in stderr, stderr
    refused = dry_run(cluster, namespace, model("Bad_Name"))
    assert refused.returncode != 0
    assert "<nil>" not in refused.stderr, refused.stderr
    refused = dry_run(cluster, namespace, model(accelerator={"count": -1, "profile": "h100"}))
    assert refused.returncode != 0
    stderr = " ".join(refused.stderr.split())
    assert "spec.accelerator.count" in stderr and "greater than or equal to 0" in stderr, stderr
    assert "is required when" not in stderr, stderr
