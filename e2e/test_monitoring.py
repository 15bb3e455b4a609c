"""Every PromQL expression of the dashboard and the alerts (examples/monitoring/) evaluated by
the real Prometheus (the pinned build) over real processes: `kubeonnx serve` replicas of a
model (an asynchronous gateway and a server, with quotas in a real Redis) scraped with the
labels a PodMonitor gives them, and `kubeonnx operator` against the test cluster, scraped as
its metrics Service would be. The traffic makes each expression's data exist (requests of
several codes, batches, quota decisions of two tenants and with Redis paused, asynchronous
requests done and one dead-lettered); each expression must then return data, except the
ones over kube-state-metrics, which this test bed does not run (said below). The alerts'
rules file is also checked and unit-tested by promtool (e2e/monitoring/alerts.test.yaml)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from e2e.cluster import free_port
from e2e.conftest import Cluster
from e2e.generate_models import generate
from e2e.operator_process import OperatorProcess
from e2e.prometheus import SCRAPE_INTERVAL, LocalPrometheus, Pod, pod_monitor_scrape_configs
from e2e.redis_server import LocalRedis
from e2e.render_dashboard import DPI, picture_size, render
from e2e.serving import wait_serving
from e2e.test_operator import model, ready

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "examples" / "monitoring"
DASHBOARD = MONITORING / "kubeonnx-dashboard.json"
RULES = MONITORING / "kubeonnx-alerts.yaml"
UNIT_TESTS = Path(__file__).resolve().parent / "monitoring" / "alerts.test.yaml"
KUBEONNX = str(Path(sys.executable).parent / "kubeonnx")

NAMESPACE, NAME, VERSION = "ml-team", "scorer", "2"  # as examples/canary.yaml numbers them
PREVIOUS = "1"  # a replica of the version before, as during a rollout
NEVER = "3"  # a version of the router's that no replica serves: a request pinned to it waits
KEYS = {"alpha": "alpha-key", "beta": "beta-key"}  # beta's limit is 0: always refused
# Metrics of programs this test bed does not run: their expressions can only come back empty.
NEEDS_KUBE_STATE_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_horizontalpodautoscaler_status_desired_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
}
# The dashboard's variables, as a user picking this model would set them.
VARIABLES = {
    "$namespace": NAMESPACE,
    "$model": NAME,
    "$version": VERSION,
    "$__rate_interval": "1m",
}
INFER = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
# An alert is `(signal) OP threshold`: the signal must have data, the whole must be valid.
ALERT = re.compile(r"^\((?P<signal>.*)\)\s*(?:>|<|==|>=|<=)\s*[0-9.e+-]+$", re.S)


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel's queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"])
        for p in dashboard["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def alerts() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def filled(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(kube_[a-z_]+|kubeonnx_[a-z_]+)\b", expr))


@dataclass
class Runtime:
    pod: Pod
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://{self.pod.addresses['http']}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_runtime(
    pod: str,
    role: str,
    model_path: Path,
    redis_url: str | None,
    quota: Path,
    work: Path,
    version: str = VERSION,
) -> Runtime:
    """A replica of the model; without `redis_url`, one that takes no asynchronous
    requests."""
    port, metrics_port = free_port(), free_port()
    work.mkdir(parents=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBEONNX_")},
        "KUBEONNX_ROLE": role,
        "KUBEONNX_MODEL_URI": f"file://{model_path}",
        "KUBEONNX_MODEL_NAME": NAME,
        "KUBEONNX_MODEL_VERSION": version,
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_PORT": str(port),
        "KUBEONNX_METRICS_PORT": str(metrics_port),  # as the operator renders it
        "KUBEONNX_CACHE_DIR": str(work / "cache"),
        "KUBEONNX_TERMINATION_LOG": str(work / "termination-log"),
        "KUBEONNX_DRAIN_SECONDS": "0",
        "KUBEONNX_MAX_BATCH_SIZE": "4",
        # One attempt, taken over after 1 s: the request a stand-in for a dead replica held
        # is dead-lettered as soon as this replica reclaims it.
        "KUBEONNX_ASYNC_MAX_ATTEMPTS": "1",
        "KUBEONNX_ASYNC_CLAIM_AFTER_S": "1",
        "KUBEONNX_QUOTA_CONFIG": str(quota),
    }
    if redis_url is not None:
        env["KUBEONNX_ASYNC_REDIS_URL"] = redis_url
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([KUBEONNX, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    runtime = Runtime(
        Pod(
            pod,
            "runtime",
            {"http": f"127.0.0.1:{port}", "metrics": f"127.0.0.1:{metrics_port}"},
        ),
        proc,
        log,
    )
    wait_serving(
        f"{runtime.http}/v2/health/ready",
        proc,
        180,
        what=f"kubeonnx serve ({role})",
        logs=lambda: log.read_text(errors="replace"),
        ok=lambda status: status == 200,
    )
    return runtime


def start_router(server: Runtime, previous: Runtime, work: Path) -> Runtime:
    """The model's router in front of both versions, as the operator runs it (its file names
    the model), with a third version that never answers: a request pinned to it is held,
    and after `max_hold_s` refused."""
    port, metrics_port = free_port(), free_port()
    work.mkdir(parents=True)
    config = work / "router.json"
    never = f"http://127.0.0.1:{free_port()}"
    config.write_text(
        json.dumps(
            {
                "model": NAME,
                "versions": [
                    {"name": VERSION, "url": server.http, "weight": 1},
                    {"name": PREVIOUS, "url": previous.http, "weight": 1},
                    {"name": NEVER, "url": never, "weight": 0},
                ],
                "max_hold_s": 2,
            }
        )
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBEONNX_")},
        "KUBEONNX_ROLE": "router",
        "KUBEONNX_ROUTER_CONFIG": str(config),
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_PORT": str(port),
        "KUBEONNX_METRICS_PORT": str(metrics_port),
        "KUBEONNX_TERMINATION_LOG": str(work / "termination-log"),
    }
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([KUBEONNX, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    addresses = {"http": f"127.0.0.1:{port}", "metrics": f"127.0.0.1:{metrics_port}"}
    router = Runtime(Pod(f"{NAME}-router-6d9c8b7f5-0", "runtime", addresses), proc, log)
    wait_serving(
        f"{router.http}/v2/health/ready",
        proc,
        180,
        what="kubeonnx serve (router)",
        logs=lambda: log.read_text(errors="replace"),
        ok=lambda status: status == 200,
    )
    return router


def wait_for(check: Any, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:g}s: {what}")


@dataclass
class Bed:
    prometheus: LocalPrometheus
    runtimes: list[Runtime]
    operator_pod: str
    started: float  # when Prometheus started (seconds since the epoch)


@pytest.fixture(scope="module")
def bed(
    cluster: Cluster,
    operator: OperatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Bed]:
    work = tmp_path_factory.mktemp("monitoring")
    mlp = generate(work / "models", ["mlp"])["mlp"]
    redis = LocalRedis().start()
    quota = work / "quota.json"
    quota.write_text(
        json.dumps(
            {
                "policy": "tiers",
                "namespace": NAMESPACE,
                "tenants": [
                    {
                        "name": "alpha",
                        "keySha256": [hashlib.sha256(b"alpha-key").hexdigest()],
                        "limits": [{"unit": "requests", "limit": 100000, "window": "1m"}],
                    },
                    {
                        "name": "beta",
                        "keySha256": [hashlib.sha256(b"beta-key").hexdigest()],
                        "limits": [{"unit": "requests", "limit": 0, "window": "1m"}],
                    },
                ],
                "failureMode": "Closed",
                "decisionBudgetMs": 200,
                "redis": {"url": redis.url},
            }
        )
    )
    prometheus = LocalPrometheus().start()
    started = time.time()
    runtimes: list[Runtime] = []
    try:
        # A gateway takes an asynchronous request; a stand-in for a replica that then died
        # claims it (and never acknowledges it)...
        gateway = start_runtime(
            f"{NAME}-gateway-6f7d8c9b5-0", "gateway", mlp, redis.url, quota, work / "gateway"
        )
        runtimes.append(gateway)
        headers = {"X-Api-Key": KEYS["alpha"]}
        answer = httpx.post(
            f"{gateway.http}/v2/models/{NAME}/async-infer", json=INFER, headers=headers, timeout=30
        )
        assert answer.status_code == 202, answer.text
        client = redis.client()
        claimed = client.xreadgroup("kubeonnx", "gone", {f"kubeonnx:{{{NAME}}}:requests": ">"}, 1)
        assert claimed and claimed[0][1], claimed
        # ...and the server, started after, takes it over and dead-letters it.
        server = start_runtime(
            f"{NAME}-7c9f6d5b8-0", "server", mlp, redis.url, quota, work / "server"
        )
        runtimes.append(server)
        previous = start_runtime(
            f"{NAME}-{PREVIOUS}-5c8d7b6f4-0",
            "server",
            mlp,
            None,
            quota,
            work / "previous",
            version=PREVIOUS,
        )
        runtimes.append(previous)
        router = start_router(server, previous, work / "router")
        runtimes.append(router)
        monitor = {
            "metadata": {"namespace": NAMESPACE, "name": NAME},
            "spec": {"podMetricsEndpoints": [{"port": "metrics"}]},
        }
        # The router's own PodMonitor (NAME-router), as the operator renders it.
        router_monitor = {
            "metadata": {"namespace": NAMESPACE, "name": f"{NAME}-router"},
            "spec": {"podMetricsEndpoints": [{"port": "metrics"}]},
        }
        operator_pod = "kubeonnx-operator-5b6c7d8f9-0"
        prometheus.scrape(
            [
                *pod_monitor_scrape_configs(monitor, [r.pod for r in runtimes if r != router]),
                *pod_monitor_scrape_configs(router_monitor, [router.pod]),
                {
                    # The operator's metrics Service, scraped with honorLabels: its
                    # kubeonnx_operator_model_ready keeps the model's namespace.
                    "job_name": "kubeonnx-operator",
                    "scrape_interval": SCRAPE_INTERVAL,
                    "scrape_timeout": SCRAPE_INTERVAL,
                    "honor_labels": True,
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{operator.health_port}"],
                            "labels": {
                                "namespace": "kubeonnx-system",
                                "pod": operator_pod,
                                "container": "operator",
                                "endpoint": "metrics",
                            },
                        }
                    ],
                },
            ]
        )
        # A model for the operator to reconcile (and report Ready).
        ns = f"mon-{os.getpid()}"
        cluster.kubectl("create", "namespace", ns, check=False)
        assert cluster.apply(model("watched"), ns).returncode == 0
        ready(cluster, ns, "watched", timeout=120)
        traffic(server, previous, redis, router)
        yield Bed(prometheus, runtimes, operator_pod, started)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    finally:
        for r in runtimes:
            r.stop()
        prometheus.stop()
        redis.kill()


def traffic(server: Runtime, previous: Runtime, redis: LocalRedis, router: Runtime) -> None:
    """Requests of each kind the dashboard shows, sent twice: a series starts at its first
    sample, and rate() needs a second. Both versions answer; only the new one takes
    asynchronous requests. The router holds a request pinned to the version no replica
    serves, and refuses it after its `max_hold_s`."""
    alpha, beta = ({"X-Api-Key": KEYS[t]} for t in ("alpha", "beta"))
    infers = [f"{r.http}/v2/models/{NAME}/infer" for r in (server, previous)]
    with httpx.Client(timeout=30) as http:
        for _ in range(2):
            held = http.post(
                f"{router.http}/v2/models/{NAME}/versions/{NEVER}/infer", json=INFER, headers=alpha
            )
            assert held.status_code == 503, held.text
            assert "(max_hold_s)" in held.json()["error"]
            for infer in infers:
                for _ in range(5):
                    assert http.post(infer, json=INFER, headers=alpha).status_code == 200
                assert http.post(infer, json={"inputs": []}, headers=alpha).status_code == 400
                assert http.post(infer, json=INFER, headers=beta).status_code == 429
            answer = http.post(
                f"{server.http}/v2/models/{NAME}/async-infer", json=INFER, headers=alpha
            )
            assert answer.status_code == 202, answer.text
            time.sleep(3)  # scraped in between
        # Quota decisions without Redis: failureMode Closed answers 503.
        redis.pause()
        try:
            for _ in range(2):
                for infer in infers:
                    assert http.post(infer, json=INFER, headers=alpha).status_code == 503
                time.sleep(3)
        finally:
            redis.resume()


def test_promtool_checks_the_rules_file_and_its_unit_tests_pass(bed: Bed) -> None:
    promtool = str(bed.prometheus.bin / "promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", UNIT_TESTS.name],
        cwd=UNIT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Each alert is tested, firing and not firing.
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    checks = [c for t in cases for c in t.get("alert_rule_test", [])]
    for name in alerts():
        outcomes = {bool(c["exp_alerts"]) for c in checks if c["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: firing and not firing are not both tested"


def test_every_dashboard_expression_returns_data(bed: Bed) -> None:
    empty: dict[str, str] = {}
    for title, expr in dashboard_targets():
        query = filled(expr)
        needs = metric_names(query) & NEEDS_KUBE_STATE_METRICS
        if needs:
            # Valid PromQL (a refusal raises), and nothing without kube-state-metrics.
            assert bed.prometheus.query(query) == [], (title, query)
            continue
        try:
            wait_for(lambda q=query: bed.prometheus.query(q), f"{title}: {query}")  # type: ignore[misc]
        except AssertionError:
            empty[title] = query
    assert not empty, f"expressions without data: {empty}"


def test_the_dashboards_variables_list_this_model(bed: Bed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((?P<match>.+), (?P<label>\w+)\)", var["query"]["query"])
        assert m, var["query"]
        answer = httpx.get(
            f"{bed.prometheus.url}/api/v1/label/{m['label']}/values",
            params={"match[]": filled(m["match"])},
            timeout=30,
        ).json()
        assert answer["status"] == "success", answer
        found[var["name"]] = answer["data"]
    assert found == {"namespace": [NAMESPACE], "model": [NAME], "version": [PREVIOUS, VERSION]}


def test_every_alert_expression_is_valid_and_its_signal_has_data(bed: Bed) -> None:
    for name, expr in alerts().items():
        m = ALERT.match(expr.strip())
        assert m, f"{name}: not `(signal) OP threshold`: {expr}"
        bed.prometheus.query(expr)  # accepted (a refusal raises)
        wait_for(
            lambda s=m["signal"]: bed.prometheus.query(s),  # type: ignore[misc]
            f"{name}'s signal: {m['signal']}",
        )


def test_the_dead_letter_alert_fires_on_the_real_dead_letter(bed: Bed) -> None:
    """The request the stand-in replica abandoned was dead-lettered: the alert's expression
    (threshold included) holds for the model, labelled as its runbook says."""
    result = wait_for(
        lambda: bed.prometheus.query(alerts()["KubeonnxAsyncDeadLetters"]), "dead letters"
    )
    assert [(r["metric"]["namespace"], r["metric"]["model"]) for r in result] == [(NAMESPACE, NAME)]
    assert float(result[0]["value"][1]) == 1


def test_the_quota_redis_alert_sees_the_decisions_made_without_redis(bed: Bed) -> None:
    result = wait_for(
        lambda: bed.prometheus.query(alerts()["KubeonnxQuotaRedisUnreachable"]),
        "quota decisions without Redis",
    )
    assert {(r["metric"]["namespace"], r["metric"]["model"]) for r in result} == {(NAMESPACE, NAME)}


def test_the_ready_model_is_not_alerted_and_its_gauge_is_the_leaders(bed: Bed) -> None:
    ready_series = wait_for(
        lambda: bed.prometheus.query(
            'kubeonnx_operator_model_ready{model="watched"} and on (pod) '
            "(kubeonnx_operator_leader == 1)"
        ),
        "the watched model's gauge on the leader",
    )
    assert [(s["metric"]["reason"], s["value"][1]) for s in ready_series] == [("Ready", "1")]
    assert ready_series[0]["metric"]["pod"] == bed.operator_pod
    assert ready_series[0]["metric"]["namespace"].startswith("mon-")  # the model's
    not_ready = bed.prometheus.query(alerts()["KubeonnxModelNotReady"])
    assert not [s for s in not_ready if s["metric"]["model"] == "watched"]


def test_the_dashboard_picture_draws_every_panel_the_traffic_gave_data(
    bed: Bed, tmp_path: Path
) -> None:
    """e2e/render_dashboard.py evaluates every panel's targets as range queries over the
    traffic (both versions: `$version` as the dashboard's "All") and draws them: each panel
    has series, of both versions where it counts requests, except the kube-state-metrics
    series this test bed does not have. KUBEONNX_DASHBOARD_PNG keeps the picture (that is how
    docs/dashboard.png was made)."""
    out = Path(os.environ.get("KUBEONNX_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    variables = {"namespace": NAMESPACE, "model": NAME, "version": ".*"}
    # Every expression has data at the end of the range (as the test above waits for).
    for _title, expr in dashboard_targets():
        if not metric_names(expr) & NEEDS_KUBE_STATE_METRICS:
            wait_for(lambda e=expr: bed.prometheus.query(filled(e)), expr)
    panels = render(bed.prometheus.url, variables, bed.started, time.time(), out)
    drawn = [p for p in panels if p.kind != "row"]
    assert [p.title for p in drawn] == list(dict.fromkeys(t for t, _ in dashboard_targets()))
    for panel in drawn:
        assert not panel.errors, panel.errors
        points = [v for s in panel.series for v in s.values]
        assert points, f"{panel.title}: no data in {panel.queries}"
    requests = next(p for p in drawn if p.title == "Requests/s by code")
    labels = {s.label for s in requests.series}
    assert {"v1 200", "v2 200", "v1 400", "v2 429", "v2 503"} <= labels, labels
    assert any(s.label == "alpha admitted" for p in drawn for s in p.series)
    assert any(s.label == "beta refused" for p in drawn for s in p.series)
    # A PNG of the dashboard's grid: 24 columns, as tall as its lowest panel goes.
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (width, height) == tuple(round(inches * DPI) for inches in picture_size(panels))
