"""What CI checks of the chart and the rendered manifests, against the real API server:
`helm lint --strict`, and a strict server-side dry-run of `helm template` and of
`kubeonnx render` for every example (schemas, CEL, unknown fields all refused there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from e2e.conftest import Cluster

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubeonnx"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def helm() -> str:
    from e2e.cluster import build_binaries

    return str(build_binaries()["helm"])


def dry_run(cluster: Cluster, namespace: str, manifests: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
        input=manifests,
        check=False,
    )


def test_helm_lint_strict() -> None:
    proc = subprocess.run([helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_values_the_schema_refuses_never_reach_a_template() -> None:
    proc = subprocess.run(
        [helm(), "template", "r", str(CHART), "--set", "replicas=0", "--set", "oops=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "replicas" in proc.stderr and "oops" in proc.stderr


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_passes_a_strict_server_side_dry_run(
    cluster: Cluster, namespace: str, mode: str
) -> None:
    args = [helm(), "template", "kubeonnx", str(CHART), "-n", namespace]
    if mode == "namespaced":
        args += ["--set", f"watchNamespaces={{{namespace}}}"]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    if mode == "namespaced":
        assert "kind: ClusterRole" not in rendered
    else:
        assert f"name: {namespace}-kubeonnx" in rendered  # release-scoped cluster names
    # Every namespaced object says where it goes (no ConfigMap landing in default).
    for doc in yaml.safe_load_all(rendered):
        if doc and doc["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"].get("namespace") == namespace, doc["kind"]
    proc = dry_run(cluster, namespace, rendered)
    assert proc.returncode == 0, proc.stderr


def test_every_rendered_example_passes_a_strict_server_side_dry_run(
    cluster: Cluster, namespace: str
) -> None:
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    args = [str(Path(sys.executable).parent / "kubeonnx"), "render", "--pod-monitor"]
    for example in EXAMPLES:
        args += ["-f", str(example)]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    models = [
        d
        for e in EXAMPLES
        for d in yaml.safe_load_all(e.read_text())
        if d and d["kind"] == "InferenceModel"
    ]
    gateways = sum(1 for d in models if (d["spec"].get("async") or {}).get("enabled"))
    assert kinds.count("Deployment") == len(models) + gateways and "PodMonitor" in kinds
    proc = dry_run(cluster, "default", rendered)  # render's namespace, where none is given
    assert proc.returncode == 0, proc.stderr
    # And the examples themselves.
    for example in EXAMPLES:
        proc = dry_run(cluster, namespace, example.read_text())
        assert proc.returncode == 0, f"{example.name}: {proc.stderr}"
