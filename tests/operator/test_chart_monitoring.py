"""The chart's dashboard ConfigMap and PrometheusRule: off by default, rendered when asked
(the rule only where its CRD exists), and carrying the same dashboard and rules as
examples/monitoring/. Needs the pinned helm; skipped until it is built."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.test_chart_values import CHART, helm_binary

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "monitoring"
RULE_CRD = "monitoring.coreos.com/v1/PrometheusRule"


def render(*args: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(helm_binary()), "template", "r", str(CHART), "-n", "ops", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def kinds(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def dashboards(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})
    ]


def test_off_by_default_even_where_the_rule_crd_exists() -> None:
    docs = render("--api-versions", RULE_CRD)
    assert not dashboards(docs)
    assert "PrometheusRule" not in kinds(docs)


def test_the_dashboard_configmap_carries_the_sidecars_label_and_the_example_dashboard() -> None:
    (cm,) = dashboards(render("--set", "dashboards.enabled=true"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "ops"
    shipped = json.loads(cm["data"]["kubeonnx.json"])
    assert shipped == json.loads((EXAMPLES / "kubeonnx-dashboard.json").read_text())
    assert shipped["uid"] == "kubeonnx" and shipped["panels"]
    # A sidecar configured for another label value gets it.
    (cm,) = dashboards(
        render(
            "--set",
            "dashboards.enabled=true",
            "--set-string",
            "dashboards.labels.grafana_dashboard=kubeonnx",
        )
    )
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "kubeonnx"


def test_the_prometheus_rule_is_rendered_only_where_its_crd_exists() -> None:
    assert "PrometheusRule" not in kinds(render("--set", "alerts.enabled=true"))
    docs = render(
        "--set", "alerts.enabled=true", "--set", "alerts.labels.release=prom",
        "--api-versions", RULE_CRD,
    )  # fmt: skip
    (rule,) = kinds(docs)["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prom"
    # The same groups as the plain rules file, templates ({{ $labels.x }}) left for Prometheus.
    assert rule["spec"] == yaml.safe_load((EXAMPLES / "kubeonnx-alerts.yaml").read_text())
    summaries = [r["annotations"]["summary"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("{{ $labels.model }}" in s for s in summaries)


def test_the_charts_copies_are_the_examples() -> None:
    for chart, example in [
        ("dashboard.json", "kubeonnx-dashboard.json"),
        ("alerts.yaml", "kubeonnx-alerts.yaml"),
    ]:
        assert (CHART / "monitoring" / chart).read_bytes() == (EXAMPLES / example).read_bytes()


@pytest.mark.parametrize("value", ["dashboards.enabled=yes", "alerts.enabled=1"])
def test_the_schema_refuses_a_non_boolean(value: str) -> None:
    proc = subprocess.run(
        [str(helm_binary()), "template", "r", str(CHART), "--set-string", value],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "want boolean" in proc.stderr
