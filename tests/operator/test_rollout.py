"""The rollout state machine (rollout.advance) driven step by step with an injected clock and
scripted analyses: every phase, every way out of a step, and resumption from status alone."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubeonnx_operator.analysis import Analysis, Measurement, Thresholds
from kubeonnx_operator.rollout import (
    RESUME_ANNOTATION,
    TIME_FORMAT,
    RolloutDecision,
    RolloutSpec,
    Step,
    advance,
    candidate_spec_hash,
    conclude,
)

T0 = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
GOOD = Measurement(requests=200, errors=0, p95=0.01)
BAD = Measurement(requests=200, errors=20, p95=0.01)
STABLE = Measurement(requests=2000, errors=0, p95=0.01)


def passed() -> Analysis:
    return Analysis("Passed", "200 requests, 5xx error rate 0.0000", GOOD, STABLE)


def failed() -> Analysis:
    return Analysis("Failed", "5xx error rate 0.1000 > maxErrorRate 0.01", BAD, STABLE)


def scarce() -> Analysis:
    return Analysis("InsufficientTraffic", "the candidate served 3 requests", None, None)


def unavailable() -> Analysis:
    return Analysis("Unavailable", "Prometheus at http://p:9090 cannot be reached")


class Analyses:
    """A scripted `analyse`: each call takes the next result; the calls are counted."""

    def __init__(self, results: Iterable[Analysis] = ()) -> None:
        self.results = list(results)
        self.calls = 0

    async def __call__(self) -> Analysis:
        self.calls += 1
        assert self.results, "an analysis was made that the test did not expect"
        return self.results.pop(0)


def spec(*steps: Step, auto_promote: bool = False, failure_limit: int = 2) -> RolloutSpec:
    return RolloutSpec(
        tuple(steps), Thresholds(interval=MIN, failure_limit=failure_limit), auto_promote
    )


W10, W50 = Step(weight=10), Step(weight=50)
PAUSE_5M = Step(pause=True, duration=timedelta(minutes=5))
PAUSE = Step(pause=True)


class Rollout:
    """Calls `advance` as a reconciler would: the previous status.rollout (JSON round trip,
    as the API server keeps it) and the clock; records the events."""

    def __init__(self, spec: RolloutSpec, hash_: str = "h1") -> None:
        self.spec = spec
        self.hash = hash_
        self.status: dict[str, Any] | None = None
        self.now = T0
        self.events: list[tuple[str, str, str]] = []
        self.last: RolloutDecision | None = None

    async def at(
        self,
        delta: timedelta,
        analyses: Analyses | None = None,
        ready: bool = True,
        resume: str | None = None,
    ) -> RolloutDecision:
        self.now += delta
        decision = await advance(
            self.spec,
            self.status,
            candidate="2",
            candidate_ready=ready,
            candidate_spec_hash=self.hash,
            now=self.now,
            analyse=analyses or Analyses(),
            resume=resume,
        )
        self.status = json.loads(json.dumps(decision.status))
        self.events += [(e.type, e.reason, e.message) for e in decision.events]
        self.last = decision
        return decision

    @property
    def phase(self) -> str:
        assert self.status is not None
        return str(self.status["phase"])


async def test_a_new_candidate_starts_at_step_0_with_its_weight_and_no_analysis_yet() -> None:
    r = Rollout(spec(W10, W50))
    d = await r.at(timedelta(0))
    assert (d.weight, d.status["step"], d.status["phase"]) == (10, 0, "Progressing")
    assert d.status["since"] == "2026-01-05T10:00:00Z"
    assert d.status["candidateSpecHash"] == "h1" and d.status["consecutiveFailures"] == 0
    assert d.requeue_after == 60
    assert [e[1] for e in r.events] == ["RolloutProgressing"]
    # Before a whole interval at this weight, no analysis is made (the scripted one is empty).
    d = await r.at(timedelta(seconds=59))
    assert d.status["step"] == 0 and d.requeue_after == 1 and r.events[1:] == []


async def test_a_healthy_candidate_goes_through_every_step_then_waits_for_a_person() -> None:
    r = Rollout(spec(W10, PAUSE_5M, W50))
    await r.at(timedelta(0))
    weights = []
    a = Analyses([passed()] * 20)
    d = await r.at(MIN, a)  # step 0 passes: the timed pause begins, weight kept
    weights.append(d.weight)
    assert (d.status["step"], d.status["phase"], d.requeue_after) == (1, "Progressing", 60)
    assert "paused until 2026-01-05T10:06:00Z" in d.status["message"]
    for _ in range(4):  # analyses go on during the pause; it ends after 5 minutes
        d = await r.at(MIN, a)
        assert d.status["step"] == 1
    d = await r.at(MIN, a)
    assert (d.status["step"], d.weight) == (2, 50)
    weights.append(d.weight)
    d = await r.at(MIN, a)
    assert (d.status["step"], d.weight, d.status["phase"]) == (3, 50, "Paused")
    assert "move it into spec.model" in d.status["message"]
    assert weights == [10, 50]
    # One Event per phase change, not per step.
    assert [e[1] for e in r.events] == ["RolloutProgressing", "RolloutPaused"]
    assert all(e[0] == "Normal" for e in r.events)
    # Paused at the end it stays, and goes on being watched.
    calls = a.calls
    d = await r.at(MIN, a)
    assert d.status["phase"] == "Paused" and a.calls == calls + 1 and len(r.events) == 2


async def test_with_auto_promote_the_candidate_gets_everything_and_spec_is_left_to_a_person() -> (
    None
):
    r = Rollout(spec(W10, auto_promote=True))
    await r.at(timedelta(0))
    d = await r.at(MIN, Analyses([passed()]))
    assert (d.weight, d.status["phase"], d.status["step"]) == (100, "Promoted", 1)
    assert "move it into spec.model" in d.status["message"]
    assert r.events[-1][:2] == ("Normal", "RolloutPromoted")


async def test_failure_limit_failures_in_a_row_roll_back_for_good_until_the_spec_changes() -> None:
    r = Rollout(spec(W10, W50, failure_limit=2))
    await r.at(timedelta(0))
    d = await r.at(MIN, Analyses([failed()]))
    assert (d.weight, d.status["phase"], d.status["consecutiveFailures"]) == (10, "Progressing", 1)
    assert "analysis failed (1 of failureLimit 2)" in d.status["message"]
    d = await r.at(MIN, Analyses([failed()]))
    assert (d.weight, d.status["phase"], d.status["consecutiveFailures"]) == (0, "RolledBack", 2)
    last = d.status["lastAnalysis"]
    assert last["result"] == "Failed"
    assert last["candidate"] == {"requests": 200, "errorRate": "0.1000", "p95": "0.0100"}
    assert last["stable"]["requests"] == 2000
    assert "5xx error rate 0.1000" in d.status["message"]
    assert r.events[-1][:2] == ("Warning", "RolloutRolledBack")
    assert d.requeue_after is None
    # No retry, no analysis, no further Event, however long.
    n = len(r.events)
    for _ in range(3):
        d = await r.at(timedelta(hours=1), Analyses())
        assert (d.weight, d.status["phase"]) == (0, "RolledBack")
    assert len(r.events) == n
    # A new candidate spec: the rollout starts over from step 0.
    r.hash = "h2"
    d = await r.at(timedelta(0))
    assert (d.weight, d.status["phase"], d.status["step"]) == (10, "Progressing", 0)
    assert d.status["consecutiveFailures"] == 0 and "lastAnalysis" not in d.status
    assert r.events[-1][1] == "RolloutProgressing"
    assert r.events[-1][2].startswith("the candidate's spec changed, the rollout starts: step 0")


async def test_failures_that_are_not_consecutive_do_not_roll_back() -> None:
    r = Rollout(spec(W10, W50, failure_limit=2))
    await r.at(timedelta(0))
    await r.at(MIN, Analyses([failed()]))
    d = await r.at(MIN, Analyses([passed()]))
    assert d.status["consecutiveFailures"] == 0 and d.status["step"] == 1
    await r.at(MIN, Analyses([failed()]))
    d = await r.at(MIN, Analyses([passed()]))
    assert d.status["phase"] == "Paused" and d.weight == 50


async def test_too_little_traffic_holds_the_step_without_passing_or_failing() -> None:
    r = Rollout(spec(W10, W50, failure_limit=1))
    await r.at(timedelta(0))
    for _ in range(5):
        d = await r.at(MIN, Analyses([scarce()]))
        assert (d.status["step"], d.status["phase"], d.weight) == (0, "Holding", 10)
        assert d.status["consecutiveFailures"] == 0
        assert "the candidate served 3 requests" in d.status["message"]
    assert [e[:2] for e in r.events] == [
        ("Normal", "RolloutProgressing"),
        ("Normal", "RolloutHolding"),
    ]
    d = await r.at(MIN, Analyses([passed()]))
    assert (d.status["step"], d.status["phase"]) == (1, "Progressing")


async def test_a_hold_between_two_failures_keeps_the_count() -> None:
    r = Rollout(spec(W10, failure_limit=2))
    await r.at(timedelta(0))
    await r.at(MIN, Analyses([failed()]))
    d = await r.at(MIN, Analyses([scarce()]))
    assert d.status["consecutiveFailures"] == 1 and d.status["phase"] == "Holding"
    d = await r.at(MIN, Analyses([failed()]))
    assert d.status["phase"] == "RolledBack"


async def test_prometheus_unreachable_holds_with_a_warning_and_never_rolls_back() -> None:
    r = Rollout(spec(W10, failure_limit=1))
    await r.at(timedelta(0))
    for _ in range(5):
        d = await r.at(MIN, Analyses([unavailable()]))
        assert (d.status["phase"], d.weight, d.status["step"]) == ("Holding", 10, 0)
        assert "cannot be reached" in d.status["message"]
    assert r.events[-1][:2] == ("Warning", "RolloutHolding") and len(r.events) == 2


async def test_an_open_ended_pause_waits_for_the_annotation_naming_its_step() -> None:
    r = Rollout(spec(W10, PAUSE, W50))
    await r.at(timedelta(0))
    a = Analyses([passed()] * 10)
    d = await r.at(MIN, a)
    assert (d.status["step"], d.status["phase"], d.weight) == (1, "Paused", 10)
    assert f"{RESUME_ANNOTATION}=2/1" in d.status["message"]
    # Time does not end it, nor a resume meant for another step or another candidate.
    for other in ("2/0", "1/1", "1"):
        d = await r.at(timedelta(hours=2), a, resume=other)
        assert (d.status["step"], d.status["phase"]) == (1, "Paused")
    d = await r.at(MIN, a, resume="2/1")
    assert (d.status["step"], d.status["phase"], d.weight) == (2, "Progressing", 50)
    # The annotation left in place does not skip a later pause.
    assert [e[1] for e in r.events] == ["RolloutProgressing", "RolloutPaused", "RolloutProgressing"]


async def test_a_pause_first_keeps_the_candidate_at_zero_and_analyses_nothing() -> None:
    r = Rollout(spec(Step(pause=True, duration=timedelta(minutes=2)), W10))
    d = await r.at(timedelta(0))
    assert (d.weight, d.requeue_after) == (0, 120)
    d = await r.at(timedelta(minutes=2), Analyses())
    assert (d.status["step"], d.weight, d.requeue_after) == (1, 10, 60)


async def test_a_timed_pause_does_not_end_on_a_failing_analysis() -> None:
    r = Rollout(spec(W10, PAUSE_5M, W50, failure_limit=3))
    await r.at(timedelta(0))
    await r.at(MIN, Analyses([passed()]))
    d = await r.at(timedelta(minutes=5), Analyses([failed()]))
    assert d.status["step"] == 1 and "a passing analysis" in d.status["message"]
    d = await r.at(MIN, Analyses([passed()]))
    assert d.status["step"] == 2


async def test_a_candidate_without_a_ready_replica_holds_and_is_not_analysed() -> None:
    r = Rollout(spec(W10))
    d = await r.at(timedelta(0), ready=False)
    assert (d.status["phase"], d.weight, d.requeue_after) == ("Holding", 10, None)
    assert "no ready replica" in d.status["message"]
    d = await r.at(timedelta(minutes=10), Analyses(), ready=False)
    assert d.status["phase"] == "Holding"
    d = await r.at(timedelta(0), Analyses([passed()]))
    assert d.status["phase"] == "Paused"
    assert [e[1] for e in r.events] == ["RolloutHolding", "RolloutPaused"]


async def test_another_candidate_version_starts_its_own_rollout() -> None:
    r = Rollout(spec(W10, W50))
    await r.at(timedelta(0))
    await r.at(MIN, Analyses([passed()]))
    assert r.status is not None
    d = await advance(
        r.spec,
        r.status,
        candidate="3",
        candidate_ready=True,
        candidate_spec_hash="h1",
        now=r.now,
        analyse=Analyses(),
    )
    assert (d.status["candidate"], d.status["step"], d.weight) == ("3", 0, 10)
    assert d.events[0].reason == "RolloutProgressing"


@pytest.mark.parametrize(
    "prev",
    [
        {"phase": "Bogus", "step": 7},
        {"candidate": "2", "phase": "Paused", "step": 1, "candidateSpecHash": "h"},
        {
            "candidate": "2",
            "phase": "Paused",
            "step": 1,
            "since": "2026-01-05T10:00:00Z",
            "candidateSpecHash": "h",
            "lastAnalysis": {"time": "yesterday", "result": "Passed"},
        },
    ],
)
async def test_a_status_not_written_by_this_operator_starts_the_rollout_over(
    prev: dict[str, Any],
) -> None:
    d = await advance(
        spec(W10, PAUSE),
        prev,
        candidate="2",
        candidate_ready=True,
        candidate_spec_hash="h",
        now=T0,
        analyse=Analyses(),
    )
    assert (d.status["phase"], d.status["step"]) == ("Progressing", 0)


SCRIPT = [
    (timedelta(0), [], True, None),
    (MIN, [passed()], True, None),
    (MIN, [passed()], True, None),
    (timedelta(seconds=30), [], True, None),
    (timedelta(minutes=5), [scarce()], True, None),
    (MIN, [failed()], True, None),
    (MIN, [passed()], False, None),
    (MIN, [passed()], True, None),
    (MIN, [passed()], True, "2/3"),
    (MIN, [failed()], True, None),
    (MIN, [failed()], True, None),
    (MIN, [], True, None),
]


async def test_a_restart_resumes_from_status_alone_at_the_same_step() -> None:
    """The rollout run in one go, and run again from each status it wrote (a fresh process
    that read only status.rollout): the same statuses, weights and Events from there on."""
    s = spec(W10, PAUSE_5M, W50, PAUSE, Step(weight=80))

    async def run(start: int, status: dict[str, Any] | None, now: datetime) -> list[Any]:
        out = []
        for delta, results, ready, resume in SCRIPT[start:]:
            now += delta
            d = await advance(
                s,
                status,
                candidate="2",
                candidate_ready=ready,
                candidate_spec_hash="h1",
                now=now,
                analyse=Analyses(list(results) if ready else []),
                resume=resume,
            )
            status = json.loads(json.dumps(d.status))
            out.append((status, d.weight, d.events, d.requeue_after))
        return out

    whole = await run(0, None, T0)
    phases = [o[0]["phase"] for o in whole]
    assert {"Progressing", "Holding", "Paused", "RolledBack"} <= set(phases)
    now = T0
    for i in range(1, len(SCRIPT)):
        now += SCRIPT[i - 1][0]
        resumed = await run(i, whole[i - 1][0], now)
        assert resumed == whole[i:], f"resumed after call {i - 1}"
    # And each call repeated with what it wrote, at the same time, changes nothing and posts
    # nothing (no analysis is due again: it was just made, or was not due).
    now = T0
    for (delta, _, ready, resume), (status, weight, *_) in zip(SCRIPT, whole, strict=True):
        now += delta
        again = await advance(
            s,
            status,
            candidate="2",
            candidate_ready=ready,
            candidate_spec_hash="h1",
            now=now,
            analyse=Analyses(),
            resume=resume,
        )
        assert (again.status, again.weight, again.events) == (status, weight, ())


def test_conclude_says_succeeded_once_the_candidate_is_spec_models_version() -> None:
    prev = {
        "candidate": "2",
        "phase": "Promoted",
        "step": 1,
        "since": "2026-01-05T10:00:00Z",
        "candidateSpecHash": "h",
        "consecutiveFailures": 0,
    }
    done = conclude(prev, "2")
    assert done is not None and done.status["phase"] == "Succeeded"
    assert [e.reason for e in done.events] == ["RolloutSucceeded"]
    again = conclude(done.status, "2")
    assert again is not None and again.events == ()
    assert conclude(prev, "1") is None  # abandoned: the candidate was removed, not promoted
    assert conclude(None, "2") is None


def test_the_spec_is_read_as_the_yaml_writes_it() -> None:
    s = RolloutSpec.from_dict(
        {
            "steps": [{"weight": 10}, {"pause": {"duration": "5m"}}, {"pause": {}}],
            "analysis": {
                "interval": "30s",
                "minRequests": 20,
                "maxErrorRate": "0.05",
                "maxLatencyRatio": "2",
                "failureLimit": 3,
            },
            "autoPromote": True,
        }
    )
    assert s.steps == (
        Step(weight=10),
        Step(pause=True, duration=timedelta(minutes=5)),
        Step(pause=True),
    )
    assert s.analysis == Thresholds(timedelta(seconds=30), 20, Decimal("0.05"), Decimal("2"), 3)
    assert s.auto_promote
    assert RolloutSpec.from_dict({"steps": [{"weight": 5}]}).analysis == Thresholds()


@pytest.mark.parametrize(
    ("rollout", "problem"),
    [
        ({"steps": []}, "spec.traffic.rollout.steps: 1 to 20 steps"),
        ({"steps": [{"weight": 10, "pause": {}}]}, "steps[0]: exactly one of weight or pause"),
        ({"steps": [{"weight": 0}]}, "steps[0].weight: an integer of at least 1"),
        ({"steps": [{"weight": 101}]}, "steps[0].weight: at most 100"),
        ({"steps": [{"pause": {"duration": "5 min"}}]}, "steps[0].pause.duration: '5 min'"),
        (
            {"steps": [{"weight": 1}], "analysis": {"maxErrorRate": "lots"}},
            "analysis.maxErrorRate: a decimal",
        ),
        (
            {"steps": [{"weight": 1}], "analysis": {"interval": "0s"}},
            "analysis.interval: at least 1s",
        ),
        (
            {"steps": [{"weight": 1}], "analysis": {"failureLimit": 0}},
            "analysis.failureLimit: an integer of at least 1",
        ),
        (
            {"steps": [{"weight": 1}], "analysis": {"minRequests": 0}},
            "analysis.minRequests: an integer of at least 1",
        ),
        (
            {"steps": [{"weight": 1}], "analysis": {"interval": "99999999999h"}},
            "analysis.interval: at most 24h, not '99999999999h'",
        ),
        (
            {"steps": [{"weight": 1}], "analysis": {"interval": "24h1s"}},
            "analysis.interval: at most 24h",
        ),
        (
            {"steps": [{"pause": {"duration": "99999999999h"}}]},
            "steps[0].pause.duration: at most 720h, not '99999999999h'",
        ),
        ({"steps": [{"pause": {"duration": "721h"}}]}, "steps[0].pause.duration: at most 720h"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(rollout: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=r"spec\.traffic\.rollout") as err:
        RolloutSpec.from_dict(rollout)
    assert problem in str(err.value)


def test_the_candidate_spec_hash_changes_with_what_is_served_only() -> None:
    entry = {"version": "2", "model": {"uri": "s3://m/2.onnx", "sha256": "ab"}, "weight": 0}
    h = candidate_spec_hash(entry)
    same = {"weight": 30, "mirrorPercent": 5, "model": {"sha256": "ab", "uri": "s3://m/2.onnx"}}
    assert candidate_spec_hash({**same, "version": "2"}) == h
    assert candidate_spec_hash({**entry, "model": {"uri": "s3://m/2b.onnx", "sha256": "ab"}}) != h
    assert candidate_spec_hash({**entry, "resources": {"limits": {"cpu": "2"}}}) != h


async def test_a_resume_left_from_a_previous_rollout_does_not_skip_the_next_pause() -> None:
    """The annotation that resumed step 1 of one rollout is still there when the candidate's
    spec changes (or another candidate comes): the new rollout's pause at step 1 waits."""
    r = Rollout(spec(W10, PAUSE, W50))
    await r.at(timedelta(0))
    a = Analyses([passed()] * 10)
    await r.at(MIN, a)
    d = await r.at(MIN, a, resume="2/1")
    assert (d.status["step"], d.status["phase"]) == (2, "Progressing")
    # A new rollout of the same version (its spec changed), the annotation left in place.
    r.hash = "h2"
    d = await r.at(MIN, a, resume="2/1")
    assert (d.status["step"], d.status["staleResume"]) == (0, "2/1")
    d = await r.at(MIN, a, resume="2/1")
    assert (d.status["step"], d.status["phase"]) == (1, "Paused")
    d = await r.at(timedelta(hours=1), a, resume="2/1")
    assert (d.status["step"], d.status["phase"]) == (1, "Paused")
    # The person removes it and sets it again: now it is meant for this rollout.
    d = await r.at(MIN, a, resume=None)
    assert "staleResume" not in d.status
    d = await r.at(MIN, a, resume="2/1")
    assert (d.status["step"], d.status["phase"]) == (2, "Progressing")


def test_the_crd_refuses_a_min_requests_the_operator_would_refuse() -> None:
    """The CRD's minimum for analysis.minRequests is the operator's (1): a spec the API
    server admits is never one the reconcile refuses."""
    import yaml

    crd = Path(__file__).resolve().parents[2] / "crds" / "inferencemodels.kubeonnx.io.yaml"
    doc = yaml.safe_load(crd.read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    analysis = spec["properties"]["traffic"]["properties"]["rollout"]["properties"]["analysis"]
    assert analysis["properties"]["minRequests"]["minimum"] == 1
    RolloutSpec.from_dict({"steps": [{"weight": 1}], "analysis": {"minRequests": 1}})
    RolloutSpec.from_dict(
        {"steps": [{"pause": {"duration": "720h"}}], "analysis": {"interval": "24h"}}
    )


async def test_prometheus_going_unreadable_without_a_phase_change_posts_one_warning() -> None:
    r = Rollout(spec(W10, PAUSE, W50))
    await r.at(timedelta(0))
    d = await r.at(MIN, Analyses([scarce()]))
    assert d.status["phase"] == "Holding"
    n = len(r.events)
    # Holding on too little traffic, then Holding on an unreadable Prometheus: a Warning.
    d = await r.at(MIN, Analyses([unavailable()]))
    assert d.status["phase"] == "Holding"
    assert r.events[n:] == [
        ("Warning", "RolloutAnalysisUnavailable", "Prometheus at http://p:9090 cannot be reached")
    ]
    # Still unreadable: no second Warning.
    await r.at(MIN, Analyses([unavailable()]))
    assert len(r.events) == n + 1
    # Paused at the open-ended pause, Prometheus goes away again: one Warning.
    await r.at(MIN, Analyses([passed()]))
    await r.at(MIN, Analyses([passed()]))
    assert r.phase == "Paused"
    n = len(r.events)
    await r.at(MIN, Analyses([unavailable()]))
    await r.at(MIN, Analyses([unavailable()]))
    assert r.phase == "Paused"
    assert [e[:2] for e in r.events[n:]] == [("Warning", "RolloutAnalysisUnavailable")]


async def test_times_ahead_of_the_clock_are_taken_as_now() -> None:
    """An earlier leader whose clock ran an hour fast wrote since and lastAnalysis.time in
    the future: the next analysis is due an interval from now, not from its future."""
    r = Rollout(spec(W10, W50))
    await r.at(timedelta(0))
    d = await r.at(MIN, Analyses([scarce()]))
    assert r.status is not None
    ahead = (r.now + timedelta(hours=1)).strftime(TIME_FORMAT)
    r.status["since"] = ahead
    r.status["lastAnalysis"]["time"] = ahead
    d = await r.at(timedelta(0), Analyses())
    assert d.requeue_after == 60
    assert d.status["since"] == r.now.strftime(TIME_FORMAT)
    d = await r.at(MIN, Analyses([passed()]))
    assert (d.status["step"], d.weight) == (1, 50)
