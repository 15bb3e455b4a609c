"""/metrics names tenants and their traffic: with a metrics port it is served there alone,
and the operator points the scraper (PodMonitor, prometheus.io annotations) at that port,
which neither the Service nor the Ingress carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_runtime.quota import key_hash

from e2e.cluster import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_are_served_on_the_metrics_port_only(serve, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "quota.json"
    config.write_text(
        json.dumps(
            {
                "policy": "team",
                "namespace": "tests",
                "tenants": [{"name": "acme", "keySha256": [key_hash("acme-key")]}],
            }
        )
    )
    port = free_port()
    served = serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        "--quota-config",
        str(config),
        "--route-prefix",
        "/models/vision/mlp",
        "--metrics-port",
        str(port),
    )
    request = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    with httpx.Client(timeout=30) as http:
        answer = http.post(
            f"{served.url}/v2/models/mlp/infer", json=request, headers={"X-Api-Key": "acme-key"}
        )
        assert answer.status_code == 200
        # The port a Service and an Ingress carry: no metrics, under the prefix or not.
        for path in ("/metrics", "/models/vision/mlp/metrics"):
            public = http.get(f"{served.url}{path}")
            assert public.status_code == 404 and "acme" not in public.text, path
        scraped = http.get(f"http://127.0.0.1:{port}/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        assert 'tenant="acme"' in scraped.text  # kubeonnx_quota_decisions_total
        assert "kubeonnx_requests_total" in scraped.text
        # The metrics port serves metrics and nothing else.
        for path in ("/v2/health/ready", "/v2/models/mlp", "/v2/quota"):
            assert http.get(f"http://127.0.0.1:{port}{path}").status_code == 404, path


def rendered(example: str, *, pod_monitor: bool) -> dict[tuple[str, str], dict[str, Any]]:
    path = ROOT / "examples" / example
    docs = [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    children, problems = render_documents(docs, OperatorConfig(), pod_monitor=pod_monitor)
    assert not problems
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def container_ports(deployment: dict[str, Any]) -> tuple[dict[str, int], dict[str, str]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return {p["name"]: p["containerPort"] for p in container["ports"]}, env


def test_the_operator_points_the_scraper_at_the_metrics_port_and_nothing_else_at_it() -> None:
    children = rendered("async-queue.yaml", pod_monitor=True)
    model = children[("Deployment", "batch-scorer")]
    ports, env = container_ports(model)
    assert ports == {"http": 8080, "metrics": 9090}
    assert env["KUBEONNX_PORT"] == "8080" and env["KUBEONNX_METRICS_PORT"] == "9090"
    annotations = model["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090"
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = children[("PodMonitor", "batch-scorer")]["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in monitor] == ["metrics"]
    # The gateway counts tenants' submissions too: its metrics are apart as well.
    gateway_ports, gateway_env = container_ports(children[("Deployment", "batch-scorer-gateway")])
    assert gateway_ports == {"http": 8080, "metrics": 9090}
    assert gateway_env["KUBEONNX_METRICS_PORT"] == "9090"
    # Nothing that routes traffic to the pods carries the metrics port.
    for kind, name in children:
        if kind == "Service":
            service = children[(kind, name)]["spec"]["ports"]
            assert [(p["name"], p["targetPort"]) for p in service] == [("http", "http")], name
        if kind == "Ingress":
            for rule in children[(kind, name)]["spec"]["rules"]:
                for p in rule["http"]["paths"]:
                    assert p["backend"]["service"]["port"] == {"name": "http"}
