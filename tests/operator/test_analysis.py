"""The rollout analysis's verdict on measured numbers, and what it does when Prometheus cannot
be read. (The PromQL itself is evaluated by a real Prometheus over real runtimes in
e2e/test_rollout_analysis.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx2
import pytest
from kubeonnx_operator.analysis import (
    Measurement,
    Thresholds,
    analyse,
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
    assert q["errors"] == (
        f'(sum(increase(kubeonnx_requests_total{{{sel},code=~"5.."}}[60s])) or vector(0)) + '
        f'(sum(increase(kubeonnx_router_requests_total{{{sel},code=~"502|504"}}[60s])) '
        "or vector(0))"
    )
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


def test_the_routers_own_502_and_504_count_as_the_candidates_errors() -> None:
    """A 502/504 the router answers itself (the runtime never saw the request) is counted
    only in kubeonnx_router_requests_total: the error query adds it."""

    async def query(expr: str) -> float | None:
        if "histogram_quantile" in expr:
            return 0.010
        if "kubeonnx_router_requests_total" in expr and 'version="2"' in expr:
            return 5.0  # 5 of the candidate's 100 requests answered 502 by the router
        return 0.0 if "code=~" in expr else 100.0

    a = asyncio.run(analyse(query, "ns", "m", "1", "2", T))
    assert a.result == "Failed" and "5xx error rate 0.0500" in a.message


MALFORMED = {
    "not a number": {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "abc"]}]},
    },
    "a JSON list": [1, 2],
    "no data": {"status": "success"},
    "a scalar": {"status": "success", "data": {"resultType": "scalar", "result": [1, "5"]}},
    "no value": {"status": "success", "data": {"resultType": "vector", "result": [{}]}},
    "a string body": "hello",
}


@pytest.fixture
def prometheus() -> Iterator[tuple[str, dict[str, object]]]:
    """A Prometheus answering 200 with whatever `answer["body"]` holds."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps(answer["body"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answer
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_a_malformed_answer_is_unavailable_never_an_exception(
    prometheus: tuple[str, dict[str, object]], kind: str
) -> None:
    address, answer = prometheus
    answer["body"] = MALFORMED[kind]
    async with httpx2.AsyncClient() as client:
        a = await analyser(address, client, "ns", "mlp", "1", "2", T)()
    assert a.result == "Unavailable", (kind, a.message)
    assert f"Prometheus at {address}" in a.message


async def test_a_prometheus_that_never_finishes_answering_is_unavailable() -> None:
    """A Prometheus trickling its answer never trips a per-read timeout: the analysis as a
    whole has a deadline."""
    never = asyncio.Event()

    async def query(expr: str) -> float | None:
        await never.wait()
        return None

    a = await analyse(query, "ns", "mlp", "1", "2", T, deadline_s=0.05)
    assert a.result == "Unavailable" and "did not answer" in a.message


def test_a_p95_of_inf_fails_the_latency_and_a_missing_one_says_so() -> None:
    a = judge(Measurement(100, 0, float("inf")), STABLE, T)
    assert a.result == "Failed" and "p95 latency +Inf" in a.message
    b = judge(Measurement(100, 0, None), STABLE, T)
    assert b.result == "Passed"
    assert "Prometheus has no p95 of the candidate" in b.message
