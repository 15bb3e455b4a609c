"""The request counters a rollout's analysis reads exist at 0 before the first request:
Prometheus's increase() counts nothing of a series' first sample, so a 5xx counter born at
the first 5xx would hide it from the analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def requests_by_code(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        s.labels["code"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "kubeonnx_requests"
        for s in family.samples
        if s.name == "kubeonnx_requests_total" and s.labels.get("model") == "mlp"
    }


def test_the_analysed_codes_are_counted_from_zero_before_any_request(
    serve: Any, models: dict[str, Path]
) -> None:
    served = serve("--model-uri", f"file://{models['mlp']}", "--model-name", "mlp")
    assert requests_by_code(served.url) == {"200": 0.0, "500": 0.0, "503": 0.0}
    request = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    answer = httpx.post(f"{served.url}/v2/models/mlp/infer", json=request, timeout=30)
    assert answer.status_code == 200
    wrong = httpx.post(f"{served.url}/v2/models/mlp/infer", json={"inputs": []}, timeout=30)
    assert wrong.status_code == 400
    assert requests_by_code(served.url) == {"200": 1.0, "500": 0.0, "503": 0.0, "400": 1.0}
