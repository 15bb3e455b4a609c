"""What CI checks of the chart and the rendered manifests, against the real API server:
`helm lint --strict`, a strict server-side dry-run of `helm template` and of `kubeonnx
render` for every example (schemas, CEL, unknown fields all refused there), and the operator
run as a process with what the chart installs (its config, its RBAC, its ServiceAccount's
token) in both RBAC modes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "kubeonnx"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


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
        [
            *[helm(), "template", "r", str(CHART), "--set", "replicas=0", "--set", "oops=1"],
            *["--set", "resources.request.cpu=1"],  # a misspelt nested key too
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "replicas" in proc.stderr and "oops" in proc.stderr
    assert "'request' not allowed" in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_passes_a_strict_server_side_dry_run(
    cluster: Cluster, namespace: str, mode: str
) -> None:
    args = [helm(), "template", "kubeonnx", str(CHART), "-n", namespace]
    if mode == "namespaced":  # as an installer with namespaced rights alone would
        args += ["--set", f"watchNamespaces={{{namespace}}}"]
        args += ["--set", "routeAdmissionPolicy.enabled=false"]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
    if mode == "namespaced":
        assert kinds & CLUSTER_SCOPED == set(), kinds  # nothing cluster-wide at all
    else:
        assert f"name: {namespace}-kubeonnx" in rendered  # release-scoped cluster names
        # the route policy, rendered by default (routeAdmissionPolicy.enabled)
        assert {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= kinds
    # Every namespaced object says where it goes (no ConfigMap landing in default).
    for doc in yaml.safe_load_all(rendered):
        if doc and doc["kind"] not in CLUSTER_SCOPED:
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
    # With candidates: one Deployment per candidate, and the router's.
    versions = sum(
        len(c) + 1 for d in models if (c := (d["spec"].get("traffic") or {}).get("candidates"))
    )
    deployments = len(models) + gateways + versions
    assert kinds.count("Deployment") == deployments and "PodMonitor" in kinds
    proc = dry_run(cluster, "default", rendered)  # render's namespace, where none is given
    assert proc.returncode == 0, proc.stderr
    # And the examples themselves.
    for example in EXAMPLES:
        proc = dry_run(cluster, namespace, example.read_text())
        assert proc.returncode == 0, f"{example.name}: {proc.stderr}"


@dataclass
class ChartOperator:
    """`kubeonnx operator` as the chart runs it: the chart's config, as its ServiceAccount."""

    release: str
    namespace: str  # the release's
    user: str  # the ServiceAccount's user name
    kubeconfig: Path  # a token of the chart's ServiceAccount
    process: OperatorProcess


def install_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/inferencemodels.kubeonnx.io",
        "crd/quotapolicies.kubeonnx.io",
    )


@contextmanager
def chart_operator(
    cluster: Cluster, namespace: str, workdir: Path, watch: list[str], *values: str
) -> Iterator[ChartOperator]:
    """Install the chart into `namespace` (watching `watch`, or every namespace), then run the
    operator as a process with the chart's rendered config, as the chart's ServiceAccount
    (a token from the TokenRequest API), with POD_NAMESPACE as the pod would have it. The
    chart's own Deployment is left to kwok, whose pods run nothing. `values`: more --set."""
    release = "kubeonnx"
    install_crds(cluster)
    args = [helm(), "--kubeconfig", cluster.kubeconfig, "install", release, str(CHART)]
    args += ["-n", namespace, "--skip-crds"]
    if watch:
        args += ["--set", f"watchNamespaces={{{','.join(watch)}}}"]
    for value in values:
        args += ["--set", value]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        token = cluster.kubectl(
            "create", "token", release, "-n", namespace, "--duration=1h"
        ).stdout.strip()
        admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
        user = f"system:serviceaccount:{namespace}:{release}"
        kubeconfig = workdir / "chart-operator.kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    **admin,
                    "users": [{"name": "chart", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": admin["current-context"],
                            "context": {"cluster": admin["clusters"][0]["name"], "user": "chart"},
                        }
                    ],
                }
            )
        )
        rendered = cluster.get("configmap", f"{release}-config", "-n", namespace)
        assert rendered is not None
        config = yaml.safe_load(rendered["data"]["config.yaml"])
        assert config["namespaces"] == watch
        process = OperatorProcess(str(kubeconfig), workdir, **config)  # healthPort added
        process.env = {"POD_NAMESPACE": namespace, "POD_NAME": f"{release}-e2e"}
        process.start()
        try:
            yield ChartOperator(release, namespace, user, kubeconfig, process)
        finally:
            process.stop()
            print(process.logs()[-5000:])
    finally:
        subprocess.run(
            [helm(), "--kubeconfig", cluster.kubeconfig, "uninstall", release, "-n", namespace],
            capture_output=True,
        )


def can_i(cluster: Cluster, user: str, verb: str, resource: str, namespace: str) -> bool:
    proc = cluster.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace, f"--as={user}", check=False
    )
    return proc.stdout.strip() == "yes"


def secret_requests(cluster: Cluster, user: str) -> list[dict[str, Any]]:
    """The user's requests on Secrets, from the audit log: verb, namespace, name, code."""
    assert cluster.audit_log is not None
    out = []
    with cluster.audit_log.open() as f:
        for line in f:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if event["user"]["username"] == user and ref.get("resource") == "secrets":
                code = (event.get("responseStatus") or {}).get("code")
                out.append(
                    {
                        "verb": event["verb"],
                        "ns": ref.get("namespace"),
                        "name": ref.get("name"),
                        "code": code,
                    }
                )
    return out


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_runs_the_operator_with_its_own_rbac_and_identity(
    cluster: Cluster, namespace: str, mode: str, tmp_path: Path
) -> None:
    if not cluster.local:
        pytest.skip("installs cluster-scoped RBAC; run against the local plane only")
    from e2e.test_operator import children, model, prepare_namespace, ready, until_reason
    from e2e.test_quota import policy, policy_status

    models = f"{namespace}-models"
    cluster.kubectl("create", "namespace", models)
    try:
        watch = [models] if mode == "namespaced" else []
        with chart_operator(cluster, namespace, tmp_path, watch) as chart:
            prepare_namespace(cluster, models)
            assert cluster.apply(policy("team"), models).returncode == 0
            assert cluster.apply(model("plain"), models).returncode == 0
            assert cluster.apply(model("metered", quotaPolicy="team"), models).returncode == 0

            # It reconciles: a model served, its children made by the chart's identity.
            ready(cluster, models, "plain")
            assert {"Deployment", "Service"} <= set(children(cluster, models, "plain"))
            # ... and a missing tenant Secret shows where a user looks.
            cond = until_reason(cluster, models, "metered", "QuotaSecretNotFound")
            assert "tenant 'acme'" in cond["message"] and "'acme-key'" in cond["message"]
            assert "Deployment" not in children(cluster, models, "metered")
            status = eventually(
                lambda: (s := policy_status(cluster, models, "team")).get("conditions") and s,
                60,
                what="the policy's status",
            )
            assert status["conditions"][0]["reason"] == "SecretNotFound"

            # The Secrets made, the policy changed: served, with the keys mounted by the kubelet.
            cluster.create_secret("acme-key", models, {"token": "a1"})
            cluster.create_secret("globex-key", models, {"token": "g1"})
            assert cluster.apply(policy("team", shadow=True), models).returncode == 0
            ready(cluster, models, "metered")
            pod = children(cluster, models, "metered")["Deployment"]["spec"]["template"]["spec"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == "quota"]
            names = {s["secret"]["name"] for s in volume["projected"]["sources"] if "secret" in s}
            assert names == {"acme-key", "globex-key"}

            # What it asked of Secrets: GETs by name (metadata only), nothing listed or watched.
            asked = secret_requests(cluster, chart.user)
            assert asked and {r["verb"] for r in asked} == {"get"}, asked
            # (cluster-wide, it may also serve what other tests left in namespaces going away)
            here = {r["name"] for r in asked if r["ns"] == models}
            assert here == {"acme-key", "globex-key"}, asked

            # And what it may not do: list, watch or write any Secret, here or anywhere.
            for verb in ("list", "watch", "create", "update", "patch", "delete"):
                for where in (models, namespace, "default"):
                    assert not can_i(cluster, chart.user, verb, "secrets", where), (verb, where)
            listed = subprocess.run(
                [
                    cluster.kubectl_bin,
                    "--kubeconfig",
                    str(chart.kubeconfig),
                    "get",
                    "secrets",
                    "-n",
                    models,
                ],
                capture_output=True,
                text=True,
            )
            assert listed.returncode != 0 and "Forbidden" in listed.stderr, listed.stderr
            if mode == "namespaced":  # nothing beyond the watched namespace
                assert not can_i(cluster, chart.user, "list", "inferencemodels", "default")
                assert not can_i(cluster, chart.user, "get", "secrets", "default")
                assert not can_i(cluster, chart.user, "list", "deployments", namespace)
                assert cluster.get("clusterrole", f"{namespace}-{chart.release}") is None
    finally:
        cluster.kubectl("delete", "namespace", models, "--wait=false", check=False)
