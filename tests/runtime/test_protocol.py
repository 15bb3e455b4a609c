"""The Open Inference Protocol over the real server process, with tritonclient unchanged."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kubeonnx_runtime.server import stop_budget
from tritonclient.utils import InferenceServerException

from tests.runtime.conftest import Served
from tests.runtime.model_runs import (
    hooked_env,
    metric,
    release,
    row_digest,
    runs,
    wait_for,
    wait_held,
)


def client(served: Served) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(served.url.removeprefix("http://"), concurrency=4)


def reference(models, x: np.ndarray, model: str = "mlp") -> np.ndarray:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    session = ort.InferenceSession(str(models[model]), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def batch_runs(served: Served) -> float:
    metrics = httpx.get(f"{served.url}/metrics").text
    return next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("kubeonnx_batch_size_count")
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_round_trip_matches_onnxruntime(
    mlp_server: Served, models, binary: bool
) -> None:
    c = client(mlp_server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mlp")
    meta = c.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("output", binary_data=binary)
    result = c.infer("mlp", [inp], outputs=[out], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("output"), reference(models, x), rtol=1e-5)
    assert result.get_response()["id"] == "r-1"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_mixed_types_including_int64_bool_and_bytes(mixed_server: Served, binary: bool) -> None:
    c = client(mixed_server)
    feats = np.arange(8, dtype=np.float32).reshape(2, 4)
    ids = np.array([[1, 2], [3, 2**40]], dtype=np.int64)
    mask = np.array([[True, False], [False, False]])
    tag = np.array([[b"alpha"], ["βeta".encode()]], dtype=np.object_)
    inputs = []
    for name, arr, dt in [
        ("features", feats, "FP32"),
        ("ids", ids, "INT64"),
        ("mask", mask, "BOOL"),
        ("tag", tag, "BYTES"),
    ]:
        i = triton.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    outs = [
        triton.InferRequestedOutput(n, binary_data=binary)
        for n in ("score", "ids_plus_one", "mask_not", "tag_out")
    ]
    r = c.infer("mixed", inputs, outputs=outs)
    np.testing.assert_allclose(r.as_numpy("score"), feats.sum(1, keepdims=True))
    np.testing.assert_array_equal(r.as_numpy("ids_plus_one"), ids + 1)
    np.testing.assert_array_equal(r.as_numpy("mask_not"), ~mask)
    assert [x.decode() if isinstance(x, bytes) else x for x in r.as_numpy("tag_out").ravel()] == [
        "alpha",
        "βeta",
    ]


def test_requested_outputs_only(mixed_server: Served) -> None:
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
            {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]},
            {"name": "tag", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]},
        ],
        "outputs": [{"name": "score"}],
    }
    r = httpx.post(f"{mixed_server.url}/v2/models/mixed/infer", json=body)
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == ["score"]
    assert r.json()["outputs"][0]["data"] == [10.0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "inputs": [
                    {"name": "nope", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ]
            },
            "unknown input 'nope'",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}
                ]
            },
            "has shape [1, 5]",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}
                ]
            },
            "the model takes FP32",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
            "3 elements of data for a shape of 4",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                ],
                "outputs": [{"name": "nope"}],
            },
            "unknown output 'nope'",
        ),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        (
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP99", "data": [1]}]},
            "unknown datatype 'FP99'",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_problem(mlp_server: Served, body, message: str) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{mlp_server.url}/v2/models/mlp/infer", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_malformed_json_and_binary_framing_get_400(mlp_server: Served) -> None:
    url = f"{mlp_server.url}/v2/models/mlp/infer"
    r = httpx.post(url, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    header = (
        b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":16}}]}'
    )
    r = httpx.post(
        url,
        content=header + b"\0" * 8,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400 and "runs past the end of the body" in r.json()["error"]
    r = httpx.post(url, content=header, headers={"Inference-Header-Content-Length": "9999"})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]


def test_unknown_model_or_version_is_404(mlp_server: Served) -> None:
    assert httpx.get(f"{mlp_server.url}/v2/models/other").status_code == 404
    assert httpx.get(f"{mlp_server.url}/v2/models/mlp/versions/7").status_code == 404
    assert httpx.get(f"{mlp_server.url}/v2/models/mlp/versions/1").status_code == 200
    r = httpx.post(f"{mlp_server.url}/v2/models/other/infer", json={"inputs": []})
    assert r.status_code == 404 and "other" in r.json()["error"]


def test_server_metadata_metrics_and_docs(mlp_server: Served) -> None:
    meta = httpx.get(f"{mlp_server.url}/v2").json()
    assert meta["name"] == "kubeonnx" and "binary_tensor_data" in meta["extensions"]
    metrics = httpx.get(f"{mlp_server.url}/metrics").text
    for name in (
        "kubeonnx_requests_total",
        "kubeonnx_request_duration_seconds_bucket",
        "kubeonnx_batch_size_bucket",
        "kubeonnx_queue_depth",
        "kubeonnx_inflight_requests",
        "kubeonnx_model_load_seconds",
    ):
        assert name in metrics
    assert httpx.get(f"{mlp_server.url}/docs").status_code == 200
    assert "/v2/models/{name}/infer" in httpx.get(f"{mlp_server.url}/openapi.json").text


# mlp: a tiny model, run on the event loop. convnet: four-dimensional inputs, merged along
# their first dimension like any other; its runs (a millisecond a row) take the inference
# thread.
@pytest.mark.parametrize(
    ("model", "row", "requests"), [("mlp", (4,), 64), ("convnet", (3, 32, 32), 24)]
)
def test_batched_answers_equal_unbatched_under_concurrency(  # type: ignore[no-untyped-def]
    serve, models, tmp_path: Path, model: str, row: tuple[int, ...], requests: int
) -> None:
    """The first request's model run is held until every other request waits in the queue,
    so merging must happen; the model's own run log (written by a wrapper in the server
    process) says what ran together."""
    hooks = tmp_path / "hooks"
    served = serve(
        "--model-uri",
        f"file://{models[model]}",
        "--model-name",
        model,
        "--max-batch-size",
        "16",
        "--max-batch-delay-ms",
        "20",
        env=hooked_env(hooks, hold_run=0),
    )
    rng = np.random.default_rng(42)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 4)), *row)).astype(np.float32)
        for _ in range(requests)
    ]
    expected = [reference(models, x, model) for x in inputs]

    def call(x: np.ndarray) -> np.ndarray:
        i = triton.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        # The first waits for all the others to arrive, however loaded the machine is.
        held = triton.InferenceServerClient(
            served.url.removeprefix("http://"), connection_timeout=300, network_timeout=300
        )
        return held.infer(model, [i]).as_numpy("output")

    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        first = pool.submit(call, inputs[0])
        wait_held(hooks, served)
        rest = [pool.submit(call, x) for x in inputs[1:]]
        wait_for(
            lambda: metric(served, "kubeonnx_queue_depth") == requests - 1,
            "every other request queued behind the held run",
        )
        release(hooks)
        got = [first.result(60), *(f.result(60) for f in rest)]
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)

    ran = runs(hooks)
    assert [r.number for r in ran] == list(range(len(ran)))
    assert ran[0].rows == [row_digest(r) for r in inputs[0]]  # the held run: the first alone
    # Every row ran exactly once.
    digests = [row_digest(r) for x in inputs for r in x]
    assert sorted(d for r in ran for d in r.rows) == sorted(digests)
    # Once released, the batcher took full batches from the queue: with requests of at most
    # 3 rows, every run but the last has at least 14 of its 16 rows.
    queued_rows = sum(len(x) for x in inputs[1:])
    assert len(ran) - 1 <= -(-queued_rows // 14), [len(r.rows) for r in ran]
    assert all(len(r.rows) >= 14 for r in ran[1:-1]), [len(r.rows) for r in ran]
    # The server's own count agrees with the model's log.
    assert batch_runs(served) == len(ran)


def test_fixed_batch_model_runs_request_by_request(serve, models) -> None:  # type: ignore[no-untyped-def]
    served = serve("--model-uri", f"file://{models['fixed']}", "--model-name", "fixed")
    c = client(served)
    assert c.get_model_metadata("fixed")["inputs"][0]["shape"] == [2, 4]
    x = np.ones((2, 4), dtype=np.float32)
    i = triton.InferInput("input", [2, 4], "FP32")
    i.set_data_from_numpy(x)
    assert c.infer("fixed", [i]).as_numpy("output").shape == (2, 3)
    with pytest.raises(InferenceServerException, match="has shape"):
        j = triton.InferInput("input", [3, 4], "FP32")
        j.set_data_from_numpy(np.ones((3, 4), dtype=np.float32))
        c.infer("fixed", [j])


def test_full_queue_answers_503_with_retry_after(serve, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A held model run makes the overlap certain: one request in the held run, one in the
    queue of 1, and the next is refused at once; both taken are answered once released."""
    hooks = tmp_path / "hooks"
    served = serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "m",
        "--max-queue",
        "1",
        "--max-batch-size",
        "1",
        env=hooked_env(hooks, hold_run=0),
    )
    url = f"{served.url}/v2/models/m/infer"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, url, json=mlp_body(1.0), timeout=120)
        wait_held(hooks, served)
        queued = pool.submit(httpx.post, url, json=mlp_body(2.0), timeout=120)
        wait_for(lambda: metric(served, "kubeonnx_queue_depth") == 1, "one request queued")
        refused = httpx.post(url, json=mlp_body(3.0), timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["error"]
        assert not running.done() and not queued.done()
        release(hooks)
        assert [f.result(60).status_code for f in (running, queued)] == [200, 200]


def test_every_answer_carries_a_request_id(mlp_server: Served) -> None:
    url = f"{mlp_server.url}/v2/models/mlp/infer"
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    mine = httpx.post(url, json=body, headers={"X-Request-Id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    ids = {httpx.post(url, json=body).headers["x-request-id"] for _ in range(3)}
    ids.add(httpx.get(f"{mlp_server.url}/v2/health/ready").headers["x-request-id"])
    assert len(ids) == 4


def test_route_prefix_serves_the_same_api(serve, models) -> None:  # type: ignore[no-untyped-def]
    served = serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        "--route-prefix",
        "/models/ns/mlp",
    )
    assert httpx.get(f"{served.url}/models/ns/mlp/v2/models/mlp").status_code == 200
    assert httpx.get(f"{served.url}/v2/models/mlp").status_code == 200


def mlp_body(value: float) -> dict:  # type: ignore[type-arg]
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]}


def test_sigterm_drains_then_finishes_requests_that_outlast_it(  # type: ignore[no-untyped-def]
    serve, models, tmp_path: Path
) -> None:
    """A model run is held across the whole drain: the requests in flight at SIGTERM outlast
    the drain and the listener's closing, one arrives mid-drain, and every one is answered
    before the process exits 0. A server that exits at once, or stops reading at SIGTERM,
    fails this."""
    hooks = tmp_path / "hooks"
    served = serve(
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        "--max-batch-size",
        "1",
        env={
            "KUBEONNX_DRAIN_SECONDS": "6",
            "KUBEONNX_GRACE_SECONDS": "19",
            **hooked_env(hooks, hold_run=0),
        },
    )
    # The stop budget of that grace period: 6 s not ready, then 6 s for the requests taken.
    drain_s, in_flight_s = stop_budget(19, 6)
    assert (drain_s, in_flight_s) == (6, 6)
    url = f"{served.url}/v2/models/mlp/infer"
    values = [1.0, 2.0, 3.0, 4.0]
    expected = [reference(models, np.full((1, 4), v, np.float32)) for v in values]

    def post(value: float) -> httpx.Response:
        return httpx.post(url, json=mlp_body(value), timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(post, values[0])]
        wait_held(hooks, served)
        in_flight += [pool.submit(post, v) for v in values[1:3]]
        wait_for(lambda: metric(served, "kubeonnx_queue_depth") == 2, "two requests queued")

        signalled = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: httpx.get(f"{served.url}/v2/health/ready").status_code == 503,
            "not ready after SIGTERM",
        )
        assert httpx.get(f"{served.url}/v2/health/live").status_code == 200
        late = pool.submit(post, values[3])  # arrives mid-drain: still served
        wait_for(lambda: metric(served, "kubeonnx_queue_depth") == 3, "the late request queued")

        def closed() -> bool:
            try:
                httpx.get(f"{served.url}/v2/health/live", timeout=5)
            except httpx.TimeoutException:  # a slow answer on a loaded machine: not closed
                return False
            except httpx.TransportError:  # refused, or accepted as the listener closed, and reset
                return True
            return False

        wait_for(closed, "the listener closed at the end of the drain")
        # Not ready for at least the configured drain: the server's timer starts after the
        # signal was sent, so on any machine the close is seen no sooner than this.
        assert time.monotonic() - signalled >= drain_s
        wait_for(
            lambda: "Waiting for connections to close" in served.logs(),
            "the server waiting for the requests in flight",
        )

        # The requests taken keep running (the process alive, none answered) until half of
        # their budget has passed: the server's deadline is at least drain + in flight after
        # the signal, and the other half is the margin for a late look on a loaded machine.
        # A deliberate window in which nothing may happen, watched, not slept through.
        def half_the_budget_passed() -> bool:
            assert served.proc.poll() is None, "the server exited within the in-flight budget"
            assert not any(f.done() for f in [*in_flight, late]), "a request was given up on"
            return time.monotonic() - signalled >= drain_s + in_flight_s / 2

        wait_for(half_the_budget_passed, "half the in-flight budget to pass")
        release(hooks)
        answers = [f.result(60) for f in [*in_flight, late]]
    for answer, want in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["outputs"][0]["data"], want.ravel(), rtol=1e-5)
    assert served.proc.wait(30) == 0
