"""A rollout's analysis: the candidate version's and the stable version's request count,
5xx error rate and p95 latency over the same window, read from Prometheus (the operator's
`prometheusAddress`), and the verdict on them.

The runtime labels its series with the model's name (`model`) and version (`version`); the
PodMonitor adds the pod's `namespace`. Only 5xx answers are failures: a 429 (over quota) or
any other 4xx is the client's doing and counts as a request, not as an error.

The verdict never passes on no data: too few candidate requests in the window is
InsufficientTraffic, and a Prometheus that cannot be read is Unavailable; the rollout holds
on both (it neither advances nor counts a failure)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

import httpx2

Result = Literal["Passed", "Failed", "InsufficientTraffic", "Unavailable"]
QUERY_TIMEOUT_S = 10.0
# All of one analysis's queries (a Prometheus trickling its answers byte by byte never trips
# the per-read timeout).
ANALYSIS_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Thresholds:
    """spec.traffic.rollout.analysis."""

    interval: timedelta = timedelta(minutes=1)
    min_requests: int = 50
    max_error_rate: Decimal = Decimal("0.01")
    max_latency_ratio: Decimal = Decimal("1.5")
    failure_limit: int = 2


@dataclass(frozen=True)
class Measurement:
    """One version's numbers over the window; None where Prometheus has no sample (no series
    at all, or no request to compute a rate or a quantile of)."""

    requests: float | None
    errors: float | None
    p95: float | None

    @property
    def error_rate(self) -> float | None:
        if not self.requests:
            return None
        return (self.errors or 0.0) / self.requests

    def as_status(self) -> dict[str, object]:
        """As status.rollout.lastAnalysis writes it: decimals as strings (as the spec's)."""
        out: dict[str, object] = {"requests": round(self.requests or 0)}
        if self.error_rate is not None:
            out["errorRate"] = f"{self.error_rate:.4f}"
        if self.p95 is not None:
            out["p95"] = f"{self.p95:.4f}"
        return out


@dataclass(frozen=True)
class Analysis:
    """One analysis: its verdict, why, and what was measured (None where nothing could be)."""

    result: Result
    message: str
    candidate: Measurement | None = None
    stable: Measurement | None = None


def selector(namespace: str, model: str, version: str) -> str:
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return f"namespace={quote(namespace)},model={quote(model)},version={quote(version)}"


def window(interval: timedelta) -> str:
    """A PromQL range of `interval` (whole seconds, at least one)."""
    return f"{max(1, int(interval.total_seconds()))}s"


def queries(namespace: str, model: str, version: str, interval: timedelta) -> dict[str, str]:
    """The PromQL of one version's numbers over the `interval` ending now."""
    sel, w = selector(namespace, model, version), window(interval)
    return {
        "requests": f"sum(increase(kubeonnx_requests_total{{{sel}}}[{w}]))",
        # The runtime's 5xx, and the 502/504 the router answers itself (no runtime saw them).
        "errors": f'(sum(increase(kubeonnx_requests_total{{{sel},code=~"5.."}}[{w}])) '
        "or vector(0)) + "
        f'(sum(increase(kubeonnx_router_requests_total{{{sel},code=~"502|504"}}[{w}])) '
        "or vector(0))",
        "p95": "histogram_quantile(0.95, sum by (le) "
        f"(rate(kubeonnx_request_duration_seconds_bucket{{{sel}}}[{w}])))",
    }


class PrometheusUnavailable(Exception):
    """Prometheus could not be asked, or refused the query: the message says which."""


Query = Callable[[str], Awaitable[float | None]]


def prometheus_query(address: str, client: httpx2.AsyncClient) -> Query:
    """An instant query's single value at Prometheus `address`: None when the vector is
    empty or its value is not a number (NaN: a quantile of no observation)."""
    url = address.rstrip("/") + "/api/v1/query"

    async def query(expr: str) -> float | None:
        try:
            answer = await client.get(url, params={"query": expr}, timeout=QUERY_TIMEOUT_S)
        except httpx2.HTTPError as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {address} cannot be reached: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            body = answer.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if answer.status_code != 200 or body.get("status") != "success":
            why = body.get("error") or answer.text[:200]
            raise PrometheusUnavailable(
                f"Prometheus at {address} answered {answer.status_code} to {expr}: {why}"
            )
        return _value(body, f"Prometheus at {address} answered {expr} with")

    return query


def _value(body: dict[str, object], what: str) -> float | None:
    """An instant vector's single value: None when the vector is empty or NaN (a quantile of
    no observation); +Inf as is (the judge takes a p95 of +Inf as the worst).
    PrometheusUnavailable naming what was wrong for anything that is not such an answer."""
    data = body.get("data")
    result = data.get("result") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("resultType") != "vector"
        or not isinstance(result, list)
    ):
        raise PrometheusUnavailable(f"{what} no instant vector: {str(body)[:200]}")
    if not result:
        return None
    try:
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise PrometheusUnavailable(f"{what} no readable number: {str(body)[:200]}") from None
    return None if math.isnan(value) else value


async def measure(
    query: Query, namespace: str, model: str, version: str, interval: timedelta
) -> Measurement:
    q = queries(namespace, model, version, interval)
    requests, errors = await query(q["requests"]), await query(q["errors"])
    for name, count in (("requests", requests), ("errors", errors)):
        if count is not None and (math.isinf(count) or count < 0):
            raise PrometheusUnavailable(f"Prometheus answered {count} {name} of version {version}")
    return Measurement(requests, errors, await query(q["p95"]))


def judge(candidate: Measurement, stable: Measurement, t: Thresholds) -> Analysis:
    """The verdict on the candidate's numbers against the thresholds and the stable's p95."""
    requests = candidate.requests or 0.0
    if candidate.requests is None:
        return Analysis(
            "InsufficientTraffic",
            "Prometheus has no request series of the candidate in the window "
            "(is it scraped? has it served a request?); the step holds",
            candidate,
            stable,
        )
    if requests < t.min_requests:
        return Analysis(
            "InsufficientTraffic",
            f"the candidate served {requests:.0f} requests in the last {window(t.interval)}, "
            f"fewer than minRequests {t.min_requests}; the step holds",
            candidate,
            stable,
        )
    failures = []
    rate = candidate.error_rate or 0.0
    if rate > float(t.max_error_rate):
        failures.append(f"5xx error rate {rate:.4f} > maxErrorRate {t.max_error_rate}")
    latency = "latency not compared"
    if candidate.p95 is not None and math.isinf(candidate.p95):
        # Every request over the histogram's largest bucket: the worst latency there is.
        failures.append("p95 latency +Inf (over the largest histogram bucket)")
        latency = "p95 +Inf"
    elif candidate.p95 is None:
        latency = "latency not compared: Prometheus has no p95 of the candidate in the window"
    elif stable.p95 and (stable.requests or 0) >= t.min_requests:
        ratio = candidate.p95 / stable.p95
        if ratio > float(t.max_latency_ratio):
            failures.append(
                f"p95 latency {candidate.p95:.4f}s is {ratio:.2f}x the stable's "
                f"{stable.p95:.4f}s > maxLatencyRatio {t.max_latency_ratio}"
            )
        latency = f"p95 ratio {ratio:.2f}"
    else:
        # At a weight of 100 (or nearly), the stable serves too little to compare with: the
        # error rate alone decides, and the message says so.
        latency = (
            f"latency not compared: the stable served {stable.requests or 0:.0f} requests "
            f"(fewer than minRequests {t.min_requests})"
        )
    if failures:
        return Analysis(
            "Failed", f"{'; '.join(failures)} over {requests:.0f} requests", candidate, stable
        )
    return Analysis(
        "Passed",
        f"{requests:.0f} requests, 5xx error rate {rate:.4f}, {latency}",
        candidate,
        stable,
    )


async def analyse(
    query: Query,
    namespace: str,
    model: str,
    stable_version: str,
    candidate_version: str,
    thresholds: Thresholds,
    deadline_s: float = ANALYSIS_TIMEOUT_S,
) -> Analysis:
    """Measure both versions over the same window (ending now) and judge; Unavailable (never
    Passed, never Failed) when Prometheus cannot be read, answers what is not an instant
    vector of numbers, or has not answered every query within `deadline_s` seconds."""

    async def both() -> tuple[Measurement, Measurement]:
        interval = thresholds.interval
        candidate = await measure(query, namespace, model, candidate_version, interval)
        return candidate, await measure(query, namespace, model, stable_version, interval)

    try:
        candidate, stable = await asyncio.wait_for(both(), deadline_s)
    except PrometheusUnavailable as exc:
        return Analysis("Unavailable", f"{exc}; the rollout holds")
    except TimeoutError:
        return Analysis(
            "Unavailable",
            f"Prometheus did not answer the analysis's queries within {deadline_s:g}s; "
            "the rollout holds",
        )
    return judge(candidate, stable, thresholds)


def analyser(
    address: str,
    client: httpx2.AsyncClient,
    namespace: str,
    model: str,
    stable_version: str,
    candidate_version: str,
    thresholds: Thresholds,
) -> Callable[[], Awaitable[Analysis]]:
    """What `rollout.advance` calls when an analysis is due, bound to one model."""
    query = prometheus_query(address, client)

    async def run() -> Analysis:
        return await analyse(query, namespace, model, stable_version, candidate_version, thresholds)

    return run


def analysis_status(analysis: Analysis, now: datetime) -> dict[str, object]:
    """status.rollout.lastAnalysis."""
    out: dict[str, object] = {
        "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "result": analysis.result,
        "message": analysis.message,
    }
    if analysis.candidate is not None:
        out["candidate"] = analysis.candidate.as_status()
    if analysis.stable is not None:
        out["stable"] = analysis.stable.as_status()
    return out
