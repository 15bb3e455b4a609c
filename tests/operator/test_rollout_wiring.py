"""The rollout engine wired into the reconciler (docs/rollouts.md): each reconcile of a model
with spec.traffic.rollout advances it, writes status.rollout, gives the candidate the
rollout's weight (the router's file, status.versions), posts its Events and asks to be
reconciled again when time alone moves it on; an operator started afresh resumes at the
same step, and an idle reconcile writes nothing. The analysis is a fake here (the real
Prometheus one is in e2e/)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.analysis import Analysis, Measurement, Thresholds
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.observed import ObservedChildren
from kubeonnx_operator.reconcile import Reconciler
from kubeonnx_operator.rollout import RESUME_ANNOTATION, Analyse

from tests.operator.test_reconcile import FakeKube, body
from tests.operator.test_traffic import candidate, watched

START = datetime(2026, 1, 1, tzinfo=UTC)
ROLLOUT = {
    "steps": [{"weight": 10}, {"pause": {}}, {"weight": 50}],
    "analysis": {"interval": "1m", "minRequests": 5, "failureLimit": 2},
}


class Harness:
    """A reconciler with a fake clock, a fake analysis and the requeues it asked for."""

    def __init__(self, kube: FakeKube, observed: ObservedChildren) -> None:
        self.kube, self.observed = kube, observed
        self.now = START
        self.results: list[str] = []  # the next analyses' results, in order
        self.analysed: list[tuple[str, str, str, str]] = []
        self.requeues: list[float | None] = []
        self.rec = Reconciler(
            kube,  # type: ignore[arg-type]
            OperatorConfig(),
            observed,
            now=lambda: "t",
            clock=lambda: self.now,
            analyser=self.analyser,
            requeue=lambda key, after: self.requeues.append(after),
        )

    def analyser(self, namespace: str, name: str, stable: str, cand: str, t: Thresholds) -> Analyse:
        async def run() -> Analysis:
            self.analysed.append((namespace, name, stable, cand))
            result = self.results.pop(0)
            sample = Measurement(100.0, 0.0 if result == "Passed" else 50.0, 0.01)
            return Analysis(result, f"fake {result}", sample, sample)  # type: ignore[arg-type]

        return run

    async def reconcile(self, im: dict[str, Any]) -> dict[str, Any]:
        await self.rec.reconcile(im)
        if self.kube.statuses:
            im["status"] = _merged(im.get("status") or {}, self.kube.statuses[-1])
        return im


def _merged(previous: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch applied, as the API server does (null removes)."""
    out = dict(previous)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merged(out[k], v)
        else:
            out[k] = v
    return out


def rollout_events(kube: FakeKube) -> list[tuple[str, ...]]:
    """The rollout's Events (posted before the status write, so before a Ready change's)."""
    return [tuple(e) for e in kube.events if e[1].startswith("Rollout")]


def router_weights(kube: FakeKube) -> dict[str, int]:
    text = kube.live[("ConfigMap", "m-router")]["data"]["router.json"]
    return {v["name"]: v["weight"] for v in json.loads(text)["versions"]}


def show(kube: FakeKube, observed: ObservedChildren, candidate_ready: int) -> None:
    """The watch shows what was applied: the stable ready, the candidate as told."""
    for live in kube.live.values():
        observed.record(("ns", "m"), live, deleted=False)
    observed.record(("ns", "m"), watched(kube, "m", ready=1), deleted=False)
    observed.record(("ns", "m"), watched(kube, "m-v2", ready=candidate_ready), deleted=False)


def rollout_model() -> dict[str, Any]:
    return body(traffic={"candidates": [candidate("2")], "rollout": ROLLOUT})


async def test_the_reconciler_runs_the_rollout_step_by_step() -> None:
    kube, observed = FakeKube(), ObservedChildren()
    h = Harness(kube, observed)
    im = await h.reconcile(rollout_model())
    # The candidate's first step: weight 10, held while it has no ready replica.
    rollout = im["status"]["rollout"]
    assert (rollout["phase"], rollout["step"], rollout["weight"]) == ("Holding", 0, 10)
    assert rollout["candidate"] == "2"
    assert router_weights(kube) == {"1": 90, "2": 10}
    assert rollout_events(kube)[-1][:2] == ("Normal", "RolloutHolding")
    assert h.requeues[-1] is None  # only the candidate's readiness moves it on

    show(kube, observed, candidate_ready=1)
    im = await h.reconcile(im)
    assert im["status"]["rollout"]["phase"] == "Progressing"
    assert [v["weight"] for v in im["status"]["versions"]] == [90, 10]
    assert [v["desiredWeight"] for v in im["status"]["versions"]] == [90, 10]
    assert h.requeues[-1] == 60.0  # the next analysis
    assert h.analysed == []

    # A minute later the analysis passes: the open-ended pause holds weight 10.
    h.now += timedelta(minutes=1)
    h.results = ["Passed"]
    im = await h.reconcile(im)
    assert h.analysed == [("ns", "m", "1", "2")]
    rollout = im["status"]["rollout"]
    assert (rollout["phase"], rollout["step"], rollout["weight"]) == ("Paused", 1, 10)
    assert rollout["lastAnalysis"]["result"] == "Passed"
    assert rollout["lastAnalysis"]["candidate"]["errorRate"] == "0.0000"  # a string
    assert rollout_events(kube)[-1][:2] == ("Normal", "RolloutPaused")
    assert RESUME_ANNOTATION + "=2/1" in rollout_events(kube)[-1][2]

    # Idle: the same model again writes nothing (no apply, status, Event, analysis).
    show(kube, observed, candidate_ready=1)
    await h.reconcile(im)
    writes = (len(kube.applied), len(kube.statuses), len(kube.events), len(kube.deleted))
    await h.reconcile(copy.deepcopy(im))
    assert (len(kube.applied), len(kube.statuses), len(kube.events), len(kube.deleted)) == writes
    assert len(h.analysed) == 1

    # A person resumes the pause: step 2, weight 50 in the router's file.
    im["metadata"]["annotations"] = {RESUME_ANNOTATION: "2/1"}
    im = await h.reconcile(im)
    rollout = im["status"]["rollout"]
    assert (rollout["phase"], rollout["step"], rollout["weight"]) == ("Progressing", 2, 50)
    assert router_weights(kube) == {"1": 50, "2": 50}
    assert [v["desiredWeight"] for v in im["status"]["versions"]] == [50, 50]

    # The operator restarts (nothing in memory): it resumes at the same step, from status.
    show(kube, observed, candidate_ready=1)
    h2 = Harness(kube, observed)
    h2.now = h.now
    before = copy.deepcopy(im["status"]["rollout"])
    im = await h2.reconcile(im)
    assert im["status"]["rollout"] == before
    assert router_weights(kube) == {"1": 50, "2": 50}

    # Two failed analyses in a row (failureLimit 2): rolled back, weight 0, a Warning.
    h2.results = ["Failed", "Failed"]
    h2.now += timedelta(minutes=1)
    im = await h2.reconcile(im)
    assert im["status"]["rollout"]["consecutiveFailures"] == 1
    h2.now += timedelta(minutes=1)
    im = await h2.reconcile(im)
    rollout = im["status"]["rollout"]
    assert (rollout["phase"], rollout["weight"]) == ("RolledBack", 0)
    assert router_weights(kube) == {"1": 100, "2": 0}
    assert rollout_events(kube)[-1][:2] == ("Warning", "RolloutRolledBack")
    assert h2.requeues[-1] is None
    # Every key written is one the CRD's status schema has, of its type (else the API
    # server drops it and the rollout cannot resume).
    assert_fits(im["status"]["rollout"], status_schema()["rollout"])


CRD = Path(__file__).resolve().parents[2] / "crds" / "inferencemodels.kubeonnx.io.yaml"
TYPES = {"string": str, "integer": int, "number": (int, float), "object": dict}


def status_schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text())
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["status"]["properties"]  # type: ignore[no-any-return]


def assert_fits(value: Any, schema: dict[str, Any], where: str = "status.rollout") -> None:
    assert isinstance(value, TYPES[schema["type"]]), f"{where}: {value!r} is no {schema['type']}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for k, v in value.items():
            assert k in schema["properties"], f"{where}.{k} is not in the CRD's status schema"
            assert_fits(v, schema["properties"][k], f"{where}.{k}")


async def test_promotion_concludes_the_rollout_and_abandoning_removes_it() -> None:
    kube, observed = FakeKube(), ObservedChildren()
    h = Harness(kube, observed)
    im = await h.reconcile(rollout_model())
    assert im["status"]["rollout"]["candidate"] == "2"
    # The person moves the candidate into spec.model: Succeeded, with its Event.
    promoted = copy.deepcopy(im)
    promoted["spec"] = {"model": {"uri": "s3://models/mlp/2/model.onnx", "version": "2"}}
    promoted = await h.reconcile(promoted)
    assert promoted["status"]["rollout"]["phase"] == "Succeeded"
    assert rollout_events(kube)[-1][:2] == ("Normal", "RolloutSucceeded")
    # Abandoned instead (the candidate removed, the stable unchanged): status.rollout goes.
    abandoned = copy.deepcopy(im)
    abandoned["spec"] = {"model": {"uri": "s3://b/m.onnx"}}
    await h.reconcile(abandoned)
    assert kube.statuses[-1]["rollout"] is None


def route_weights(kube: FakeKube) -> list[int]:
    route = next(m for (kind, _), m in kube.live.items() if kind == "HTTPRoute")
    main = route["spec"]["rules"][-1]
    return [b["weight"] for b in main["backendRefs"]]


async def test_the_httproute_serves_the_rollouts_weight_once_the_candidate_is_ready() -> None:
    kube, observed = FakeKube(), ObservedChildren()
    h = Harness(kube, observed)
    route = {"host": "models.example.com", "gateway": {"parentRefs": [{"name": "public"}]}}
    im = body(
        traffic={"candidates": [candidate("2")], "rollout": ROLLOUT},
        ingress={"enabled": False, **route},
    )
    im = await h.reconcile(im)
    assert route_weights(kube) == [0, 0]  # nothing ready yet: the Gateway serves none
    show(kube, observed, candidate_ready=0)
    im = await h.reconcile(im)
    assert route_weights(kube) == [100, 0]  # the candidate's 10 only once it is ready
    show(kube, observed, candidate_ready=1)
    await h.reconcile(im)
    assert route_weights(kube) == [90, 10]


class MissingSecretKube(FakeKube):
    """FakeKube whose namespace lacks the Secrets named in `missing`."""

    def __init__(self) -> None:
        super().__init__()
        self.missing: set[str] = set()

    async def secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None if name in self.missing else {"kind": "PartialObjectMetadata"}


async def test_a_rollback_is_kept_while_the_candidates_secret_is_missing() -> None:
    """The reconcile returns early (nothing applied while a Secret is missing), yet the
    analyses it ran are recorded, the rollback included, and it is reconciled again."""
    kube, observed = MissingSecretKube(), ObservedChildren()
    h = Harness(kube, observed)
    s3 = {"credentialsSecret": "cand-creds"}
    entry = candidate("2")
    entry["model"]["s3"] = s3
    im = body(traffic={"candidates": [entry], "rollout": ROLLOUT})
    im = await h.reconcile(im)
    show(kube, observed, candidate_ready=1)
    im = await h.reconcile(im)
    assert im["status"]["rollout"]["phase"] == "Progressing"
    # The candidate's Secret goes (an operator started afresh asks about it again).
    kube.missing.add("cand-creds")
    h2 = Harness(kube, observed)
    h2.now = h.now + timedelta(minutes=1)
    h2.results = ["Failed", "Failed"]
    im = await h2.reconcile(im)
    assert any("CredentialsSecretNotFound" in str(s) for s in kube.statuses[-1:])
    assert im["status"]["rollout"]["consecutiveFailures"] == 1
    assert h2.requeues[-1] == 60.0
    h2.now += timedelta(minutes=1)
    im = await h2.reconcile(im)
    rollout = im["status"]["rollout"]
    assert (rollout["phase"], rollout["weight"]) == ("RolledBack", 0)
    assert ("Warning", "RolloutRolledBack") in [e[:2] for e in kube.events]


class DyingKube(FakeKube):
    """FakeKube whose process dies (an exception) when it writes the status, once told to."""

    die = False

    async def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        if self.die:
            raise SystemExit("SIGKILL")
        await super().patch_model_status(namespace, name, status)


async def test_an_operator_killed_at_the_status_write_has_posted_the_phase_event() -> None:
    kube, observed = DyingKube(), ObservedChildren()
    h = Harness(kube, observed)
    im = await h.reconcile(rollout_model())
    show(kube, observed, candidate_ready=1)
    im = await h.reconcile(im)
    h.results = ["Passed"]
    h.now += timedelta(minutes=1)
    kube.die = True
    with pytest.raises(SystemExit):
        await h.reconcile(im)
    assert rollout_events(kube)[-1][:2] == ("Normal", "RolloutPaused")
