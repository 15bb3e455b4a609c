"""Secrets on the real control plane: the operator asks the API server for a Secret's
metadata only, asks nothing on an idle resync, and never connects to a QuotaPolicy's Redis
or reads its password (the chart's identity runs it, as in e2e/test_chart.py); the runtime,
run from the Deployment the operator wrote, reads the keys the pod mounts.

The last test uses the module's `operator` fixture: it comes last, so that operator never
runs beside the chart's."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.conftest import Cluster, eventually
from e2e.contract import run_container
from e2e.generate_models import generate
from e2e.operator_process import OperatorProcess
from e2e.test_chart import chart_operator, install_crds, secret_requests
from e2e.test_operator import model, prepare_namespace, ready
from e2e.test_quota import policy, policy_status

pytestmark = pytest.mark.e2e


@pytest.fixture
def listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP port on loopback that records every connection made to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    seen: list[str] = []

    def accept() -> None:
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            seen.append(f"{peer[0]}:{peer[1]}")
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1], seen
    finally:
        server.close()


def test_an_idle_resync_reads_no_secret_and_the_policys_redis_is_never_dialled(
    cluster: Cluster, namespace: str, tmp_path: Path, listener: tuple[int, list[str]]
) -> None:
    if not cluster.local:
        pytest.skip("installs the chart's RBAC and reads the audit log")
    port, dialled = listener
    models = f"{namespace}-models"
    cluster.kubectl("create", "namespace", models)
    try:
        with chart_operator(cluster, namespace, tmp_path, [models], "resyncSeconds=2") as chart:
            prepare_namespace(cluster, models)
            for name, data in (
                ("acme-key", {"token": "a1"}),
                ("globex-key", {"token": "g1"}),
                ("redis-admin", {"password": "hunter2"}),
            ):
                cluster.create_secret(name, models, data)
            backend = {
                "redis": {
                    "url": f"redis://127.0.0.1:{port}/0",
                    "passwordSecret": {"name": "redis-admin", "key": "password"},
                }
            }
            assert cluster.apply(policy("team", backend=backend), models).returncode == 0
            assert cluster.apply(model("metered", quotaPolicy="team"), models).returncode == 0
            ready(cluster, models, "metered")
            status = eventually(
                lambda: (
                    (s := policy_status(cluster, models, "team"))
                    .get("conditions", [{}])[0]
                    .get("reason")
                    == "Ready"
                    and s
                ),
                60,
                what="the policy Ready",
            )
            # Where usage is counted, and nothing about the network: no address, no port.
            assert status["store"] == "redis" and "usage" not in status
            assert str(port) not in json.dumps(status) and "127.0.0.1" not in json.dumps(status)

            asked = secret_requests(cluster, chart.user)
            assert {r["name"] for r in asked} == {"acme-key", "globex-key"}  # not the password

            # Two resyncs of the model and the policy: not one more request on a Secret.
            def reconciles() -> float:
                found = chart.process.metrics()
                return sum(v for k, v in found.items() if "reconciles_total" in k)

            before = reconciles()
            eventually(lambda: reconciles() >= before + 4, 60, what="two resyncs")
            assert secret_requests(cluster, chart.user) == asked
            assert dialled == []  # the operator never connected to the policy's Redis
    finally:
        cluster.kubectl("delete", "namespace", models, "--wait=false", check=False)


def test_the_operator_receives_a_secrets_metadata_never_its_data(
    cluster: Cluster, namespace: str
) -> None:
    if not cluster.local:
        pytest.skip("uses the operator's own identity on the local plane")
    from kubeonnx_operator.kube import Kube
    from lightkube import AsyncClient
    from lightkube.config.kubeconfig import KubeConfig

    cluster.create_secret("acme-key", namespace, {"token": "acme-secret-value"})

    async def ask() -> tuple[dict | None, dict | None]:  # type: ignore[type-arg]
        client = AsyncClient(config=KubeConfig.from_file(cluster.operator_kubeconfig))
        try:
            kube = Kube(client)
            return (
                await kube.secret_metadata(namespace, "acme-key"),
                await kube.secret_metadata(namespace, "absent"),
            )
        finally:
            await client.close()

    found, absent = asyncio.run(ask())
    assert absent is None
    assert found is not None and found["kind"] == "PartialObjectMetadata"
    assert found["metadata"]["name"] == "acme-key"
    assert "data" not in found and "acme-secret-value" not in json.dumps(found)
    assert "YWNtZS1zZWNyZXQtdmFsdWU" not in json.dumps(found)  # nor base64 of it


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"name": "acme-key", "key": ".."}, "must be a Secret key (not '.' and not starting"),
        ({"name": "acme-key", "key": "a/b"}, "spec.tenants[0].apiKeySecret.key: Invalid value"),
        ({"name": "../etc", "key": "token"}, "spec.tenants[0].apiKeySecret.name: Invalid value"),
    ],
)
def test_a_secret_name_or_key_that_is_no_path_is_refused(
    cluster: Cluster, namespace: str, ref: dict[str, str], message: str
) -> None:
    """The keys are mounted at keys/<name>/<key>: the API server refuses what is not a
    Secret's name or key, so no mount path leaves the quota volume."""
    install_crds(cluster)
    bad = policy("bad")
    bad["spec"]["tenants"][0]["apiKeySecret"] = ref
    refused = cluster.apply(bad, namespace)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr


def test_the_runtime_reads_the_keys_the_pod_mounts_and_follows_a_rotation(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The contract: the Deployment the operator wrote, run as written with its projected
    volume laid out as the kubelet would (e2e/contract.py), knows the tenants by the keys in
    their Secrets, and a key rotated in the mounted file takes effect without a restart."""
    mlp = generate(tmp_path_factory.mktemp("mlp"), ["mlp"])["mlp"]
    cluster.create_secret("acme-key", namespace, {"token": "acme-1\nacme-2"})
    cluster.create_secret("globex-key", namespace, {"token": "globex-1"})
    assert cluster.apply(policy("team"), namespace).returncode == 0
    metered = model("metered", quotaPolicy="team")
    metered["spec"]["model"] = {"uri": f"file://{mlp}"}
    assert cluster.apply(metered, namespace).returncode == 0
    deployment = eventually(
        lambda: (d := cluster.get("deployment", "metered", "-n", namespace)) and d,
        60,
        what="the Deployment",
    )
    config_map = cluster.get("configmap", "metered-quota", "-n", namespace)
    secrets = {s: cluster.get("secret", s, "-n", namespace) for s in ("acme-key", "globex-key")}
    assert config_map is not None and all(secrets.values())
    runtime = run_container(
        deployment,
        secrets,  # type: ignore[arg-type]
        tmp_path,
        config_maps={"metered-quota": config_map},
    )
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}

    def infer(key: str) -> int:
        url = f"{runtime.url}/v2/models/metered/infer"
        return httpx.post(url, json=body, headers={"X-Api-Key": key}, timeout=10).status_code

    try:
        runtime.probe("startupProbe")
        runtime.probe("readinessProbe")
        assert infer("acme-2") == 200 and infer("globex-1") == 200
        assert infer("not-a-key") == 401  # the policy has no default tenant
        usage = httpx.get(f"{runtime.url}/v2/quota", headers={"X-Api-Key": "acme-1"}, timeout=10)
        assert usage.status_code == 200 and usage.json()["tenant"] == "acme"

        # The kubelet updates the mounted Secret in place; the runtime follows it.
        mounted = next((tmp_path / "volumes").glob("quota/keys/acme-key/token"))
        scratch = mounted.with_name("token.new")
        scratch.write_text("acme-3")
        scratch.replace(mounted)
        eventually(lambda: infer("acme-3") == 200, 60, what="the rotated key accepted")
        assert infer("acme-1") == 401
    finally:
        assert runtime.stop() == 0


def test_a_secret_without_the_named_key_stops_the_runtime_with_a_line_naming_it(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The operator sees only that a Secret exists, not what it holds: a Secret without the
    key the policy names is found by the runtime, whose one-line termination message (what
    the model's status shows as ModelLoadFailed) names the tenant and the file."""
    mlp = generate(tmp_path_factory.mktemp("mlp"), ["mlp"])["mlp"]
    cluster.create_secret("acme-key", namespace, {"token": "acme-1"})
    cluster.create_secret("globex-key", namespace, {"other": "g"})  # no "token"
    assert cluster.apply(policy("team"), namespace).returncode == 0
    metered = model("metered", quotaPolicy="team")
    metered["spec"]["model"] = {"uri": f"file://{mlp}"}
    assert cluster.apply(metered, namespace).returncode == 0
    deployment = eventually(
        lambda: (d := cluster.get("deployment", "metered", "-n", namespace)) and d,
        60,
        what="the Deployment (the Secret exists: the operator serves the model)",
    )
    secrets = {s: cluster.get("secret", s, "-n", namespace) for s in ("acme-key", "globex-key")}
    config_map = cluster.get("configmap", "metered-quota", "-n", namespace)
    runtime = run_container(
        deployment,
        secrets,  # type: ignore[arg-type]
        tmp_path,
        config_maps={"metered-quota": config_map},  # type: ignore[dict-item]
    )
    try:
        code = runtime.proc.wait(120)
    finally:
        runtime.stop()
    assert code != 0
    line = runtime.termination_log.read_text().strip()
    assert line.startswith("quota: tenant 'globex' has no API key: "), line
    assert line.endswith(
        "/keys/globex-key/token is missing or empty (its Secret, or the key in it, does not exist)"
    ), line
