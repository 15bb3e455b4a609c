"""spec.traffic.rollout run by the real operator process on the local control plane: the
steps advance (an open-ended pause resumed by the kubeonnx.io/rollout-resume annotation,
weight steps passing a short analysis), the router's file follows the rollout's weight, an
operator killed with SIGKILL resumes at the same step (all it needs is in status.rollout),
failed analyses roll the candidate back, and an idle resync writes nothing.

The analysis here reads a stand-in for Prometheus's query API whose answers the test sets
(the real Prometheus scraping real runtimes is e2e/test_rollout_analysis.py's)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from e2e.cluster import free_port
from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import assert_idle_resync, prepare_namespace, resyncs
from e2e.test_traffic import apply, candidate, model

pytestmark = pytest.mark.e2e
RESUME = "kubeonnx.io/rollout-resume"


class FakePrometheus:
    """/api/v1/query: 100 requests of each version, `candidate_errors` of them 5xx for the
    candidate (version="2"), p95 10 ms."""

    def __init__(self) -> None:
        self.candidate_errors = 0.0
        self.queries = 0
        prom = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                expr = parse_qs(urlparse(self.path).query).get("query", [""])[0]
                prom.queries += 1
                value = 100.0
                if 'code=~"5.."' in expr:
                    value = prom.candidate_errors if 'version="2"' in expr else 0.0
                elif expr.startswith("histogram_quantile"):
                    value = 0.01
                body = {
                    "status": "success",
                    "data": {
                        "resultType": "vector",
                        "result": [{"metric": {}, "value": [0, str(value)]}],
                    },
                }
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def prometheus() -> Iterator[FakePrometheus]:
    prom = FakePrometheus()
    prom.thread.start()
    yield prom
    prom.server.shutdown()


@pytest.fixture(scope="module")
def rollout_operator(
    cluster: Cluster,
    repo_root: Path,
    prometheus: FakePrometheus,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    cluster.kubectl("apply", "--server-side", "-f", str(repo_root / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/inferencemodels.kubeonnx.io",
    )
    op = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig,
        tmp_path_factory.mktemp("operator"),
        prometheusAddress=prometheus.address,
    )
    op.start()
    yield op
    op.stop()
    print(op.logs()[-5000:])


def rollout_of(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    im = cluster.get("inferencemodel", name, "-n", ns) or {}
    return dict((im.get("status") or {}).get("rollout") or {})


def router_weights(cluster: Cluster, ns: str, name: str) -> dict[str, int]:
    cm = cluster.get("configmap", f"{name}-router", "-n", ns) or {}
    text = (cm.get("data") or {}).get("router.json")
    if not text:
        return {}
    return {v["name"]: v["weight"] for v in json.loads(text)["versions"]}


def at(cluster: Cluster, ns: str, name: str, phase: str, step: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        r = rollout_of(cluster, ns, name)
        return r if (r.get("phase"), r.get("step")) == (phase, step) else None

    return eventually(check, 120, what=f"rollout {phase} at step {step}")


def quiet(cluster: Cluster, operator: OperatorProcess, ns: str, name: str) -> None:
    """An idle resync writes nothing: the model and its children keep their versions."""

    def snapshot() -> tuple[Any, ...]:
        im = cluster.get("inferencemodel", name, "-n", ns) or {}
        found = cluster.get("deployments,services,configmaps", "-n", ns) or {}
        return (
            im["metadata"]["resourceVersion"],
            sorted(
                (o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in found["items"]
            ),
        )

    assert_idle_resync(cluster, operator, ns, snapshot, settle_s=120)


def test_the_operator_runs_a_rollout_and_resumes_it_after_sigkill(
    cluster: Cluster,
    rollout_operator: OperatorProcess,
    prometheus: FakePrometheus,
    namespace: str,
) -> None:
    prepare_namespace(cluster, namespace)
    doc = model("ro", candidate("ro", "2"))
    doc["spec"]["traffic"]["rollout"] = {
        "steps": [{"pause": {}}, {"weight": 10}, {"pause": {}}, {"weight": 40}],
        "analysis": {"interval": "2s", "minRequests": 5, "failureLimit": 2},
    }
    apply(cluster, doc, namespace)
    # Step 0, an open-ended pause at weight 0: waits for a person; nothing to analyse.
    first = at(cluster, namespace, "ro", "Paused", 0)
    assert first["candidate"] == "2" and first["weight"] == 0
    assert router_weights(cluster, namespace, "ro") == {"1": 100, "2": 0}
    quiet(cluster, rollout_operator, namespace, "ro")
    columns = cluster.kubectl("get", "inferencemodel", "ro", "-n", namespace).stdout.split("\n")
    row = dict(zip(columns[0].split(), columns[1].split(), strict=False))
    assert row["PHASE"] == "Paused"

    # SIGKILL: the new process resumes at the same step, since the same time.
    rollout_operator.stop(signal.SIGKILL)
    rollout_operator.start()
    resyncs(rollout_operator, 2)
    assert rollout_of(cluster, namespace, "ro") == first

    # Resumed by a person: weight 10, a passing analysis, then the next pause.
    cluster.kubectl("annotate", "inferencemodel", "ro", "-n", namespace, f"{RESUME}=2/0")
    paused = at(cluster, namespace, "ro", "Paused", 2)
    assert paused["weight"] == 10 and paused["lastAnalysis"]["result"] == "Passed"
    assert router_weights(cluster, namespace, "ro") == {"1": 90, "2": 10}
    rollout_operator.stop(signal.SIGKILL)
    rollout_operator.start()
    resyncs(rollout_operator, 2)
    again = rollout_of(cluster, namespace, "ro")
    assert (again["phase"], again["step"], again["since"]) == ("Paused", 2, paused["since"])

    # Resumed again: weight 40, passed, every step done (Paused for the person to promote).
    cluster.kubectl(
        "annotate", "--overwrite", "inferencemodel", "ro", "-n", namespace, f"{RESUME}=2/2"
    )
    at(cluster, namespace, "ro", "Paused", 4)
    assert router_weights(cluster, namespace, "ro") == {"1": 60, "2": 40}

    # The candidate turns bad: two failed analyses roll it back to weight 0, a Warning.
    prometheus.candidate_errors = 50.0
    rolled = at(cluster, namespace, "ro", "RolledBack", 4)
    assert rolled["weight"] == 0 and "maxErrorRate" in rolled["message"]
    eventually(
        lambda: router_weights(cluster, namespace, "ro") == {"1": 100, "2": 0},
        60,
        what="the router's file at weight 0",
    )
    events = cluster.get("events", "-n", namespace) or {}
    reasons = {(e["type"], e["reason"]) for e in events.get("items", [])}
    assert ("Warning", "RolloutRolledBack") in reasons
    # Rolled back, nothing is due: an idle resync writes nothing.
    quiet(cluster, rollout_operator, namespace, "ro")
