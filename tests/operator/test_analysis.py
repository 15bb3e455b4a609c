"""The rollout analysis's verdict on measured numbers, and what it does when Prometheus cannot
be read. (The PromQL itself is evaluated by a real Prometheus over real runtimes in
e2e/test_rollout_analysis.py.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx2
from kubeonnx_operator.analysis import (
    Measurement,
    Thresholds,
    analyser,
    analysis_status,
    judge,
    queries,
    selector,
)

from e2e.cluster import free_port

T = Thresholds(timedelta(seconds=30), 50, Decimal("0.01"), Decimal("1.5"), 2)
STABLE = Measurement(requests=500, errors=0, p95=0.010)


def test_no_series_at_all_never_passes() -> None:
    a = judge(Measurement(None, None, None), STABLE, T)
    assert a.result == "InsufficientTraffic" and "no request series" in a.message


def test_fewer_than_min_requests_holds_whatever_the_numbers() -> None:
    a = judge(Measurement(49, 0, 0.001), STABLE, T)
    assert a.result == "InsufficientTraffic"
    assert "49 requests in the last 30s, fewer than minRequests 50" in a.message
    # Even all errors: too few to judge.
    assert judge(Measurement(10, 10, 1.0), STABLE, T).result == "InsufficientTraffic"


def test_the_error_rate_over_the_limit_fails() -> None:
    a = judge(Measurement(100, 2, 0.010), STABLE, T)
    assert a.result == "Failed"
    assert a.message == "5xx error rate 0.0200 > maxErrorRate 0.01 over 100 requests"
    assert judge(Measurement(100, 1, 0.010), STABLE, T).result == "Passed"  # 0.01 is allowed
    assert judge(Measurement(100, None, 0.010), STABLE, T).result == "Passed"  # no 5xx series


def test_the_latency_ratio_over_the_limit_fails() -> None:
    a = judge(Measurement(100, 0, 0.016), STABLE, T)
    assert a.result == "Failed" and "1.60x the stable's" in a.message
    assert judge(Measurement(100, 0, 0.015), STABLE, T).result == "Passed"
    both = judge(Measurement(100, 5, 0.05), STABLE, T)
    assert "5xx error rate" in both.message and "p95 latency" in both.message


def test_latency_is_not_compared_with_a_stable_that_served_too_little() -> None:
    a = judge(Measurement(100, 0, 0.5), Measurement(3, 0, 0.001), T)
    assert a.result == "Passed"
    assert "latency not compared: the stable served 3 requests" in a.message
    assert judge(Measurement(100, 0, 0.5), Measurement(None, None, None), T).result == "Passed"


def test_the_status_keeps_the_numbers_as_strings() -> None:
    a = judge(Measurement(100.4, 2, 0.0123), STABLE, T)
    now = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assert analysis_status(a, now) == {
        "time": "2026-01-05T10:00:00Z",
        "result": "Failed",
        "message": a.message,
        "candidate": {"requests": 100, "errorRate": "0.0199", "p95": "0.0123"},
        "stable": {"requests": 500, "errorRate": "0.0000", "p95": "0.0100"},
    }


def test_the_queries_select_one_version_of_one_model_in_its_namespace() -> None:
    q = queries("team-a", "mlp", "2", timedelta(minutes=1))
    sel = 'namespace="team-a",model="mlp",version="2"'
    assert q["requests"] == f"sum(increase(kubeonnx_requests_total{{{sel}}}[60s]))"
    assert q["errors"] == f'sum(increase(kubeonnx_requests_total{{{sel},code=~"5.."}}[60s]))'
    assert f"kubeonnx_request_duration_seconds_bucket{{{sel}}}[60s]" in q["p95"]
    assert selector("n", 'a"b', "1") == 'namespace="n",model="a\\"b",version="1"'


async def test_an_unreachable_prometheus_is_unavailable_never_passed_nor_failed() -> None:
    port = free_port()  # claimed for this test, and nothing listens on it
    async with httpx2.AsyncClient() as client:
        run = analyser(f"http://127.0.0.1:{port}", client, "ns", "mlp", "1", "2", T)
        a = await run()
    assert a.result == "Unavailable"
    assert f"Prometheus at http://127.0.0.1:{port} cannot be reached" in a.message
    assert a.candidate is None and a.stable is None
