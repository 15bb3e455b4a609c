"""A progressive rollout of one candidate version (spec.traffic.rollout), as a pure state
machine over status.rollout: `advance` takes the rollout's spec, the previous status.rollout
and what is observed now, and returns the new status.rollout, the candidate's weight and the
Events to post. Everything it needs between two calls is in status.rollout, so an operator
restarted mid-rollout resumes at the same step; the operator never writes spec.

Steps run in order. A weight step sets the candidate's weight and ends once an analysis made
a full `interval` after the step began passes. A pause keeps the weight: with a duration it
ends when that has passed; without one it waits for a person, who resumes it by annotating
the model `kubeonnx.io/rollout-resume=<candidate version>/<step>` (phase Paused meanwhile; a
value already there when the rollout starts is left over from another and ignored). While
the candidate has a weight, an analysis runs every `interval` (analysis.py): `failureLimit` failed
analyses in a row set the weight to 0 for good (RolledBack) until the candidate's spec
changes; too little traffic or an unreadable Prometheus holds (Holding), never passes and
never rolls back. After the last step the candidate keeps its weight and a person promotes
it (Paused), or with autoPromote it takes 100% (Promoted); either way the person moves it
into spec.model to finish (Succeeded)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

from .analysis import Analysis, Thresholds, analysis_status
from .spec import duration_seconds

Phase = Literal["Progressing", "Paused", "Holding", "RolledBack", "Promoted", "Succeeded"]
PHASES: tuple[str, ...] = get_args(Phase)
# A person resumes an open-ended pause by setting this annotation to "VERSION/STEP": the
# candidate's version and the step's index.
RESUME_ANNOTATION = "kubeonnx.io/rollout-resume"
HOLDS = frozenset({"InsufficientTraffic", "Unavailable"})
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Step:
    """One of spec.traffic.rollout.steps: a weight, or a pause (`duration` None: a person
    ends it)."""

    weight: int | None = None
    pause: bool = False
    duration: timedelta | None = None


@dataclass(frozen=True)
class RolloutSpec:
    """spec.traffic.rollout."""

    steps: tuple[Step, ...]
    analysis: Thresholds = field(default_factory=Thresholds)
    auto_promote: bool = False

    @classmethod
    def from_dict(cls, rollout: Mapping[str, Any]) -> RolloutSpec:
        """From spec.traffic.rollout as written (camelCase); ValueError naming the field."""
        where = "spec.traffic.rollout"
        raw_steps = rollout.get("steps") or []
        if not 1 <= len(raw_steps) <= 20:
            raise ValueError(f"{where}.steps: 1 to 20 steps, not {len(raw_steps)}")
        steps = tuple(_step(s, f"{where}.steps[{i}]") for i, s in enumerate(raw_steps))
        a = rollout.get("analysis") or {}
        d = Thresholds()
        thresholds = Thresholds(
            interval=_interval(a.get("interval"), f"{where}.analysis.interval", d.interval),
            min_requests=_int(
                a.get("minRequests", d.min_requests), f"{where}.analysis.minRequests", 1
            ),
            max_error_rate=_decimal(
                a.get("maxErrorRate", d.max_error_rate), f"{where}.analysis.maxErrorRate"
            ),
            max_latency_ratio=_decimal(
                a.get("maxLatencyRatio", d.max_latency_ratio), f"{where}.analysis.maxLatencyRatio"
            ),
            failure_limit=_int(
                a.get("failureLimit", d.failure_limit), f"{where}.analysis.failureLimit", 1
            ),
        )
        return cls(steps, thresholds, bool(rollout.get("autoPromote", False)))

    def weight_at(self, step: int) -> int:
        """The candidate's weight at `step` (len(steps): every step done)."""
        if step >= len(self.steps) and self.auto_promote:
            return 100
        weights = [s.weight for s in self.steps[: step + 1] if s.weight is not None]
        return weights[-1] if weights else 0


def _step(raw: Any, where: str) -> Step:
    if not isinstance(raw, Mapping) or ("weight" in raw) == ("pause" in raw):
        raise ValueError(f"{where}: exactly one of weight or pause")
    if "weight" in raw:
        return Step(weight=_int(raw["weight"], f"{where}.weight", 1, 100))
    pause = raw["pause"] or {}
    duration = pause.get("duration") if isinstance(pause, Mapping) else None
    if duration is None:
        return Step(pause=True)
    return Step(pause=True, duration=_duration(duration, f"{where}.pause.duration", MAX_PAUSE))


def _int(value: Any, where: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: an integer of at least {low}, not {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{where}: at most {high}, not {value!r}")
    return value


def _decimal(value: Any, where: str) -> Decimal:
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f'{where}: a decimal such as "0.01", not {value!r}') from None
    if not out.is_finite() or out < 0:
        raise ValueError(f"{where}: a decimal of at least 0, not {value!r}")
    return out


# The longest analysis interval and the longest pause (a longer one is a typo, and one past
# what a timedelta holds would crash the reconcile).
MAX_INTERVAL = timedelta(hours=24)
MAX_PAUSE = timedelta(days=30)


def _duration(value: Any, where: str, most: timedelta) -> timedelta:
    try:
        seconds = duration_seconds(str(value))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if seconds > most.total_seconds():
        raise ValueError(f"{where}: at most {_hours(most)}, not {value!r}")
    return timedelta(seconds=seconds)


def _hours(span: timedelta) -> str:
    return f"{int(span.total_seconds()) // 3600}h"


def _interval(value: Any, where: str, default: timedelta) -> timedelta:
    if value is None:
        return default
    interval = _duration(value, where, MAX_INTERVAL)
    if interval < timedelta(seconds=1):
        raise ValueError(f"{where}: at least 1s, not {value!r}")
    return interval


# What a person or the rollout sets on a candidate without changing what is served.
_NOT_HASHED = frozenset({"weight", "mirrorPercent"})


def candidate_spec_hash(candidate: Mapping[str, Any]) -> str:
    """The hash of a candidate's entry under spec.traffic.candidates, weight and mirror
    aside: a rolled-back rollout starts over only when it changes."""
    kept = {k: v for k, v in candidate.items() if k not in _NOT_HASHED}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RolloutEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RolloutDecision:
    """What the reconciler applies: status.rollout, the candidate's desired weight (the
    stable gets 100 minus it), the Events to post, and in how many seconds to call `advance`
    again at the latest (None: only a change of the model or its candidate moves it on)."""

    status: dict[str, Any]
    weight: int
    events: tuple[RolloutEvent, ...] = ()
    requeue_after: float | None = None


@dataclass(frozen=True)
class _State:
    """status.rollout, parsed."""

    candidate: str
    spec_hash: str
    phase: Phase
    step: int
    since: datetime
    failures: int = 0
    last: dict[str, Any] | None = None
    message: str = ""
    # The resume annotation's value when this rollout started (left over from another, never
    # honoured); dropped once the annotation changes.
    stale_resume: str | None = None

    @property
    def last_time(self) -> datetime | None:
        return _parse_time(self.last["time"]) if self.last else None

    @property
    def last_result(self) -> str | None:
        return str(self.last["result"]) if self.last else None

    def status(self, weight: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "candidate": self.candidate,
            "phase": self.phase,
            "step": self.step,
            "since": self.since.strftime(TIME_FORMAT),
            "weight": weight,
            "candidateSpecHash": self.spec_hash,
            "consecutiveFailures": self.failures,
            "message": self.message,
        }
        if self.last is not None:
            out["lastAnalysis"] = self.last
        if self.stale_resume is not None:
            out["staleResume"] = self.stale_resume
        return out


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def _seconds(now: datetime) -> datetime:
    """`now` as status keeps it (whole seconds, UTC): a resumed rollout reads the same."""
    return now.astimezone(UTC).replace(microsecond=0)


def _load(prev: Mapping[str, Any] | None) -> _State | None:
    if not prev:
        return None
    try:
        phase = prev["phase"]
        if phase not in PHASES:
            return None
        state = _State(
            candidate=str(prev["candidate"]),
            spec_hash=str(prev["candidateSpecHash"]),
            phase=phase,
            step=max(0, int(prev["step"])),
            since=_parse_time(prev["since"]),
            failures=max(0, int(prev.get("consecutiveFailures", 0))),
            last=dict(prev["lastAnalysis"]) if prev.get("lastAnalysis") else None,
            message=str(prev.get("message", "")),
            stale_resume=str(prev["staleResume"]) if prev.get("staleResume") else None,
        )
        _ = state.last_time  # a lastAnalysis without a readable time is not ours either
        return state
    except (KeyError, TypeError, ValueError):
        return None  # not a status this operator wrote: the rollout starts over


def _clamped(state: _State | None, now: datetime) -> _State | None:
    """Times in status that lie ahead of now (written by an operator whose clock ran fast)
    taken as now: a step never waits on another clock's future."""
    if state is None:
        return None
    if state.since > now:
        state = replace(state, since=now)
    last = state.last_time
    if state.last is not None and last is not None and last > now:
        state = replace(state, last={**state.last, "time": now.strftime(TIME_FORMAT)})
    return state


Analyse = Callable[[], Awaitable[Analysis]]


async def advance(
    spec: RolloutSpec,
    prev: Mapping[str, Any] | None,
    *,
    candidate: str,
    candidate_ready: bool,
    candidate_spec_hash: str,
    now: datetime,
    analyse: Analyse,
    resume: str | None = None,
) -> RolloutDecision:
    """One step of the rollout of version `candidate`. `prev`: the previous status.rollout
    (None at first); `candidate_ready`: the candidate has a ready replica; `resume`: the
    model's kubeonnx.io/rollout-resume annotation, if any; `analyse`: measures and judges
    the window ending now (called only when an analysis is due)."""
    now = _seconds(now)
    state = _clamped(_load(prev), now)
    if (
        state is None
        or state.candidate != candidate
        or state.spec_hash != candidate_spec_hash
        or state.phase == "Succeeded"
    ):
        why = (
            "the candidate's spec changed"
            if state is not None and state.candidate == candidate
            else f"version {candidate} is a candidate"
        )
        state = _State(
            candidate, candidate_spec_hash, "Progressing", 0, now, stale_resume=resume or None
        )
        before_phase = None  # a new rollout: its first phase is news
    else:
        why, before_phase = "", state.phase
    if state.stale_resume is not None and resume != state.stale_resume:
        state = replace(state, stale_resume=None)  # the annotation changed: no longer stale
    before_result = state.last_result if before_phase is not None else None
    if state.phase != "RolledBack":
        state = await _run(spec, state, candidate_ready, now, analyse, resume)
    weight = 0 if state.phase == "RolledBack" else spec.weight_at(state.step)
    events: tuple[RolloutEvent, ...] = ()
    if state.phase != before_phase:
        kind: Literal["Normal", "Warning"] = "Normal"
        if state.phase == "RolledBack" or (
            state.phase == "Holding" and state.last_result == "Unavailable"
        ):
            kind = "Warning"
        message = f"{why}, the rollout starts: {state.message}" if why else state.message
        events = (RolloutEvent(kind, f"Rollout{state.phase}", message),)
    elif state.last_result == "Unavailable" and before_result != "Unavailable":
        # Prometheus became unreadable without a change of phase (Holding on too little
        # traffic, or Paused): a Warning all the same, once per change.
        assert state.last is not None
        events = (
            RolloutEvent("Warning", "RolloutAnalysisUnavailable", str(state.last["message"])),
        )
    return RolloutDecision(
        state.status(weight), weight, events, _requeue(spec, state, candidate_ready, now)
    )


async def _run(
    spec: RolloutSpec,
    state: _State,
    ready: bool,
    now: datetime,
    analyse: Analyse,
    resume: str | None,
) -> _State:
    state = replace(state, step=min(state.step, len(spec.steps)))
    if not ready:
        return replace(
            state,
            phase="Holding",
            message=f"version {state.candidate} has no ready replica: the rollout waits at "
            f"step {state.step}",
        )
    if _analysis_due(spec, state, now):
        result = await analyse()
        failures = {"Passed": 0, "Failed": state.failures + 1}.get(result.result, state.failures)
        state = replace(state, failures=failures, last=analysis_status(result, now))
        if result.result == "Failed" and failures >= spec.analysis.failure_limit:
            return replace(
                state,
                phase="RolledBack",
                message=f"{failures} failed analyses in a row (failureLimit "
                f"{spec.analysis.failure_limit}): version {state.candidate} gets no traffic "
                f"until its spec changes. Last: {result.message}",
            )
    # Steps that are done, one after the other (a pause of no duration ends at once).
    while state.step < len(spec.steps) and _step_done(spec, state, now, resume):
        state = replace(state, step=state.step + 1, since=now)
    return _describe(spec, state, now)


def _analysis_due(spec: RolloutSpec, state: _State, now: datetime) -> bool:
    """An analysis is due every interval while the candidate has a weight; its window never
    reaches back before the step began."""
    if spec.weight_at(state.step) == 0:
        return False
    start = max(state.since, state.last_time or state.since)
    return now >= start + spec.analysis.interval


def _passed_in_step(spec: RolloutSpec, state: _State) -> bool:
    """The last analysis passed, over a window wholly inside the current step."""
    last = state.last_time
    return (
        state.last_result == "Passed"
        and last is not None
        and last >= state.since + spec.analysis.interval
    )


def _step_done(spec: RolloutSpec, state: _State, now: datetime, resume: str | None) -> bool:
    step = spec.steps[state.step]
    if step.weight is not None:
        return _passed_in_step(spec, state)
    if step.duration is None:
        # A person said so, for this very step of this very rollout.
        return resume == resume_value(state.candidate, state.step) and resume != state.stale_resume
    return state.failures == 0 and now >= state.since + step.duration


def resume_value(candidate: str, step: int) -> str:
    """The resume annotation's value that ends the open-ended pause at `step`."""
    return f"{candidate}/{step}"


def _describe(spec: RolloutSpec, state: _State, now: datetime) -> _State:
    """Phase and message, from the state alone."""
    n, c = len(spec.steps), state.candidate
    if state.step >= n:
        if spec.auto_promote:
            return replace(
                state,
                phase="Promoted",
                message=f"every step passed: version {c} takes 100% of the traffic; move it "
                "into spec.model (and out of spec.traffic.candidates) to finish, the operator "
                "never writes spec",
            )
        return replace(
            state,
            phase="Paused",
            message=f"every step passed: version {c} serves {spec.weight_at(n)}%; to promote "
            "it, move it into spec.model (and out of spec.traffic.candidates), the operator "
            "never writes spec",
        )
    step = spec.steps[state.step]
    weight = spec.weight_at(state.step)
    at = f"step {state.step} of {n}"
    if step.weight is not None:
        last = state.last_time
        if state.last_result in HOLDS and last is not None and last > state.since:
            assert state.last is not None
            return replace(state, phase="Holding", message=f"{at}: {state.last['message']}")
        if state.failures:
            assert state.last is not None
            return replace(
                state,
                phase="Progressing",
                message=f"{at}, weight {weight}: analysis failed ({state.failures} of "
                f"failureLimit {spec.analysis.failure_limit}): {state.last['message']}",
            )
        due = max(state.since, state.last_time or state.since) + spec.analysis.interval
        return replace(
            state,
            phase="Progressing",
            message=f"{at}, weight {weight}: next analysis at {due.strftime(TIME_FORMAT)}",
        )
    if step.duration is None:
        return replace(
            state,
            phase="Paused",
            message=f"{at}, weight {weight}: paused until a person resumes it (annotate the "
            f"model {RESUME_ANNOTATION}={resume_value(c, state.step)})",
        )
    until = state.since + step.duration
    return replace(
        state,
        phase="Progressing",
        message=f"{at}, weight {weight}: paused until {until.strftime(TIME_FORMAT)}"
        + (" and a passing analysis" if state.failures else ""),
    )


def _requeue(spec: RolloutSpec, state: _State, ready: bool, now: datetime) -> float | None:
    """Seconds until time alone can change the rollout: the next analysis or a pause's end."""
    if state.phase in ("RolledBack", "Succeeded") or not ready:
        return None
    times = []
    if spec.weight_at(state.step) > 0:
        times.append(max(state.since, state.last_time or state.since) + spec.analysis.interval)
    if state.step < len(spec.steps) and spec.steps[state.step].duration is not None:
        times.append(state.since + spec.steps[state.step].duration)  # type: ignore[operator]
    if not times:
        return None
    return max(0.0, (min(times) - now).total_seconds())


def conclude(prev: Mapping[str, Any] | None, stable_version: str) -> RolloutDecision | None:
    """status.rollout once the model has no candidate: Succeeded when the rollout's candidate
    is now spec.model's version (a person promoted it); None (no rollout) when it was
    abandoned or there was none."""
    state = _load(prev)
    if state is None or state.candidate != stable_version:
        return None
    if state.phase == "Succeeded":
        return RolloutDecision(state.status(0), 0)
    done = replace(
        state,
        phase="Succeeded",
        message=f"version {stable_version} is spec.model's: the rollout is complete",
    )
    event = RolloutEvent("Normal", "RolloutSucceeded", done.message)
    return RolloutDecision(done.status(0), 0, (event,))
