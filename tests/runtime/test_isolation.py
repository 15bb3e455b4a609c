"""No request sees another's data: batching is opt-in, only requests whose inputs agree on
their rows are merged, and a batch that fails is answered request by request.

Each test sends many concurrent requests with distinct values to the real server and checks
every answer against the model run on that request alone."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import onnx

BATCHING = ("--max-batch-size", "16", "--max-batch-delay-ms", "30")


def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:  # type: ignore[type-arg]
    with (
        httpx.Client(timeout=30) as http,
        concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool,
    ):
        return list(pool.map(lambda b: http.post(url, json=b), bodies))


def fp32(name: str, x: np.ndarray) -> dict:  # type: ignore[type-arg]
    return {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


def int64(name: str, x: np.ndarray) -> dict:  # type: ignore[type-arg]
    return {"name": name, "shape": list(x.shape), "datatype": "INT64", "data": x.ravel().tolist()}


def output(response: httpx.Response, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = next(o for o in response.json()["outputs"] if o["name"] == name)
    return np.array(out["data"]).reshape(out["shape"])


def test_a_row_dependent_model_is_not_batched_unless_asked(serve, models: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    """centered answers x - mean(x over rows): merged with a stranger's rows, it is wrong."""
    served = serve("--model-uri", f"file://{models['centered']}", "--model-name", "centered")
    rng = np.random.default_rng(7)
    for _ in range(3):
        xs = [rng.standard_normal((2, 4)).astype(np.float32) * 100 for _ in range(32)]
        responses = post_all(
            f"{served.url}/v2/models/centered/infer", [{"inputs": [fp32("input", x)]} for x in xs]
        )
        for x, r in zip(xs, responses, strict=True):
            np.testing.assert_allclose(output(r, "output"), x - x.mean(0), rtol=1e-4, atol=1e-3)


def rows_named_apart(model: Path, inputs: tuple[str, ...], to: Path) -> Path:
    """The model with the first dimension of `inputs` named apart from the others' `batch`:
    a model that does not say its inputs' rows agree (mixed says so, and a request whose
    inputs disagree on a dimension the model names alike is a 400 before any batching)."""
    proto = onnx.load(str(model))
    for value in proto.graph.input:
        if value.name in inputs:
            value.type.tensor_type.shape.dim[0].dim_param = "rows"
    onnx.save(proto, str(to))
    return to


def test_inputs_that_disagree_on_rows_never_share_a_batch(
    serve, models: dict[str, Path], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """features and ids are independent; a request giving them different row counts must not
    be merged (its rows would be cut at the wrong place and land in another's answer)."""
    apart = rows_named_apart(models["mixed"], ("ids", "mask"), tmp_path / "apart.onnx")
    served = serve("--model-uri", f"file://{apart}", "--model-name", "mixed", *BATCHING)
    bodies, own_ids = [], []
    for i in range(32):
        f_rows, i_rows = (2, 1) if i % 2 else (1, 2)
        ids = np.arange(i_rows * 2).reshape(i_rows, 2) + 1000 * i
        bodies.append(
            {
                "inputs": [
                    fp32("features", np.full((f_rows, 4), i, np.float32)),
                    int64("ids", ids),
                    {
                        "name": "mask",
                        "shape": [i_rows, 2],
                        "datatype": "BOOL",
                        "data": [True] * (2 * i_rows),
                    },
                    {
                        "name": "tag",
                        "shape": [f_rows, 1],
                        "datatype": "BYTES",
                        "data": ["t"] * f_rows,
                    },
                ]
            }
        )
        own_ids.append(ids)
    for _ in range(3):
        responses = post_all(f"{served.url}/v2/models/mixed/infer", bodies)
        for i, (ids, r) in enumerate(zip(own_ids, responses, strict=True)):
            np.testing.assert_array_equal(
                output(r, "ids_plus_one"), ids + 1, err_msg=f"request {i}"
            )
            np.testing.assert_allclose(output(r, "score"), np.full((1 + i % 2, 1), 4.0 * i))


def test_a_poisoned_batch_fails_only_the_guilty_request(serve, models: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    """An id outside the lookup table fails the model run; the requests batched with it
    still get their answers, and the guilty one gets a 400 that names the problem."""
    served = serve("--model-uri", f"file://{models['lookup']}", "--model-name", "lookup", *BATCHING)
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    ids = [np.array([[i % 10, (i + 3) % 10]]) for i in range(16)]
    guilty = {5, 11}
    for g in guilty:
        ids[g] = np.array([[1, 99]])
    responses = post_all(
        f"{served.url}/v2/models/lookup/infer", [{"inputs": [int64("ids", x)]} for x in ids]
    )
    for i, (x, r) in enumerate(zip(ids, responses, strict=True)):
        if i in guilty:
            assert r.status_code == 400, r.text
            message = r.json()["error"]
            assert "Gather" in message and "99" in message, message
            assert ".cc" not in message and "onnxruntime_src" not in message, message
        else:
            np.testing.assert_array_equal(output(r, "output"), table[x])
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'kubeonnx_requests_total{code="500",model="lookup",version="1"} 0.0' in metrics
