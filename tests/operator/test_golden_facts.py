"""The key facts the golden renders (tests/operator/golden) encode, asserted on the golden
files themselves and computed from the examples and the runtime's contract, not by the
renderer: a golden file regenerated (UPDATE_GOLDEN=1) with one of them changed fails here,
whatever the renderer now says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

# The contract, written out here (README, "The runtime's contract"), not imported.
MODEL_LABEL = "kubeonnx.io/inferencemodel"
GATEWAY_LABEL = "kubeonnx.io/async-gateway"
PORT = 8080
METRICS_PORT = 9090  # /metrics names tenants: apart from what Services and Ingresses carry
GPU_RESOURCE = "nvidia.com/gpu"
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def the_model(example: Path) -> dict[str, Any]:
    (model,) = [d for d in docs(example) if d["kind"] == "InferenceModel"]
    return model


def children(example: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs(GOLDEN / example.name)}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_example_has_a_golden_render_and_no_golden_lacks_an_example() -> None:
    assert {p.name for p in GOLDEN.glob("*.yaml")} == {p.name for p in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_golden_render_keeps_the_facts_of_its_example(example: Path) -> None:
    model = the_model(example)
    name, spec = model["metadata"]["name"], model["spec"]
    namespace = model["metadata"].get("namespace", "default")
    scaling = spec.get("scaling", {})
    async_on = spec.get("async", {}).get("enabled", False)
    got = children(example)

    # Which children, all named after the model, in its namespace.
    autoscaler = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}.get(
        scaling.get("autoscaler", "hpa")
    )
    want = {("Deployment", name), ("Service", name)}
    want |= {(autoscaler, name)} if autoscaler else set()
    want |= {("Ingress", name)} if spec.get("ingress", {}).get("enabled") else set()
    want |= {("PodDisruptionBudget", name)} if scaling.get("maxReplicas", 1) > 1 else set()
    want |= (
        {("Deployment", f"{name}-gateway"), ("Service", f"{name}-gateway")} if async_on else set()
    )
    want |= {("ConfigMap", f"{name}-quota")} if spec.get("quotaPolicy") else set()
    candidates = spec.get("traffic", {}).get("candidates", [])
    stable_version = spec["model"].get("version", "1")
    for c in candidates:
        # The examples' versions are DNS-clean: each candidate's children are NAME-vVERSION.
        own = f"{name}-v{c['version']}"
        scale = c.get("scaling", scaling)
        kind = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}.get(
            scale.get("autoscaler", "hpa")
        )
        want |= {("Deployment", own), ("Service", own)}
        want |= {(kind, own)} if kind else set()
        want |= {("PodDisruptionBudget", own)} if scale.get("maxReplicas", 1) > 1 else set()
    if candidates:
        want |= {("Service", f"{name}-v{stable_version}")}
        want |= {("Deployment", f"{name}-router"), ("ConfigMap", f"{name}-router")}
        want |= {("PodDisruptionBudget", f"{name}-router")}
    assert set(got) == want
    assert {d["metadata"]["namespace"] for d in got.values()} == {namespace}

    # The Deployment runs the model the example names, and the Service selects its pods.
    deployment = got[("Deployment", name)]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {MODEL_LABEL: name}
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"][MODEL_LABEL] == name
    if candidates:
        # The model's Service reaches the router; each version's Service its own pods,
        # which no other version's selector picks.
        router = got[("Deployment", f"{name}-router")]
        router_pods = router["spec"]["template"]["metadata"]["labels"]
        assert got[("Service", name)]["spec"]["selector"].items() <= router_pods.items()
        assert MODEL_LABEL not in router_pods
        assert got[("Service", f"{name}-v{stable_version}")]["spec"]["selector"] == selector
        for c in candidates:
            own = got[("Deployment", f"{name}-v{c['version']}")]
            own_pods = own["spec"]["template"]["metadata"]["labels"]
            assert (
                got[("Service", f"{name}-v{c['version']}")]["spec"]["selector"]
                == (own["spec"]["selector"]["matchLabels"])
            )
            assert not selector.items() <= own_pods.items()
            assert (
                env_of(own["spec"]["template"]["spec"]["containers"][0])["KUBEONNX_MODEL_URI"]
                == c["model"]["uri"]
            )
        (router_container,) = router["spec"]["template"]["spec"]["containers"]
        assert router_container["args"][:3] == ["serve", "--role", "router"]
    else:
        assert got[("Service", name)]["spec"]["selector"] == selector
    (container,) = pod["spec"]["containers"]
    env = env_of(container)
    assert env["KUBEONNX_MODEL_URI"] == spec["model"]["uri"]
    assert env["KUBEONNX_MODEL_NAME"] == name
    assert env.get("KUBEONNX_MODEL_SHA256") == spec["model"].get("sha256")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT, "metrics": METRICS_PORT}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # Replicas belong to the autoscaler; otherwise the operator sets them.
    if autoscaler:
        assert "replicas" not in deployment["spec"]
        scaler = got[(autoscaler, name)]["spec"]
        assert scaler["scaleTargetRef"]["name"] == name
        if autoscaler == "ScaledObject":
            assert scaler["minReplicaCount"] == scaling.get("minReplicas", 1)
            assert scaler["maxReplicaCount"] == scaling.get("maxReplicas", 1)
        else:
            assert scaler["minReplicas"] == max(scaling.get("minReplicas", 1), 1)
            assert scaler["maxReplicas"] == scaling.get("maxReplicas", 1)

    # A GPU model asks for its GPUs where the profile's nodes are.
    count = spec.get("accelerator", {}).get("count", 0)
    limits = container["resources"].get("limits", {})
    if count:
        assert limits[GPU_RESOURCE] == str(count)
        assert env["KUBEONNX_DEVICE"] == "cuda"
        if spec["accelerator"]["profile"] == "h100":
            assert H100.items() <= pod["spec"]["nodeSelector"].items()
        assert any(t["key"] == GPU_RESOURCE for t in pod["spec"]["tolerations"])
    else:
        assert GPU_RESOURCE not in limits and env["KUBEONNX_DEVICE"] == "cpu"

    # The route: the host, under the model's prefix, to the model's Service.
    if ("Ingress", name) in got:
        (rule,) = got[("Ingress", name)]["spec"]["rules"]
        assert rule["host"] == spec["ingress"]["host"]
        prefix = spec["ingress"].get("path", f"/models/{namespace}/{name}")
        paths = {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
        assert paths[prefix] == name
        assert all(p.startswith(prefix) for p in paths)

    # The gateway: its own pods, which the model's selector and Service never pick.
    if async_on:
        gateway = got[("Deployment", f"{name}-gateway")]
        gateway_pods = gateway["spec"]["template"]["metadata"]["labels"]
        assert MODEL_LABEL not in gateway_pods and gateway_pods[GATEWAY_LABEL] == name
        assert gateway["spec"]["selector"]["matchLabels"] == {GATEWAY_LABEL: name}
        assert got[("Service", f"{name}-gateway")]["spec"]["selector"] == {GATEWAY_LABEL: name}
        (gw,) = gateway["spec"]["template"]["spec"]["containers"]
        assert env_of(gw)["KUBEONNX_ROLE"] == "gateway" and GPU_RESOURCE not in str(gw)

    # The quota: the model's pods mount the runtime's quota file (a ConfigMap) and, beside
    # it, the tenants' Secrets.
    if spec.get("quotaPolicy"):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        sources = volumes["quota"]["projected"]["sources"]
        assert sources[0]["configMap"]["name"] == f"{name}-quota"
        assert all("secret" in source for source in sources[1:])
        assert env["KUBEONNX_QUOTA_CONFIG"].startswith("/etc/kubeonnx/quota/")
