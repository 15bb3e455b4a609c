"""A server fault answers 500 with only 'internal error' and the request id; the detail
goes to the log, once."""

from __future__ import annotations

import logging

import httpx
import numpy as np
import pytest
from kubeonnx_runtime.app import create_app
from kubeonnx_runtime.batching import Batcher
from kubeonnx_runtime.dataplane import DataPlane
from kubeonnx_runtime.datatypes import TensorSpec
from kubeonnx_runtime.metrics import RuntimeMetrics
from prometheus_client import CollectorRegistry

SECRET = "/opt/onnxruntime_src/core/session.cc:42 password=hunter2"


class BrokenModel:
    inputs = [TensorSpec("x", "FP32", (-1, 2))]
    outputs = [TensorSpec("y", "FP32", (-1, 2))]
    output_names = ["y"]
    device = "cpu"

    def check_outputs(self, names: list[str]) -> None:
        pass

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError(SECRET)


async def test_a_server_fault_tells_the_client_nothing_but_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = BrokenModel()
    batcher = Batcher(model.run, max_batch_size=1, max_delay_s=0, max_queue=4, batchable=True)
    dataplane = DataPlane(model, batcher, name="m", version="1")
    app = create_app(dataplane, RuntimeMetrics(CollectorRegistry()))
    batcher.start()
    body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            with caplog.at_level(logging.ERROR):
                r = await client.post(
                    "/v2/models/m/infer", json=body, headers={"X-Request-Id": "req-7"}
                )
    finally:
        await batcher.stop()
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (request req-7)"}
    logged = [rec for rec in caplog.records if rec.exc_info and SECRET in str(rec.exc_info[1])]
    assert len(logged) == 1
