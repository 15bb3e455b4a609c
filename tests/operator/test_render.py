"""Renderers against golden manifests, and the behaviour a model owner relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render import Model, render_children
from kubeonnx_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def models_in(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "InferenceModel"]


def render(doc: dict[str, Any], config: OperatorConfig | None = None) -> dict[str, dict[str, Any]]:
    meta = doc["metadata"]
    model = Model(meta["name"], meta.get("namespace", "default"), parse_spec(doc["spec"]))
    return {c["kind"]: c for c in render_children(model, config or OperatorConfig())}


def spec(**fields: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"model": {"uri": "s3://b/k.onnx"}, **fields},
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_render_to_their_golden_manifests(example: Path) -> None:
    # As `kubeonnx render -f` does: a QuotaPolicy and its Secrets come from the same file.
    docs = [(example.name, d) for d in yaml.safe_load_all(example.read_text()) if d]
    rendered, problems = render_documents(docs, OperatorConfig())
    assert not problems
    text = yaml.safe_dump_all(rendered, sort_keys=False)
    golden = GOLDEN / example.name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == golden.read_text()


def test_gpu_model_gets_limits_placement_cuda_image_and_device() -> None:
    children = render(
        spec(
            accelerator={"count": 2, "profile": "h100"},
            scheduling={
                "nodeSelector": {"zone": "a"},
                "tolerations": [{"key": "spot", "operator": "Exists"}],
            },
        )
    )
    pod = children["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["image"].endswith("-cuda")
    assert {"name": "KUBEONNX_DEVICE", "value": "cuda"} in container["env"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": "a"}
    keys = [t["key"] for t in pod["tolerations"]]
    assert keys == ["nvidia.com/gpu", "spot"]


def test_cpu_model_has_no_gpu_and_a_locked_down_pod() -> None:
    deployment = render(spec())["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "limits" not in container["resources"]
    assert {"name": "KUBEONNX_DEVICE", "value": "cpu"} in container["env"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    probes = {
        k: container[k]["httpGet"]["path"]
        for k in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes == {
        "startupProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }


def test_replicas_belong_to_the_autoscaler_when_there_is_one() -> None:
    assert "replicas" not in render(spec())["Deployment"]["spec"]
    fixed = render(spec(scaling={"autoscaler": "none", "minReplicas": 3, "maxReplicas": 3}))
    assert fixed["Deployment"]["spec"]["replicas"] == 3
    assert "HorizontalPodAutoscaler" not in fixed and "ScaledObject" not in fixed


def test_autoscaler_choice_renders_one_kind() -> None:
    hpa = render(spec(scaling={"maxReplicas": 4}))
    assert "HorizontalPodAutoscaler" in hpa and "ScaledObject" not in hpa
    demand = {"prometheusQuery": 'sum(rate(x{ns="${namespace}",ing="${name}"}[1m]))'}
    keda = render(
        spec(scaling={"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 4, "demand": demand})
    )
    so = keda["ScaledObject"]
    assert "HorizontalPodAutoscaler" not in keda
    assert so["spec"]["minReplicaCount"] == 0
    inflight, wake = so["spec"]["triggers"]
    assert inflight["type"] == "prometheus"
    assert 'kubeonnx_inflight_requests{namespace="ns",model="m"}' in inflight["metadata"]["query"]
    # What wakes a model at zero replicas, where the in-flight gauge does not exist.
    assert wake["metadata"]["query"] == 'sum(rate(x{ns="ns",ing="m"}[1m]))'
    assert wake["metadata"]["activationThreshold"] == "0"


def test_keda_polling_and_cooldown_come_from_the_operator_configuration() -> None:
    keda = spec(scaling={"autoscaler": "keda", "minReplicas": 1, "maxReplicas": 4})
    default = render(keda)["ScaledObject"]["spec"]
    assert (default["pollingInterval"], default["cooldownPeriod"]) == (15, 300)
    config = OperatorConfig(keda_polling_seconds=2, keda_cooldown_seconds=10)
    short = render(keda, config)["ScaledObject"]["spec"]
    assert (short["pollingInterval"], short["cooldownPeriod"]) == (2, 10)


def test_an_ingress_on_the_whole_host_routes_slash() -> None:
    ingress = render(spec(ingress={"enabled": True, "host": "h.example", "path": "/"}))
    rule = ingress["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]
    assert rule["path"] == "/"  # not "" (refused by the API server)
    env = {e["name"]: e.get("value") for e in _container(ingress)["env"]}
    assert env["KUBEONNX_ROUTE_PREFIX"] == "/"


def _container(children: dict[str, dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return container


def test_default_requests_never_exceed_a_users_limit() -> None:
    resources = _container(render(spec(resources={"limits": {"memory": "512Mi"}})))["resources"]
    # No memory request: the API server takes the 512Mi limit as the request.
    assert resources["requests"] == {"cpu": "1", "ephemeral-storage": "10Gi"}
    assert resources["limits"] == {"memory": "512Mi"}
    default = _container(render(spec()))["resources"]["requests"]
    assert default == {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "10Gi"}


def test_pod_options_reach_the_pod_and_the_model_cache_is_bounded() -> None:
    pod = {
        "annotations": {"team": "vision"},
        "labels": {"cost-center": "42", "kubeonnx.io/inferencemodel": "other"},
        "env": [{"name": "OMP_WAIT_POLICY", "value": "PASSIVE"}],
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": "inference",
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    }
    children = render(
        spec(pod=pod, modelCache={"sizeLimit": "40Gi"}, accelerator={"count": 1, "profile": "a"}),
        OperatorConfig(profiles={"a": {"runtimeClassName": "nvidia"}}),
    )
    template = children["Deployment"]["spec"]["template"]
    pod_spec, container = template["spec"], _container(children)
    assert template["metadata"]["annotations"]["team"] == "vision"
    assert template["metadata"]["labels"]["cost-center"] == "42"
    assert template["metadata"]["labels"]["kubeonnx.io/inferencemodel"] == "m"  # ours win
    assert {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"} in container["env"]
    assert pod_spec["imagePullSecrets"] == [{"name": "registry"}]
    assert pod_spec["priorityClassName"] == "inference"
    assert pod_spec["runtimeClassName"] == "nvidia"  # from the accelerator profile
    assert pod_spec["topologySpreadConstraints"] == pod["topologySpreadConstraints"]
    assert pod["volumes"][0] in pod_spec["volumes"]
    assert pod["volumeMounts"][0] in container["volumeMounts"]
    cache = next(v for v in pod_spec["volumes"] if v["name"] == "model-cache")
    assert cache["emptyDir"] == {"sizeLimit": "40Gi"}
    assert container["resources"]["requests"]["ephemeral-storage"] == "40Gi"
    own = render(
        spec(pod={"runtimeClassName": "kata"}, accelerator={"count": 1, "profile": "a"}),
        OperatorConfig(profiles={"a": {"runtimeClassName": "nvidia"}}),
    )
    assert own["Deployment"]["spec"]["template"]["spec"]["runtimeClassName"] == "kata"


def test_pod_monitor_only_where_its_crd_is() -> None:
    model = Model("m", "ns", parse_spec(spec()["spec"]))
    assert "PodMonitor" not in {c["kind"] for c in render_children(model, OperatorConfig())}
    with_crd = {c["kind"]: c for c in render_children(model, OperatorConfig(), pod_monitor=True)}
    monitor = with_crd["PodMonitor"]["spec"]
    assert monitor["selector"] == {"matchLabels": {"kubeonnx.io/inferencemodel": "m"}}
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    off = OperatorConfig(pod_monitor=False)
    assert "PodMonitor" not in {c["kind"] for c in render_children(model, off, pod_monitor=True)}


def test_pdb_only_when_more_than_one_replica_and_ingress_only_when_enabled() -> None:
    single = render(spec())
    assert "PodDisruptionBudget" not in single and "Ingress" not in single
    many = render(
        spec(
            scaling={"maxReplicas": 2},
            ingress={"enabled": True, "host": "h.example", "tlsSecret": "t"},
        )
    )
    assert many["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    rule = many["Ingress"]["spec"]["rules"][0]
    assert rule["http"]["paths"][0]["path"] == "/models/ns/m"
    assert "annotations" not in many["Ingress"]["metadata"]  # no rewrite needed
    env = many["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBEONNX_ROUTE_PREFIX", "value": "/models/ns/m"} in env


def test_credentials_come_from_the_named_secret() -> None:
    env = render(spec(model={"uri": "s3://b/k", "s3": {"credentialsSecret": "creds"}}))[
        "Deployment"
    ]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["AWS_SESSION_TOKEN"]["optional"] is True


def test_children_are_named_and_labelled_after_the_parent() -> None:
    for child in render(spec(scaling={"maxReplicas": 2})).values():
        assert child["metadata"]["name"] == "m" and child["metadata"]["namespace"] == "ns"
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubeonnx"
        assert child["metadata"]["labels"]["kubeonnx.io/inferencemodel"] == "m"
        assert "ownerReferences" not in child["metadata"]  # added by the reconciler


def by_name(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    meta = doc["metadata"]
    model = Model(meta["name"], meta.get("namespace", "default"), parse_spec(doc["spec"]))
    return {(c["kind"], c["metadata"]["name"]): c for c in render_children(model, OperatorConfig())}


ASYNC = {"enabled": True, "redis": {"url": "rediss://queue.example:6380/2"}}


def test_the_gateway_pods_are_not_the_models_and_the_ingress_routes_submissions_to_them() -> None:
    children = by_name(spec(**{"async": ASYNC}, ingress={"enabled": True, "host": "h"}))
    model = children[("Deployment", "m")]
    gateway = children[("Deployment", "m-gateway")]
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    # Neither the model's Deployment nor its Service may select a gateway pod.
    for selector in (
        model["spec"]["selector"]["matchLabels"],
        children[("Service", "m")]["spec"]["selector"],
    ):
        assert not set(selector.items()) <= set(pod_labels.items())
    assert (
        children[("Service", "m-gateway")]["spec"]["selector"]
        == gateway["spec"]["selector"]["matchLabels"]
    )
    env = {
        e["name"]: e.get("value")
        for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBEONNX_ROLE"] == "gateway"
    assert env["KUBEONNX_ASYNC_PREFIX"] == "kubeonnx:{ns/m}"
    assert env["KUBEONNX_ASYNC_CLAIM_AFTER_S"] == "300"
    assert "resources" in gateway["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(gateway)
    paths = {
        p["path"]: p["backend"]["service"]["name"]
        for p in children[("Ingress", "m")]["spec"]["rules"][0]["http"]["paths"]
    }
    assert paths == {
        "/models/ns/m": "m",
        "/models/ns/m/v2/models/m/async-infer": "m-gateway",
        "/models/ns/m/v2/models/m/requests": "m-gateway",
    }


def test_an_async_model_scales_from_zero_on_the_queue_lag() -> None:
    children = by_name(
        spec(**{"async": ASYNC}, scaling={"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 5})
    )
    scaled = children[("ScaledObject", "m")]["spec"]
    assert scaled["minReplicaCount"] == 0
    queue = next(t for t in scaled["triggers"] if t["type"] == "redis-streams")
    assert queue["metadata"] == {
        "address": "queue.example:6380",
        "stream": "kubeonnx:{ns/m}:requests",
        "consumerGroup": "kubeonnx",
        "lagCount": "16",
        "activationLagCount": "0",
        "databaseIndex": "2",
        "enableTLS": "true",
    }


def test_image_processing_reaches_the_runtime_and_mounts_the_labels() -> None:
    children = by_name(
        spec(
            processing={
                "input": {"image": {"size": [32, 32]}},
                "output": {"classification": {"labelsConfigMap": {"name": "l", "key": "k"}}},
            }
        )
    )
    pod = children[("Deployment", "m")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    processing = json.loads(env["KUBEONNX_PROCESSING"])
    assert processing["input"]["image"]["size"] == [32, 32]
    assert processing["output"]["classification"]["topK"] == 5
    assert env["KUBEONNX_LABELS_FILE"] == "/etc/kubeonnx/labels/labels.txt"
    labels = next(v for v in pod["volumes"] if v["name"] == "labels")
    assert labels["configMap"] == {"name": "l", "items": [{"key": "k", "path": "labels.txt"}]}


def test_scaled_to_zero_says_what_wakes_the_model() -> None:
    async_only = Model("m", "ns", parse_spec(spec(**{"async": ASYNC})["spec"]))
    assert async_only.wake_signal() == "requests are queued in kubeonnx:{ns/m}:requests"
    both = Model(
        "m",
        "ns",
        parse_spec(
            spec(
                **{"async": ASYNC},
                scaling={
                    "autoscaler": "keda",
                    "minReplicas": 0,
                    "demand": {"prometheusQuery": 'rate(x{ns="${namespace}"}[1m])'},
                },
            )["spec"]
        ),
    )
    assert both.wake_signal() == (
        'rate(x{ns="ns"}[1m]) > 0 or requests are queued in kubeonnx:{ns/m}:requests'
    )
    assert Model("m", "ns", parse_spec(spec()["spec"])).wake_signal() is None
