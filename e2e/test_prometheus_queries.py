"""Every PromQL query the operator writes, evaluated by the real Prometheus (the pinned build)
over real `kubeonnx serve` processes under real traffic, scraped with the labels the
operator's PodMonitor gives its pods. The queries, the PodMonitor and the runtime's
environment (model name, ports) are taken from what the operator renders for the examples,
not copied here. Needs no control plane."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render.model import CONTAINER

from e2e.cluster import free_port
from e2e.generate_models import generate
from e2e.prometheus import LocalPrometheus, Pod, PromQLError, pod_monitor_scrape_configs
from e2e.serving import wait_serving

ROOT = Path(__file__).resolve().parent.parent
KUBEONNX = str(Path(sys.executable).parent / "kubeonnx")
# The runtime's environment as rendered, less what reaches outside this test bed (the model
# store, the queue, quotas); the model itself is a generated one, served under the
# example's name.
OUTSIDE = ("KUBEONNX_S3_", "AWS_", "KUBEONNX_ASYNC_", "KUBEONNX_QUOTA", "KUBEONNX_LEDGER")
# Metrics of programs this test bed does not run: a query on them can only come back empty.
NOT_IN_TEST_BED = {
    "nginx_ingress_controller_requests": "ingress-nginx's controller (the Ingress's request "
    "count), which this test bed does not run",
}
OTHER_NAMESPACE = "elsewhere"  # a model of the same name there must never be counted


def rendered_examples() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs = [(str(path), d) for d in yaml.safe_load_all(path.read_text()) if d]
        children, problems = render_documents(docs, OperatorConfig(), pod_monitor=True)
        assert not problems, problems
        if any(c["kind"] == "ScaledObject" for c in children):
            out[path.name] = children
    return out


EXAMPLES = rendered_examples()


def prometheus_triggers(children: list[dict[str, Any]]) -> dict[str, str]:
    """Each prometheus trigger's name and query, over the ScaledObjects rendered."""
    return {
        t["name"]: t["metadata"]["query"]
        for c in children
        if c["kind"] == "ScaledObject"
        for t in c["spec"]["triggers"]
        if t["type"] == "prometheus"
    }


def one(children: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The model's own object of `kind` (not the async gateway's)."""
    (found,) = [
        c for c in children if c["kind"] == kind and not c["metadata"]["name"].endswith("-gateway")
    ]
    return found


@dataclass
class Replica:
    pod: Pod
    proc: subprocess.Popen[bytes]
    log: Path
    held: list[socket.socket] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://{self.pod.addresses['http']}"

    def hold(self, model: str) -> None:
        """An inference request that stays in flight: its head and part of its body are
        sent, the rest never (the runtime counts it from its head on)."""
        host, port = self.pod.addresses["http"].split(":")
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"inputs": ['
        )
        self.held.append(s)

    def release(self) -> None:
        for s in self.held:
            s.close()
        self.held.clear()

    def stop(self) -> None:
        self.release()
        self.proc.kill()
        self.proc.wait()


def start_replica(
    deployment: dict[str, Any],
    namespace: str,
    pod_name: str,
    model: Path,
    work: Path,
    read_timeout_s: float = 600,
) -> Replica:
    """Run the rendered runtime container as a local process: its environment as written
    (ports become free loopback ports, named as the container names them), the model a
    generated one. A held request is cut after `read_timeout_s`: longer than any wait of
    the test that holds it."""
    container = next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER
    )
    local = {str(p["containerPort"]): str(free_port()) for p in container["ports"]}
    env = {
        e["name"]: (
            local.get(e["value"], e["value"]) if e["name"].endswith("_PORT") else e["value"]
        )
        for e in container["env"]
        if "value" in e and not e["name"].startswith(OUTSIDE)
    }
    work.mkdir(parents=True)
    env |= {
        "KUBEONNX_MODEL_URI": f"file://{model}",
        "KUBEONNX_DEVICE": "cpu",
        "KUBEONNX_CACHE_DIR": str(work / "cache"),
        "KUBEONNX_TERMINATION_LOG": str(work / "termination-log"),
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_DRAIN_SECONDS": "0",
        "KUBEONNX_READ_TIMEOUT_S": f"{read_timeout_s:g}",
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith("KUBEONNX_")}
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [KUBEONNX, "serve"], env={**base, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    addresses = {
        p["name"]: f"127.0.0.1:{local[str(p['containerPort'])]}" for p in container["ports"]
    }
    return Replica(Pod(pod_name, CONTAINER, addresses), proc, log)


@dataclass
class Fleet:
    """One example model's replicas (and one of the same name in another namespace), all
    scraped by one Prometheus as the model's PodMonitor says."""

    example: str
    name: str
    namespace: str
    replicas: list[Replica]
    other: Replica
    prometheus: LocalPrometheus
    triggers: dict[str, str]

    def wait(self, expr: str, want: Callable[[float | None], bool], what: str) -> float | None:
        """Evaluate `expr` until `want` holds of its value (generous bound: a loaded machine)."""
        deadline = time.monotonic() + 90
        value = None
        while time.monotonic() < deadline:
            value = self.prometheus.value(expr)
            if want(value):
                return value
            time.sleep(0.25)
        raise AssertionError(f"{what}: {expr} is {value}")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def prometheus() -> Iterator[LocalPrometheus]:
    server = LocalPrometheus().start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def fleet(
    request: pytest.FixtureRequest,
    prometheus: LocalPrometheus,
    generated: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    children = EXAMPLES[request.param]
    deployment, monitor = one(children, "Deployment"), one(children, "PodMonitor")
    name, namespace = deployment["metadata"]["name"], deployment["metadata"]["namespace"]
    work = tmp_path_factory.mktemp(name)
    replicas = [
        start_replica(
            deployment, namespace, f"{name}-7c9f6d5b8-{i}", generated["mlp"], work / str(i)
        )
        for i in range(2)
    ]
    other = start_replica(
        deployment, OTHER_NAMESPACE, f"{name}-5d8b7c6f9-0", generated["mlp"], work / "other"
    )
    everyone = [*replicas, other]
    try:
        for r in everyone:
            wait_serving(
                f"{r.http}/v2/health/ready",
                r.proc,
                180,
                what="kubeonnx serve",
                logs=lambda r=r: r.log.read_text(errors="replace"),  # type: ignore[misc]
                ok=lambda status: status == 200,
            )
        elsewhere = {**monitor, "metadata": {**monitor["metadata"], "namespace": OTHER_NAMESPACE}}
        prometheus.scrape(
            pod_monitor_scrape_configs(monitor, [r.pod for r in replicas])
            + pod_monitor_scrape_configs(elsewhere, [other.pod])
        )
        yield Fleet(
            request.param,
            name,
            namespace,
            replicas,
            other,
            prometheus,
            prometheus_triggers(children),
        )
    finally:
        for r in everyone:
            r.stop()


def in_flight(fleet: Fleet, replica: Replica) -> str:
    return f'sum(kubeonnx_inflight_requests{{pod="{replica.pod.name}"}})'


def test_promtool_accepts_the_generated_configuration(fleet: Fleet) -> None:
    checked = fleet.prometheus.check_config()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr
    # And promtool is a real judge: a broken configuration fails it.
    config = yaml.safe_load(fleet.prometheus.config_file.read_text())
    broken = fleet.prometheus.dir / "broken.yml"
    config["scrape_configs"][0]["scrape_timeout"] = "1m"  # longer than the interval
    broken.write_text(yaml.safe_dump(config))
    refused = subprocess.run(
        [str(fleet.prometheus.bin / "promtool"), "check", "config", str(broken)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "scrape timeout" in refused.stdout + refused.stderr


def test_the_inflight_trigger_counts_the_requests_held_on_the_models_replicas(
    fleet: Fleet,
) -> None:
    """KEDA's in-flight query, as the operator renders it for the example: the requests in
    flight on the model's replicas, summed; none of another namespace's model of the same
    name; zero (not nothing) once they are answered."""
    query = fleet.triggers["inflight"]
    held = {0: 2, 1: 1}
    for i, n in held.items():
        for _ in range(n):
            fleet.replicas[i].hold(fleet.name)
    fleet.other.hold(fleet.name)
    try:
        # Each replica's gauge has been scraped with the requests held...
        for i, n in held.items():
            fleet.wait(in_flight(fleet, fleet.replicas[i]), lambda v, n=n: v == n, "held")  # type: ignore[misc]
        fleet.wait(in_flight(fleet, fleet.other), lambda v: v == 1, "held elsewhere")
        # ...so the operator's query sees them all, and only them.
        result = fleet.prometheus.query(query)
        assert len(result) == 1, result
        assert float(result[0]["value"][1]) == sum(held.values()), (query, result)
    finally:
        for r in [*fleet.replicas, fleet.other]:
            r.release()
    for r in fleet.replicas:
        fleet.wait(in_flight(fleet, r), lambda v: v == 0, "released")
    assert fleet.prometheus.value(query) == 0


def test_the_runtime_metrics_carry_the_pod_monitors_labels_under_traffic(fleet: Fleet) -> None:
    """Request rate, status codes and latency of the model, selected as the operator's query
    selects it (namespace and model), after a little real traffic: what the rollout analysis
    and the dashboards will read."""
    sel = f'namespace="{fleet.namespace}",model="{fleet.name}"'
    request = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    answered = f'sum(kubeonnx_requests_total{{{sel},code="200"}})'
    before = fleet.prometheus.value(answered) or 0
    with httpx.Client(timeout=30) as http:

        def infer(n: int) -> None:
            for i in range(n):
                replica = fleet.replicas[i % 2]
                answer = http.post(f"{replica.http}/v2/models/{fleet.name}/infer", json=request)
                assert answer.status_code == 200, answer.text

        # A status code's series starts at its first request, and rate() cannot count the
        # jump from nothing to its first value: first let each pod's series exist...
        infer(2)
        fleet.wait(answered, lambda v: v == before + 2, "first answers")
        # ...then the traffic whose rate is measured.
        infer(10)
    fleet.wait(answered, lambda v: v == before + 12, "answered requests")
    rate = fleet.wait(
        f'sum(rate(kubeonnx_requests_total{{{sel},code="200"}}[1m]))',
        lambda v: v is not None and v > 0,
        "rate",
    )
    assert rate is not None and rate > 0
    p95 = fleet.prometheus.value(
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(kubeonnx_request_duration_seconds_bucket{{{sel}}}[1m])))"
    )
    # Observations in the window (the held requests of the test before included): a number.
    assert p95 is not None and p95 > 0 and not math.isnan(p95)
    # Per pod, as the PodMonitor labels them; the other namespace's model apart.
    pods = {
        s["metric"]["pod"]
        for s in fleet.prometheus.query(f'kubeonnx_requests_total{{{sel},code="200"}}')
    }
    assert pods == {r.pod.name for r in fleet.replicas}


def metric_names(query: str) -> set[str]:
    return set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{", query))


@pytest.mark.parametrize(
    "fleet",
    [
        e
        for e, children in sorted(EXAMPLES.items())
        if set(prometheus_triggers(children)) - {"inflight"}
    ],
    indirect=True,
)
def test_every_other_query_of_the_example_is_valid_promql_and_says_what_it_needs(
    fleet: Fleet,
) -> None:
    """The demand query (spec.scaling.demand, ${namespace} and ${name} filled) and any other
    trigger: Prometheus accepts it; over metrics the test bed has, it returns data; over a
    program's the test bed does not run, it can only come back empty (said here why)."""
    others = {name: q for name, q in fleet.triggers.items() if name != "inflight"}
    assert others
    scraped = {
        s["metric"]["__name__"] for s in fleet.prometheus.query('count by (__name__) ({job=~".+"})')
    }
    for name, query in others.items():
        try:
            result = fleet.prometheus.query(query)
        except PromQLError as exc:
            raise AssertionError(f"trigger {name} of {fleet.example} is refused: {exc}") from None
        needed = metric_names(query)
        missing = needed - scraped
        unknown = missing - NOT_IN_TEST_BED.keys()
        assert not unknown, f"{name}: {unknown} are neither the runtime's nor known elsewhere"
        if missing:
            # e.g. the gpu-keda example's demand query reads ingress-nginx's request count:
            # its series exist only where that controller runs and is scraped.
            assert result == [], (name, result, [NOT_IN_TEST_BED[m] for m in missing])
        else:
            assert result, f"trigger {name} of {fleet.example} returns nothing: {query}"


def test_local_prometheus_does_not_take_another_server_for_its_own() -> None:
    squatter = LocalPrometheus().start()
    ours = LocalPrometheus()
    ours.port = squatter.port  # taken before ours could bind it
    try:
        ours.start()
        assert ours.port != squatter.port
        flags = httpx.get(f"{ours.url}/api/v1/status/flags", timeout=10).json()["data"]
        assert flags["storage.tsdb.path"] == str(ours.data)
    finally:
        ours.stop()
        squatter.stop()
    assert not ours.dir.exists() and ours.proc is not None and ours.proc.poll() is not None
