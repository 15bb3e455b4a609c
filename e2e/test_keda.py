"""The real KEDA operator (built from its Go module, e2e/keda_process.py) against the local
control plane, with a real redis-server and a real Prometheus for its triggers:

- KEDA accepts (Ready True) every ScaledObject the operator renders for the examples that
  use KEDA, the queue's redis-streams trigger reading its password from the model's Secret;
  a wrong password is not Ready, so Ready is KEDA's verdict on the live source;
- an async model at zero replicas is woken by one request queued as the gateway queues it,
  and goes back to zero once the queue is drained and the (shortened) cooldown has passed;
- the operator never fights KEDA: replicas stay KEDA's, and an idle resync writes nothing;
- above one replica: requests held in flight on a real `kubeonnx serve` process, scraped by
  the real Prometheus with the PodMonitor's labels, make the in-flight query exceed its
  target; the HPA KEDA creates reads it from KEDA's metrics adapter (e2e/keda_process.py)
  through the aggregation layer, and the real HPA controller scales the Deployment up.

The operator's ScaledObjects are made with KEDA's own CustomResourceDefinitions of the
version run (they replace the cluster's stand-in schema for this module, which is put back
after)."""

from __future__ import annotations

import asyncio
import copy
import secrets
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import yaml
from kubeonnx_runtime.asyncinfer import AsyncKeys, AsyncStore

from e2e.conftest import Cluster, eventually
from e2e.generate_models import generate
from e2e.keda_process import NAMESPACE as KEDA_NAMESPACE
from e2e.keda_process import KedaAdapterProcess, KedaProcess, keda_dir
from e2e.operator_process import OperatorProcess
from e2e.prometheus import LocalPrometheus, pod_monitor_scrape_configs
from e2e.redis_server import LocalRedis
from e2e.serving import wait_serving
from e2e.test_operator import (
    assert_idle_resync,
    condition,
    model,
    prepare_namespace,
    ready,
    resyncs,
    until_reason,
)
from e2e.test_prometheus_queries import start_replica

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
COOLDOWN_S = 10  # the operator's kedaCooldownSeconds here (300 by default)
PASSWORD_SECRET = {"name": "queue-redis", "key": "password"}
STAND_IN = ROOT / "e2e" / "manifests" / "keda-scaledobject-crd.yaml"  # what `up` installs


def keda_examples() -> list[dict[str, Any]]:
    """Every InferenceModel in examples/ that KEDA scales."""
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            scaling = (doc or {}).get("spec", {}).get("scaling", {})
            if doc and doc["kind"] == "InferenceModel" and scaling.get("autoscaler") == "keda":
                found.append(doc)
    return found


@pytest.fixture(scope="module")
def keda_crds(cluster: Cluster) -> Iterator[Path]:
    """KEDA's CustomResourceDefinitions of the version run, in place of the cluster's
    stand-in ScaledObject schema for this module; the stand-in is put back after (the
    suite's other modules expect the cluster as `up` made it: test_optional_crds.py deletes
    the one CRD and waits for the keda.sh group to be gone)."""
    if not cluster.local:
        pytest.skip("runs KEDA as a process against the local control plane only")
    crds = keda_dir() / "crds"
    # The stand-in: deleted (with any ScaledObject of earlier tests; their operator remakes
    # them) rather than merged into, so no field of it survives.
    cluster.kubectl("delete", "crd", "scaledobjects.keda.sh", "--ignore-not-found")
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        names = [
            f"crd/{yaml.safe_load(p.read_text())['metadata']['name']}" for p in crds.glob("*.yaml")
        ]
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
        yield crds
    finally:
        # KEDA no longer runs: a finalizer of its left on a ScaledObject would hold the
        # CRD's deletion for ever.
        left = cluster.get("scaledobjects.keda.sh", "-A") or {}
        for so in left.get("items", []):
            meta = so["metadata"]
            cluster.kubectl(
                "patch",
                "scaledobject.keda.sh",
                meta["name"],
                "-n",
                meta["namespace"],
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        cluster.kubectl("delete", "-f", str(crds), "--ignore-not-found", "--timeout=120s")
        cluster.kubectl("apply", "-f", str(STAND_IN))
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/scaledobjects.keda.sh"
        )


@pytest.fixture(scope="module")
def prometheus() -> Iterator[LocalPrometheus]:
    """What the in-flight (and demand) triggers query: empty, so they answer 0, but for the
    runtime process a test has it scrape."""
    server = LocalPrometheus().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def queue() -> Iterator[LocalRedis]:
    server = LocalRedis(password=secrets.token_hex(8)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster,
    repo_root: Path,
    keda_crds: Path,
    prometheus: LocalPrometheus,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """`kubeonnx operator` (conftest's, configured for this module): its triggers query the
    local Prometheus, KEDA polls every second and cools down in COOLDOWN_S."""
    cluster.kubectl("apply", "--server-side", "-f", str(repo_root / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/inferencemodels.kubeonnx.io"
    )
    op = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig,
        tmp_path_factory.mktemp("operator"),
        prometheusAddress=prometheus.url,
        kedaPollingSeconds=1,
        kedaCooldownSeconds=COOLDOWN_S,
    )
    op.start()
    yield op
    op.stop()
    print(op.logs()[-5000:])


@pytest.fixture(scope="module")
def keda(
    cluster: Cluster, keda_crds: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KedaProcess]:
    cluster.kubectl("create", "namespace", KEDA_NAMESPACE, check=False)
    process = KedaProcess(keda_dir() / "keda", cluster.kubeconfig, tmp_path_factory.mktemp("keda"))
    process.start()
    yield process
    # KEDA's finalizer is on every ScaledObject it saw: let it let go of those being deleted
    # with their namespaces, which would otherwise stay Terminating.
    cluster.kubectl(
        "wait",
        "--for=delete",
        "scaledobjects.keda.sh",
        "--all",
        "-A",
        "--timeout=60s",
        check=False,
    )
    process.stop()
    print(process.logs()[-5000:])


@pytest.fixture(scope="module")
def adapter(
    cluster: Cluster, keda: KedaProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KedaAdapterProcess]:
    """KEDA's metrics adapter, serving external.metrics.k8s.io from `keda`'s gRPC service."""

    def kubectl(*args: str, input: str | None = None) -> Any:
        return cluster.kubectl(*args, input=input, check=False)

    process = KedaAdapterProcess(
        keda_dir() / "keda-adapter",
        cluster.kubeconfig,
        tmp_path_factory.mktemp("keda-adapter"),
        keda,
        kubectl,
    )
    try:
        yield process.start()
    finally:
        process.stop()
        print(process.logs()[-5000:])


def keda_ready(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    """The ScaledObject's Ready condition, as KEDA set it ({} before KEDA has)."""
    so = cluster.get("scaledobject.keda.sh", name, "-n", ns) or {}
    conditions = (so.get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions}.get("Ready", {})


def until_keda_ready(cluster: Cluster, keda: KedaProcess, ns: str, name: str) -> None:
    def check() -> bool:
        assert keda.running(), f"KEDA exited:\n{keda.logs()[-3000:]}"
        return keda_ready(cluster, ns, name).get("status") == "True"

    try:
        eventually(check, 120, what=f"KEDA's Ready True on ScaledObject {ns}/{name}")
    except AssertionError:
        raise AssertionError(
            f"ScaledObject {ns}/{name}: {keda_ready(cluster, ns, name)}\n{keda.logs()[-3000:]}"
        ) from None


def on_queue(doc: dict[str, Any], queue: LocalRedis, ns: str, cluster: Cluster) -> dict[str, Any]:
    """The model with its queue on the local redis-server (its password in the Secret the
    spec names)."""
    doc = copy.deepcopy(doc)
    redis_spec = doc["spec"]["async"]["redis"]
    redis_spec["url"] = f"redis://127.0.0.1:{queue.port}/0"
    ref = redis_spec.setdefault("passwordSecret", PASSWORD_SECRET)
    if cluster.get("secret", ref["name"], "-n", ns) is None:
        assert queue.password is not None
        cluster.create_secret(ref["name"], ns, {ref["key"]: queue.password})
    return doc


def replicas(cluster: Cluster, ns: str, name: str) -> int | None:
    d = cluster.get("deployment", name, "-n", ns) or {}
    value: int | None = d.get("spec", {}).get("replicas")
    return value


def ready_replicas(cluster: Cluster, ns: str, name: str) -> int:
    d = cluster.get("deployment", name, "-n", ns) or {}
    return int(d.get("status", {}).get("readyReplicas") or 0)


def operator_owns_replicas(cluster: Cluster, ns: str, name: str) -> bool:
    """Whether the operator's field manager holds the Deployment's spec.replicas."""
    d = cluster.get("deployment", name, "-n", ns, "--show-managed-fields") or {}
    managers = {m["manager"] for m in d["metadata"]["managedFields"]}
    assert "kubeonnx" in managers, managers  # what the check below looks for
    return any(
        "f:replicas" in m.get("fieldsV1", {}).get("f:spec", {})
        for m in d["metadata"]["managedFields"]
        if m["manager"] == "kubeonnx"
    )


def test_keda_accepts_the_scaled_objects_of_the_examples(
    cluster: Cluster,
    operator: OperatorProcess,
    keda: KedaProcess,
    queue: LocalRedis,
    namespace: str,
) -> None:
    prepare_namespace(cluster, namespace)  # the examples' Secret and ServiceAccount
    examples = keda_examples()
    assert {e["metadata"]["name"] for e in examples} >= {"batch-scorer", "resnet-gpu"}
    for doc in examples:
        if doc["spec"].get("async", {}).get("enabled"):
            doc = on_queue(doc, queue, namespace, cluster)
        assert cluster.apply(doc, namespace).returncode == 0
    for name in (doc["metadata"]["name"] for doc in examples):
        until_keda_ready(cluster, keda, namespace, name)
    # The queue's trigger read the password from the model's Secret (through the scale
    # target's environment): redis-server refuses every command without it.
    so = cluster.get("scaledobject.keda.sh", "batch-scorer", "-n", namespace) or {}
    (stream,) = [t for t in so["spec"]["triggers"] if t["type"] == "redis-streams"]
    assert stream["metadata"]["passwordFromEnv"]
    assert stream["metadata"]["address"] == f"127.0.0.1:{queue.port}"

    # The same model with a wrong password: KEDA says the source failed, not Ready.
    (queued,) = [e for e in examples if e["metadata"]["name"] == "batch-scorer"]
    wrong = on_queue(queued, queue, namespace, cluster)
    wrong["metadata"]["name"] = "wrong-password"
    wrong["spec"]["async"]["redis"]["passwordSecret"] = {"name": "wrong-redis", "key": "password"}
    cluster.create_secret("wrong-redis", namespace, {"password": "not-the-password"})
    assert cluster.apply(wrong, namespace).returncode == 0
    cond = eventually(
        lambda: (
            (c := keda_ready(cluster, namespace, "wrong-password")).get("status") == "False" and c
        ),
        120,
        what="KEDA's Ready False on the ScaledObject with a wrong password",
    )
    assert cond["reason"] == "ScaledObjectCheckFailed"
    assert "WRONGPASS" in cond["message"], cond
    assert keda_ready(cluster, namespace, "batch-scorer")["status"] == "True"


def async_model(name: str, queue: LocalRedis) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"s3://models/{name}/model.onnx"},
            "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2},
            "async": {
                "enabled": True,
                "redis": {
                    "url": f"redis://127.0.0.1:{queue.port}/0",
                    "passwordSecret": PASSWORD_SECRET,
                },
            },
        },
    }


def gateway_prefix(cluster: Cluster, ns: str, name: str) -> str:
    """The queue's key prefix, as the operator gave it to the gateway."""
    gateway = cluster.get("deployment", f"{name}-gateway", "-n", ns) or {}
    env = gateway["spec"]["template"]["spec"]["containers"][0]["env"]
    (prefix,) = [e["value"] for e in env if e["name"] == "KUBEONNX_ASYNC_PREFIX"]
    return str(prefix)


async def submit(queue: LocalRedis, prefix: str) -> str:
    """One request queued the way the gateway queues it (its own AsyncStore)."""
    client = redis.asyncio.Redis.from_url(queue.url, password=queue.password)
    try:
        store = AsyncStore(client, AsyncKeys(prefix), max_queued=100, callback_hosts=[])
        return await store.submit(b"{}", None, tenant="", callback=None)
    finally:
        await client.aclose()


def drain(queue: LocalRedis, prefix: str) -> int:
    """Take every queued request and acknowledge it, as a replica does once answered."""
    client = queue.client()
    stream = AsyncKeys(prefix).stream
    taken: Any = client.xreadgroup("kubeonnx", "e2e-worker", {stream: ">"}, count=100) or []
    ids = [entry_id for _, entries in taken for entry_id, _ in entries]
    if ids:
        client.xack(stream, "kubeonnx", *ids)
        client.xdel(stream, *ids)
    return len(ids)


def idle_writes_nothing(
    cluster: Cluster, operator: OperatorProcess, ns: str, name: str, expect: int
) -> None:
    """Two resyncs of the operator with KEDA holding `expect` replicas: no API write of the
    operator's (from the audit log), and the replicas stay KEDA's."""
    writes = cluster.operator_writes(ns)
    resyncs(operator, 2)
    assert replicas(cluster, ns, name) == expect
    assert cluster.operator_writes(ns) == writes
    assert not operator_owns_replicas(cluster, ns, name)


def test_a_queued_request_scales_an_async_model_from_zero_and_back(
    cluster: Cluster,
    operator: OperatorProcess,
    keda: KedaProcess,
    queue: LocalRedis,
    namespace: str,
) -> None:
    prepare_namespace(cluster, namespace)
    cluster.create_secret(
        PASSWORD_SECRET["name"], namespace, {PASSWORD_SECRET["key"]: str(queue.password)}
    )
    assert cluster.apply(async_model("woken", queue), namespace).returncode == 0
    until_keda_ready(cluster, keda, namespace, "woken")
    # Nothing queued: KEDA scales it to zero.
    eventually(lambda: replicas(cluster, namespace, "woken") == 0, 120, what="KEDA at 0")
    until_reason(cluster, namespace, "woken", "ScaledToZero")

    prefix = gateway_prefix(cluster, namespace, "woken")
    asyncio.run(submit(queue, prefix))
    eventually(
        lambda: replicas(cluster, namespace, "woken") == 1,
        120,
        what="KEDA scaling the model to 1 on the queued request",
    )
    eventually(lambda: ready_replicas(cluster, namespace, "woken") == 1, 120, what="pod Ready")
    ready(cluster, namespace, "woken", timeout=120)
    assert condition(cluster, namespace, "woken")["reason"] != "ScaledToZero"
    idle_writes_nothing(cluster, operator, namespace, "woken", expect=1)

    assert drain(queue, prefix) == 1
    eventually(
        lambda: replicas(cluster, namespace, "woken") == 0,
        COOLDOWN_S + 120,
        what="KEDA back at 0 after the cooldown",
    )
    until_reason(cluster, namespace, "woken", "ScaledToZero")


def test_the_operator_does_not_fight_keda_at_zero(
    cluster: Cluster,
    operator: OperatorProcess,
    keda: KedaProcess,
    queue: LocalRedis,
    namespace: str,
) -> None:
    prepare_namespace(cluster, namespace)
    cluster.create_secret(
        PASSWORD_SECRET["name"], namespace, {PASSWORD_SECRET["key"]: str(queue.password)}
    )
    assert cluster.apply(async_model("idle", queue), namespace).returncode == 0
    until_keda_ready(cluster, keda, namespace, "idle")
    eventually(lambda: replicas(cluster, namespace, "idle") == 0, 120, what="KEDA at 0")
    until_reason(cluster, namespace, "idle", "ScaledToZero")
    idle_writes_nothing(cluster, operator, namespace, "idle", expect=0)


TARGET_INFLIGHT = 2  # the model's targetInflightRequests
HELD = 5  # requests held in flight: ceil(5 / 2) = 3 replicas, the model's maximum
LOAD_S = 600  # each held request is cut by the runtime after this long, whatever happens


def external_metric(cluster: Cluster, ns: str, hpa: dict[str, Any]) -> float | None:
    """The value KEDA's adapter serves, through the aggregation layer, for the HPA's one
    external metric (the request the HPA controller makes); None while there is none."""
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External", metric
    name = metric["external"]["metric"]["name"]
    labels = metric["external"]["metric"]["selector"]["matchLabels"]
    selector = urllib.parse.quote(",".join(f"{k}={v}" for k, v in labels.items()))
    raw = cluster.kubectl(
        "get",
        "--raw",
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{name}?labelSelector={selector}",
        check=False,
    )
    if raw.returncode != 0:
        return None
    items = yaml.safe_load(raw.stdout)["items"]
    return quantity(items[0]["value"]) if items else None


def quantity(q: str) -> float:
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


# Run alone, it carries the module's setup too (control plane, operator, KEDA and its
# adapter started), and the HPA controller acts on its 15 s sync period: more than the
# suite's 300 s on a loaded machine.
@pytest.mark.timeout(600)
def test_requests_in_flight_scale_a_model_past_one_replica_through_the_adapter(
    cluster: Cluster,
    operator: OperatorProcess,
    keda: KedaProcess,
    adapter: KedaAdapterProcess,
    prometheus: LocalPrometheus,
    namespace: str,
    tmp_path: Path,
) -> None:
    name = "busy"
    scaling = {
        "autoscaler": "keda",
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetInflightRequests": TARGET_INFLIGHT,
    }
    assert cluster.apply(model(name, scaling=scaling), namespace).returncode == 0
    until_keda_ready(cluster, keda, namespace, name)
    ready(cluster, namespace, name, timeout=120)
    so = cluster.get("scaledobject.keda.sh", name, "-n", namespace) or {}
    (query,) = [t["metadata"]["query"] for t in so["spec"]["triggers"] if t["name"] == "inflight"]
    hpa_name = eventually(
        lambda: (
            (so := cluster.get("scaledobject.keda.sh", name, "-n", namespace))
            and (so.get("status") or {}).get("hpaName")
        ),
        120,
        what="the HPA KEDA creates for the ScaledObject",
    )

    # The one pod, as a real runtime process of the Deployment the operator wrote, scraped
    # as the operator's PodMonitor says.
    deployment = cluster.get("deployment", name, "-n", namespace) or {}
    monitor = cluster.get("podmonitor", name, "-n", namespace)
    assert monitor is not None, "the operator renders a PodMonitor where its CRD is installed"
    found = cluster.get("pods", "-n", namespace, "-l", f"kubeonnx.io/inferencemodel={name}")
    (pod,) = (found or {})["items"]
    replica = start_replica(
        deployment,
        namespace,
        pod["metadata"]["name"],
        generate(tmp_path / "models", ["mlp"])["mlp"],
        tmp_path / "replica",
        read_timeout_s=LOAD_S,
    )
    try:
        wait_serving(
            f"{replica.http}/v2/health/ready",
            replica.proc,
            180,
            what="kubeonnx serve",
            logs=lambda: replica.log.read_text(errors="replace"),
            ok=lambda status: status == 200,
        )
        prometheus.scrape(pod_monitor_scrape_configs(monitor, [replica.pod]))
        hpa = cluster.get("hpa", hpa_name, "-n", namespace) or {}
        # Idle: the adapter serves KEDA's value of the query, 0; one replica.
        eventually(
            lambda: external_metric(cluster, namespace, hpa) == 0,
            120,
            what="the adapter serving the idle in-flight value",
        )
        assert replicas(cluster, namespace, name) == 1

        for _ in range(HELD):
            replica.hold(name)
        eventually(lambda: prometheus.value(query) == HELD, 120, what=f"{HELD} in flight: {query}")
        # What the HPA controller reads: the same value, from KEDA's operator over gRPC.
        eventually(
            lambda: external_metric(cluster, namespace, hpa) == HELD,
            120,
            what="the adapter serving the held requests",
        )

        # 5 in flight over a target of 2 per replica: ceil(5 / 2) = 3 (its maximum). Waited
        # for, not taken from the first scale-up: a sync that read the metric while the
        # runtime was still taking the holds (3 in flight: 2 replicas) is followed by one
        # that reads all 5.
        def scaled() -> dict[str, Any] | None:
            status = (cluster.get("hpa", hpa_name, "-n", namespace) or {}).get("status") or {}
            if status.get("desiredReplicas") == 3 and replicas(cluster, namespace, name) == 3:
                return status
            return None

        eventually(scaled, 240, what=f"the HPA scaling {name} to 3 replicas")
        eventually(lambda: ready_replicas(cluster, namespace, name) == 3, 120, what="3 Ready")
        ready(cluster, namespace, name, timeout=120)

        # The operator leaves the replicas to KEDA's HPA: it does not own them, and once
        # settled its resyncs write nothing.
        assert not operator_owns_replicas(cluster, namespace, name)

        def snapshot() -> Any:
            so = cluster.get("scaledobject.keda.sh", name, "-n", namespace) or {}
            return (replicas(cluster, namespace, name), so.get("spec"))

        assert_idle_resync(cluster, operator, namespace, snapshot)
        assert replicas(cluster, namespace, name) == 3
    finally:
        replica.stop()
        prometheus.scrape([])
