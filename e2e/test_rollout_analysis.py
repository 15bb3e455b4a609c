"""A progressive rollout (kubeonnx_operator.rollout) judged by the real Prometheus (the pinned
build) over real `kubeonnx serve` processes: a stable version and candidate versions of one
model, run with the environment the operator renders for an example and scraped with its
PodMonitor's labels. The test sends each version its share of the traffic as the router
would at the rollout's weight, and drives `advance` with an injected clock: one call per
analysis window of real traffic, so no test waits real minutes. Needs no control plane."""

from __future__ import annotations

import asyncio
import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from kubeonnx_operator.analysis import Analysis, Thresholds, analyser
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render.model import CONTAINER
from kubeonnx_operator.rollout import RolloutDecision, RolloutSpec, Step, advance
from prometheus_client.parser import text_string_to_metric_families

from e2e.generate_models import generate
from e2e.prometheus import LocalPrometheus, pod_monitor_scrape_configs
from e2e.serving import wait_serving
from e2e.test_prometheus_queries import Replica, one, start_replica

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "runtime" / "model_hooks"
EXAMPLE = ROOT / "examples" / "cpu-hpa.yaml"
STABLE, HEALTHY, FAULTY, IDLE, SLOW = "1", "2", "3", "4", "5"
FAIL_EVERY = 4  # the faulty candidate answers a 500 to one request in 4
SLOW_RUN_S = 0.5  # each of the slow candidate's model runs takes this long
# A short window (Prometheus scrapes every second here); the rollout's clock is injected.
WINDOW = timedelta(seconds=8)
REQUEST = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}


def thresholds(**kw: Any) -> Thresholds:
    # The latency ratio is generous: every version here runs the same small model on a loaded
    # machine, where one slow request moves a p95 of a few milliseconds a lot.
    return replace(Thresholds(WINDOW, 20, Decimal("0.05"), Decimal("20"), 2), **kw)


@dataclass
class Bed:
    prometheus: LocalPrometheus
    namespace: str
    model: str
    versions: dict[str, Replica]
    http: httpx.Client

    def served(self, version: str) -> float:
        """Requests the version's process has counted (its own /metrics, not Prometheus)."""
        text = self.http.get(f"http://{self.versions[version].pod.addresses['metrics']}/metrics")
        return sum(
            s.value
            for f in text_string_to_metric_families(text.text)
            if f.name == "kubeonnx_requests"
            for s in f.samples
            if s.name == "kubeonnx_requests_total"
        )

    def scraped(self, version: str) -> None:
        """Wait until Prometheus holds what the version's process counted."""
        want = self.served(version)
        sel = f'namespace="{self.namespace}",model="{self.model}",version="{version}"'
        deadline = time.monotonic() + 60
        got = None
        while time.monotonic() < deadline:
            got = self.prometheus.value(f"sum(kubeonnx_requests_total{{{sel}}})")
            if got == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"version {version}: Prometheus has {got}, the process {want}")

    def traffic(self, candidate: str, weight: int, seconds: float, bad_every: int = 0) -> None:
        """Requests for `seconds`, split as the router splits them at `weight` (smooth:
        exactly weight in 100 to the candidate); every `bad_every`-th candidate request is
        malformed (a 400: the client's fault, not the version's)."""
        sent = to_candidate = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sent += 1
            version = STABLE
            if to_candidate * 100 < sent * weight:
                to_candidate += 1
                version = candidate
            body = REQUEST
            if version == candidate and bad_every and to_candidate % bad_every == 0:
                body = {"inputs": []}
            url = f"{self.versions[version].http}/v2/models/{self.model}/infer"
            answer = self.http.post(url, json=body)
            assert answer.status_code in (200, 400, 500), answer.text
        for version in {STABLE, candidate}:
            self.scraped(version)


def example() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [(str(EXAMPLE), d) for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    children, problems = render_documents(docs, OperatorConfig(), pod_monitor=True)
    assert not problems, problems
    return one(children, "Deployment"), one(children, "PodMonitor")


def version_of(deployment: dict[str, Any], version: str, extra: dict[str, str]) -> dict[str, Any]:
    """The rendered Deployment as the version's would be: its version, the generated model
    (so not the example's digest), and `extra` environment."""
    out = copy.deepcopy(deployment)
    (container,) = [
        c for c in out["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER
    ]
    env = [e for e in container["env"] if e["name"] != "KUBEONNX_MODEL_SHA256"]
    env += [{"name": "KUBEONNX_MODEL_VERSION", "value": version}]
    env += [{"name": k, "value": v} for k, v in extra.items()]
    container["env"] = env
    return out


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    deployment, monitor = example()
    name, namespace = deployment["metadata"]["name"], deployment["metadata"]["namespace"]
    work = tmp_path_factory.mktemp("rollout")
    model = generate(work / "models", ["mlp"])["mlp"]
    hooks = work / "hooks"
    hooks.mkdir()
    hooked = {
        "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
        "TEST_HOOK_DIR": str(hooks),
        "KUBEONNX_MAX_BATCH_SIZE": "1",  # one request, one run: the failures are exact
    }
    extras = {
        STABLE: {},
        HEALTHY: {},
        FAULTY: {**hooked, "TEST_HOOK_FAIL_EVERY": str(FAIL_EVERY)},
        IDLE: {},
        SLOW: {**hooked, "TEST_HOOK_RUN_SECONDS": str(SLOW_RUN_S)},
    }
    versions = {
        v: start_replica(
            version_of(deployment, v, extra), namespace, f"{name}-v{v}-0", model, work / f"v{v}"
        )
        for v, extra in extras.items()
    }
    prometheus = LocalPrometheus().start()
    try:
        for r in versions.values():
            wait_serving(
                f"{r.http}/v2/health/ready",
                r.proc,
                180,
                what="kubeonnx serve",
                logs=lambda r=r: r.log.read_text(errors="replace"),  # type: ignore[misc]
                ok=lambda status: status == 200,
            )
        prometheus.scrape(pod_monitor_scrape_configs(monitor, [r.pod for r in versions.values()]))
        with httpx.Client(timeout=30) as http:
            yield Bed(prometheus, namespace, name, versions, http)
    finally:
        for r in versions.values():
            r.stop()
        prometheus.stop()


class Driver:
    """The reconciler's part: status.rollout kept between calls (and only that), the clock
    moved one analysis window per call, the analyses counted."""

    def __init__(self, bed: Bed, spec: RolloutSpec, candidate: str) -> None:
        self.bed, self.spec, self.candidate = bed, spec, candidate
        self.status: dict[str, Any] | None = None
        self.now = datetime.now(UTC)
        self.analyses: list[Analysis] = []
        self.events: list[tuple[str, str, str]] = []

    async def advance(self, delta: timedelta, spec_hash: str = "h1") -> RolloutDecision:
        self.now += delta
        async with httpx2.AsyncClient() as client:
            measure = analyser(
                self.bed.prometheus.url,
                client,
                self.bed.namespace,
                self.bed.model,
                STABLE,
                self.candidate,
                self.spec.analysis,
            )

            async def counted() -> Analysis:
                self.analyses.append(await measure())
                return self.analyses[-1]

            d = await advance(
                self.spec,
                self.status,
                candidate=self.candidate,
                candidate_ready=True,
                candidate_spec_hash=spec_hash,
                now=self.now,
                analyse=counted,
            )
        self.status = d.status
        self.events += [(e.type, e.reason, e.message) for e in d.events]
        return d

    async def window(self, weight: int, bad_every: int = 0) -> RolloutDecision:
        """One analysis window of traffic at `weight` (in a thread: the event loop is the
        driver's), then the call that analyses it."""
        await asyncio.to_thread(
            self.bed.traffic, self.candidate, weight, WINDOW.total_seconds(), bad_every
        )
        return await self.advance(WINDOW)


async def test_a_healthy_candidate_goes_through_every_step(bed: Bed) -> None:
    spec = RolloutSpec(
        (Step(weight=30), Step(pause=True, duration=WINDOW), Step(weight=60)),
        thresholds(),
        auto_promote=True,
    )
    r = Driver(bed, spec, HEALTHY)
    d = await r.advance(timedelta(0))
    assert (d.status["phase"], d.weight) == ("Progressing", 30)
    steps: list[tuple[int, int, str]] = []
    while d.status["phase"] not in ("Promoted", "RolledBack") and len(steps) < 8:
        # Malformed requests (400) among the candidate's: not failures.
        d = await r.window(d.weight, bad_every=5)
        steps.append((d.status["step"], d.weight, d.status["lastAnalysis"]["result"]))
    assert d.status["phase"] == "Promoted", (steps, d.status)
    assert d.weight == 100 and "move it into spec.model" in d.status["message"]
    assert [s[:2] for s in steps] == [(1, 30), (2, 60), (3, 100)], steps
    assert all(a.result == "Passed" for a in r.analyses), [a.message for a in r.analyses]
    # The numbers are Prometheus's over real traffic: the candidate's 400s counted as
    # requests and not as errors, the stable compared with.
    last = d.status["lastAnalysis"]
    assert last["candidate"]["requests"] >= 20 and last["candidate"]["errorRate"] == "0.0000"
    assert last["stable"]["requests"] >= 1 and float(last["stable"]["p95"]) > 0
    assert [e[1] for e in r.events] == ["RolloutProgressing", "RolloutPromoted"]


async def test_a_candidate_answering_5xx_is_rolled_back_after_failure_limit_analyses(
    bed: Bed,
) -> None:
    spec = RolloutSpec((Step(weight=50), Step(weight=100)), thresholds(failure_limit=2))
    r = Driver(bed, spec, FAULTY)
    d = await r.advance(timedelta(0))
    d = await r.window(d.weight)
    assert (d.status["phase"], d.weight, d.status["consecutiveFailures"]) == (
        "Progressing",
        50,
        1,
    ), d.status
    d = await r.window(d.weight)
    assert (d.status["phase"], d.weight, d.status["step"]) == ("RolledBack", 0, 0), d.status
    last = d.status["lastAnalysis"]
    assert last["result"] == "Failed"
    rate = float(last["candidate"]["errorRate"])
    assert math.isclose(rate, 1 / FAIL_EVERY, abs_tol=0.1), last  # measured, not assumed
    assert last["stable"]["errorRate"] == "0.0000"
    assert "5xx error rate" in d.status["message"] and "maxErrorRate 0.05" in d.status["message"]
    assert r.events[-1][:2] == ("Warning", "RolloutRolledBack")
    assert len(r.analyses) == 2
    # No retry while its spec is the same: no analysis, no traffic, no Event.
    d = await r.advance(WINDOW * 10)
    assert (d.status["phase"], d.weight, len(r.analyses)) == ("RolledBack", 0, 2)
    assert [e[1] for e in r.events] == ["RolloutProgressing", "RolloutRolledBack"]
    # A changed candidate spec starts over.
    d = await r.advance(timedelta(0), spec_hash="h2")
    assert (d.status["phase"], d.weight, d.status["step"]) == ("Progressing", 50, 0)


async def test_a_slower_candidate_is_rolled_back_on_its_p95_against_the_stables(
    bed: Bed,
) -> None:
    spec = RolloutSpec(
        (Step(weight=50),),
        thresholds(min_requests=5, max_latency_ratio=Decimal("5"), failure_limit=2),
    )
    r = Driver(bed, spec, SLOW)
    d = await r.advance(timedelta(0))
    for _ in range(2):
        d = await r.window(d.weight)
    assert (d.status["phase"], d.weight) == ("RolledBack", 0), d.status
    last = d.status["lastAnalysis"]
    assert float(last["candidate"]["p95"]) >= SLOW_RUN_S, last
    assert float(last["stable"]["p95"]) * 5 < float(last["candidate"]["p95"]), last
    assert last["candidate"]["errorRate"] == "0.0000"
    assert "p95 latency" in d.status["message"] and "maxLatencyRatio 5" in d.status["message"]


async def test_no_traffic_holds_the_step(bed: Bed) -> None:
    spec = RolloutSpec((Step(weight=10),), thresholds(failure_limit=1))
    r = Driver(bed, spec, IDLE)
    d = await r.advance(timedelta(0))
    for _ in range(2):
        # The stable serves; the candidate (its series there, at 0) gets nothing.
        await asyncio.to_thread(bed.traffic, IDLE, 0, 2.0)
        d = await r.advance(WINDOW)
        assert (d.status["phase"], d.status["step"], d.weight) == ("Holding", 0, 10), d.status
        assert d.status["consecutiveFailures"] == 0
        assert "served 0 requests" in d.status["message"], d.status["message"]
        assert "fewer than minRequests 20" in d.status["message"]
    assert [a.result for a in r.analyses] == ["InsufficientTraffic"] * 2
    assert [e[1] for e in r.events] == ["RolloutProgressing", "RolloutHolding"]
    # A candidate Prometheus has no series of at all: held too, never passed.
    r = Driver(bed, spec, "9")
    await r.advance(timedelta(0))
    d = await r.advance(WINDOW)
    assert d.status["phase"] == "Holding" and "no request series" in d.status["message"]


@pytest.mark.e2e
def test_the_operator_rolls_back_a_5xx_candidate_on_the_real_prometheus(
    bed: Bed, cluster: Any, repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same judgement made by the operator process: the model (the example's name and
    namespace, so the runtimes above are its versions' pods to Prometheus) in the local
    control plane with the faulty version as its candidate; the operator's own analysis
    reads the real Prometheus while the test sends traffic at the rollout's weight, and the
    operator sets the candidate's weight to 0 after failureLimit failed analyses."""
    from e2e.conftest import eventually
    from e2e.operator_process import OperatorProcess
    from e2e.test_operator import prepare_namespace

    cluster.kubectl("apply", "--server-side", "-f", str(repo_root / "crds"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", "crd/inferencemodels.kubeonnx.io"
    )
    ns = bed.namespace
    if ns != "default":
        cluster.kubectl("create", "namespace", ns, check=False)
    prepare_namespace(cluster, ns)
    seconds = int(WINDOW.total_seconds())
    doc = {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": bed.model},
        "spec": {
            "model": {"uri": "s3://models/mlp/1/model.onnx", "version": STABLE},
            "scaling": {"minReplicas": 1, "maxReplicas": 2},
            "traffic": {
                "candidates": [
                    {"version": FAULTY, "model": {"uri": "s3://models/mlp/3/model.onnx"}}
                ],
                "rollout": {
                    "steps": [{"weight": 50}],
                    "analysis": {
                        "interval": f"{seconds}s",
                        "minRequests": 20,
                        "maxErrorRate": "0.05",
                        "maxLatencyRatio": "20",
                        "failureLimit": 2,
                    },
                },
            },
        },
    }
    op = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig,
        tmp_path_factory.mktemp("operator"),
        prometheusAddress=bed.prometheus.url,
    )
    op.start()
    try:
        applied = cluster.apply(doc, ns)
        assert applied.returncode == 0, applied.stderr

        def rollout() -> dict[str, Any]:
            im = cluster.get("inferencemodel", bed.model, "-n", ns) or {}
            return dict((im.get("status") or {}).get("rollout") or {})

        eventually(lambda: rollout().get("phase") == "Progressing", 120, what="the rollout")
        # Traffic at the rollout's weight, a window at a time, until the operator decides.
        deadline = time.monotonic() + 240
        while rollout().get("phase") != "RolledBack" and time.monotonic() < deadline:
            weight = rollout().get("weight") or 50
            bed.traffic(FAULTY, weight, WINDOW.total_seconds())
        r = rollout()
        assert (r.get("phase"), r.get("weight")) == ("RolledBack", 0), (r, op.logs()[-3000:])
        last = r["lastAnalysis"]
        assert last["result"] == "Failed"
        assert math.isclose(float(last["candidate"]["errorRate"]), 1 / FAIL_EVERY, abs_tol=0.1)
        assert "maxErrorRate 0.05" in r["message"]
        events = cluster.get("events", "-n", ns) or {}
        reasons = {(e["type"], e["reason"]) for e in events.get("items", [])}
        assert ("Warning", "RolloutRolledBack") in reasons
    finally:
        cluster.kubectl("delete", "inferencemodel", bed.model, "-n", ns, check=False)
        op.stop()
