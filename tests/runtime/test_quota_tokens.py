"""Token budgets (the quota unit `tokens`) with the generated text model (INT64 input_ids and
attention_mask, padded): counted from the input the policy names, exact across replicas
sharing a real Redis, refused with the 429 of the other units, checked against the model at
start-up, and a 400 naming the input when a request lacks it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.redis_server import LocalRedis
from tests.runtime.conftest import Served
from tests.runtime.test_async import async_env, start_gateway
from tests.runtime.test_quota_redis import not_near_midnight, write_policy

# One sequence of 5 positions, 3 of them tokens and 2 padding: 3 tokens counted `nonzero`,
# 5 counted `elements`.
IDS = [11, 12, 13, 0, 0]
MASK = [1, 1, 1, 0, 0]
NONZERO = {"input": "attention_mask", "count": "nonzero"}
ELEMENTS = {"input": "attention_mask", "count": "elements"}


def text_body(mask: list[int] | None = MASK, datatype: str = "INT64") -> dict[str, Any]:
    inputs: list[dict[str, Any]] = [
        {"name": "input_ids", "shape": [1, 5], "datatype": "INT64", "data": IDS}
    ]
    if mask is not None:
        inputs.append(
            {"name": "attention_mask", "shape": [1, 5], "datatype": datatype, "data": mask}
        )
    return {"inputs": inputs}


def in_memory(config: Path) -> Path:
    """The policy at `config` without Redis: each replica counts in its own memory."""
    policy = json.loads(config.read_text())
    del policy["redis"]
    config.write_text(json.dumps(policy))
    return config


def serve_text(serve, models, config: Path, *args: str, **kwargs) -> Served:  # type: ignore[no-untyped-def]
    return serve(
        "--model-uri",
        f"file://{models['text']}",
        "--model-name",
        "text",
        "--quota-config",
        str(config),
        *args,
        **kwargs,
    )


def infer(http: httpx.Client, served: Served, tenant: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(
        f"{served.url}/v2/models/text/infer", json=body, headers={"X-Api-Key": f"{tenant}-key"}
    )


def used(served: Served, tenant: str) -> dict[str, int]:
    answer = httpx.get(f"{served.url}/v2/quota", headers={"X-Api-Key": f"{tenant}-key"})
    assert answer.status_code == 200, answer.text
    return {f"{u['unit']}-{u['window']}": u["used"] for u in answer.json()["limits"]}


def test_two_replicas_sharing_redis_admit_exactly_the_token_budget(
    serve, models, redis_server: LocalRedis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    day = not_near_midnight(needs_s=300)
    tenants = {
        # 40 tokens at 3 a request: 13 requests (39 tokens), the 14th would make 42.
        "t": [
            {"unit": "tokens", "limit": 40, "window": "1d"},
            {"unit": "requests", "limit": 1000, "window": "1d"},
        ],
        # Requests are the tighter budget here: tokens are counted and shown all the same.
        "r": [
            {"unit": "requests", "limit": 4, "window": "1d"},
            {"unit": "tokens", "limit": 1000, "window": "1d"},
        ],
    }
    config = write_policy(
        tmp_path, redis_server.url, tenants, tokens=NONZERO, decisionBudgetMs=10000
    )
    replicas = [serve_text(serve, models, config) for _ in range(2)]
    sends = [("t", replicas[i % 2]) for i in range(40)] + [("r", replicas[i % 2]) for i in range(8)]
    with (
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32)) as http,
        concurrent.futures.ThreadPoolExecutor(32) as pool,
    ):
        results = list(pool.map(lambda s: (s[0], infer(http, s[1], s[0], text_body())), sends))
        # A request without the token input is a 400 naming it, and charged nothing.
        missing = infer(http, replicas[0], "t", text_body(mask=None))
    assert int(time.time() // 86400) == day, "the run outlasted its guard: raise needs_s"
    codes = Counter((t, r.status_code) for t, r in results)
    assert codes == {("t", 200): 13, ("t", 429): 27, ("r", 200): 4, ("r", 429): 4}, codes
    assert missing.status_code == 400 and "attention_mask" in missing.json()["error"]

    refused = next(r for t, r in results if t == "t" and r.status_code == 429)
    assert "limit of 40 tokens per 1d (window tokens-1d)" in refused.json()["error"]
    assert refused.headers["x-ratelimit-limit"] == "40"
    assert refused.headers["x-ratelimit-remaining"] == "1"  # 39 used: 1 left, 3 asked
    assert int(refused.headers["retry-after"]) >= 1
    # Admitted answers show the tokens window in RateLimit like any other.
    admitted = [r for t, r in results if t == "t" and r.status_code == 200]
    assert all('"tokens-1d";q=40;w=86400' in r.headers["ratelimit-policy"] for r in admitted)

    def tokens_left(answer: httpx.Response) -> int:
        match = re.search(r'"tokens-1d";r=(\d+);', answer.headers["ratelimit"])
        assert match, answer.headers["ratelimit"]
        return int(match[1])

    assert sorted(tokens_left(r) for r in admitted) == [
        1,
        4,
        7,
        10,
        13,
        16,
        19,
        22,
        25,
        28,
        31,
        34,
        37,
    ]
    # What Redis counted is what was admitted, in every window: a request refused by its
    # tokens counts in no window (its requests window holds the 13 admitted only).
    for replica in replicas:
        assert used(replica, "t") == {"tokens-1d": 39, "requests-1d": 13}
        assert used(replica, "r") == {"requests-1d": 4, "tokens-1d": 12}
    r_refused = next(r for t, r in results if t == "r" and r.status_code == 429)
    assert "limit of 4 requests per 1d" in r_refused.json()["error"]


def test_elements_counts_the_padding_and_nonzero_does_not(serve, models, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same requests against the same budget of 10 tokens in each replica's memory: 2
    admitted when every element counts (5 each), 3 when only the mask's non-zero ones do."""
    not_near_midnight()
    limits = {"t": [{"unit": "tokens", "limit": 10, "window": "1d"}]}
    admitted = {}
    for name, tokens in (("elements", ELEMENTS), ("nonzero", NONZERO)):
        config = in_memory(write_policy(tmp_path, "redis://unused", limits, tokens=tokens))
        served = serve_text(serve, models, config)
        with httpx.Client(timeout=30) as http:
            codes = [infer(http, served, "t", text_body()).status_code for _ in range(4)]
        admitted[name] = codes.count(200)
        assert set(codes[admitted[name] :]) == {429}, codes
        assert used(served, "t") == {"tokens-1d": 5 * 2 if name == "elements" else 3 * 3}
    assert admitted == {"elements": 2, "nonzero": 3}


def test_a_token_input_the_model_lacks_or_of_floats_stops_the_start_naming_it(
    serve, models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    limits = {"t": [{"unit": "tokens", "limit": 10, "window": "1m"}]}
    cases = [
        ("text", "token_type_ids", "which the model does not have"),
        ("mlp", "input", "which is FP32: tokens are counted in an integer input"),
    ]
    for i, (model, token_input, problem) in enumerate(cases):
        run = tmp_path / f"run{i}"
        run.mkdir()
        tokens = {"input": token_input, "count": "elements"}
        config = in_memory(write_policy(run, "redis://unused", limits, tokens=tokens))
        served = serve(
            "--model-uri",
            f"file://{models[model]}",
            "--model-name",
            model,
            "--quota-config",
            str(config),
            wait_ready=False,
            env={"KUBEONNX_TERMINATION_LOG": str(run / "termination-log")},
        )
        assert served.proc.wait(120) == 1, served.logs()
        (line,) = (run / "termination-log").read_text().splitlines()
        assert f"counts tokens in input '{token_input}', {problem}" in line, line


def test_the_gateway_refuses_a_missing_or_non_integer_token_input_uncharged(
    serve, redis_server: LocalRedis, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The gateway has no model to check requests against: the token input is checked as it
    is counted, before the charge."""
    not_near_midnight()
    store = LocalRedis().start()  # the queue
    try:
        limits = {"t": [{"unit": "tokens", "limit": 100, "window": "1d"}]}
        config = write_policy(
            tmp_path, redis_server.url, limits, tokens=NONZERO, decisionBudgetMs=10000
        )
        gateway = start_gateway(serve, store.url, KUBEONNX_QUOTA_CONFIG=str(config))
        key = {"X-Api-Key": "t-key"}
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            for body, problem in (
                (text_body(mask=None), "input 'attention_mask' is missing"),
                (text_body(mask=[1.0, 1.0, 1.0, 0.0, 0.0], datatype="FP32"), "is FP32"),
            ):
                answer = http.post("/v2/models/mlp/async-infer", json=body, headers=key)
                assert answer.status_code == 400, answer.text
                assert problem in answer.json()["error"], answer.text
                assert "attention_mask" in answer.json()["error"]
            answer = http.post("/v2/models/mlp/async-infer", json=text_body(), headers=key)
            assert answer.status_code == 202, answer.text
            usage = http.get("/v2/quota", headers=key).json()
        assert [(u["unit"], u["used"]) for u in usage["limits"]] == [("tokens", 3)]
    finally:
        store.stop()


async def test_a_reloaded_policy_counting_an_input_the_model_lacks_is_not_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As at start-up, so on a reload: the last configuration stays in force, and the reason
    is logged naming the input."""
    from kubeonnx_runtime.datatypes import TensorSpec
    from kubeonnx_runtime.quota import Quota, load_quota_config
    from kubeonnx_runtime.tokens import check_token_input

    inputs = [
        TensorSpec("input_ids", "INT64", (-1, -1)),
        TensorSpec("attention_mask", "INT64", (-1, -1)),
    ]
    path = tmp_path / "config.json"
    policy = {
        "policy": "team",
        "namespace": "tests",
        "tokens": NONZERO,
        "defaultTenant": {"limits": [{"unit": "tokens", "limit": 100, "window": "1m"}]},
    }
    path.write_text(json.dumps(policy))
    refused: list[bool] = []  # what the gauge kubeonnx_quota_config_refused is set to
    quota = Quota(load_quota_config(path), on_reload=refused.append)
    quota.check_config = lambda config: check_token_input(config, inputs)
    follower = asyncio.create_task(quota.follow(path, 0.01))
    try:
        path.write_text(json.dumps({**policy, "tokens": {"input": "ids", "count": "elements"}}))
        for _ in range(3000):  # 30 s at most, on a loaded machine
            if any("not reloaded" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        (record,) = [r for r in caplog.records if "not reloaded" in r.getMessage()]
        assert "counts tokens in input 'ids', which the model does not have" in record.getMessage()
        assert quota.config.tokens is not None and quota.config.tokens.input == "attention_mask"
        assert refused[-1] is True
        # A change that loads clears it.
        path.write_text(json.dumps({**policy, "tokens": ELEMENTS}))
        for _ in range(3000):
            if quota.config.tokens.count == "elements":
                break
            await asyncio.sleep(0.01)
        assert quota.config.tokens.count == "elements" and refused[-1] is False
    finally:
        follower.cancel()


def binary_body(ids: list[int], mask: list[int], mask_shape: list[int]) -> tuple[bytes, int]:
    """input_ids [1, len(ids)] and attention_mask of `mask_shape`, both as binary data."""
    tensors = [("input_ids", [1, len(ids)], ids), ("attention_mask", mask_shape, mask)]
    buffers = [struct.pack(f"<{len(data)}q", *data) for _, _, data in tensors]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": shape,
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": len(buf)},
                }
                for (name, shape, _), buf in zip(tensors, buffers, strict=True)
            ]
        }
    ).encode()
    return header + b"".join(buffers), len(header)


def test_a_token_input_smaller_than_the_others_is_a_400_not_a_cheap_broadcast(
    serve, models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The text model names its dimensions (batch, seq) in both inputs, and broadcasts the
    mask: a mask of [1,1] over 1000 ids would be charged 1 token for a run over 1000. Sizes
    differing in a dimension the model names alike are a 400 naming both inputs, as JSON and
    as binary data, and nothing is charged; a mask of [1,0] too (it failed the run, a 500)."""
    not_near_midnight()
    limits = {"t": [{"unit": "tokens", "limit": 10000, "window": "1d"}]}
    config = in_memory(write_policy(tmp_path, "redis://unused", limits, tokens=NONZERO))
    served = serve_text(serve, models, config)
    ids = [7] * 1000
    url = f"{served.url}/v2/models/text/infer"
    key = {"X-Api-Key": "t-key"}
    with httpx.Client(timeout=30) as http:
        for mask, shape in (([1], [1, 1]), ([], [1, 0])):
            as_json = {
                "inputs": [
                    {"name": "input_ids", "shape": [1, 1000], "datatype": "INT64", "data": ids},
                    {"name": "attention_mask", "shape": shape, "datatype": "INT64", "data": mask},
                ]
            }
            body, length = binary_body(ids, mask, shape)
            binary = {**key, "Inference-Header-Content-Length": str(length)}
            for answer in (
                http.post(url, json=as_json, headers=key),
                http.post(url, content=body, headers=binary),
            ):
                assert answer.status_code == 400, answer.text
                error = answer.json()["error"]
                assert "input 'attention_mask' has" in error, error
                assert f"has {shape[1]} in dimension 1 and input 'input_ids' has 1000" in error
                assert "dimension 'seq'" in error, error
        assert used(served, "t") == {"tokens-1d": 0}
        # The same ids with a mask of their length are served and charged.
        whole, length = binary_body(ids, [1] * 1000, [1, 1000])
        answer = http.post(
            url, content=whole, headers={**key, "Inference-Header-Content-Length": str(length)}
        )
        assert answer.status_code == 200, answer.text
    assert used(served, "t") == {"tokens-1d": 1000}


def test_a_token_input_the_model_ties_to_no_other_input_is_warned_of_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The decoder can hold a token input to the others' sizes only where the model names
    their dimensions alike; where it does not, the start goes on with a warning naming the
    dimensions left loose (none: the generated text model, and a model of one input)."""
    from kubeonnx_runtime.datatypes import TensorSpec
    from kubeonnx_runtime.quota import QuotaConfig
    from kubeonnx_runtime.tokens import check_token_input

    config = QuotaConfig.model_validate(
        {
            "policy": "team",
            "namespace": "tests",
            "tokens": NONZERO,
            "defaultTenant": {"limits": [{"unit": "tokens", "limit": 100, "window": "1m"}]},
        }
    )
    named = ((0, "batch"), (1, "seq"))
    tied = [TensorSpec(n, "INT64", (-1, -1), named) for n in ("input_ids", "attention_mask")]
    alone = [TensorSpec("attention_mask", "INT64", (-1, -1))]
    unnamed = [TensorSpec(n, "INT64", (-1, -1)) for n in ("input_ids", "attention_mask")]
    half = [tied[0], TensorSpec("attention_mask", "INT64", (-1, -1), ((0, "batch"),))]
    for inputs, loose in ((tied, None), (alone, None), (unnamed, "0, 1"), (half, "1")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="kubeonnx_runtime.tokens"):
            check_token_input(config, inputs)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        if loose is None:
            assert warnings == [], warnings
        else:
            (warning,) = warnings
            assert f"input 'attention_mask', whose dynamic dimension(s) {loose} the" in warning


def test_a_request_over_a_whole_window_is_a_413_that_says_it_never_fits(
    serve, models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """150 tokens against 100 per hour (or 3 rows against 2) was a 429 with a Retry-After,
    though no reset ever makes room for it: a 413 saying so, without Retry-After, charged
    nothing; a request that fits is served as before."""
    not_near_midnight()
    limits = {
        "t": [
            {"unit": "tokens", "limit": 100, "window": "1h"},
            {"unit": "rows", "limit": 2, "window": "1h"},
        ]
    }
    config = in_memory(write_policy(tmp_path, "redis://unused", limits, tokens=ELEMENTS))
    served = serve_text(serve, models, config)

    def body(rows: int, length: int) -> dict[str, Any]:
        shape = [rows, length]
        return {
            "inputs": [
                {"name": n, "shape": shape, "datatype": "INT64", "data": [1] * rows * length}
                for n in ("input_ids", "attention_mask")
            ]
        }

    with httpx.Client(timeout=30) as http:
        for request, needs in ((body(1, 150), "150 tokens"), (body(3, 5), "3 rows")):
            answer = infer(http, served, "t", request)
            assert answer.status_code == 413, answer.text
            assert "retry-after" not in answer.headers
            error = answer.json()["error"]
            assert f"the request alone needs {needs}, over tenant 't''s whole limit" in error
            assert "it can never be admitted" in error, error
        assert infer(http, served, "t", body(2, 50)).status_code == 200
    assert used(served, "t") == {"tokens-1h": 100, "rows-1h": 2}


def test_an_asynchronous_request_to_a_replica_is_held_to_the_same_sizes(
    serve, models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A replica that runs the model decodes an asynchronous request as a synchronous one:
    the broadcast mask is a 400 at submission, nothing queued or charged."""
    not_near_midnight()
    store = LocalRedis().start()  # the queue
    try:
        limits = {"t": [{"unit": "tokens", "limit": 10000, "window": "1d"}]}
        config = in_memory(write_policy(tmp_path, "redis://unused", limits, tokens=NONZERO))
        served = serve_text(serve, models, config, env=async_env(store.url))
        body = {
            "inputs": [
                {"name": "input_ids", "shape": [1, 1000], "datatype": "INT64", "data": [7] * 1000},
                {"name": "attention_mask", "shape": [1, 1], "datatype": "INT64", "data": [1]},
            ]
        }
        answer = httpx.post(
            f"{served.url}/v2/models/text/async-infer",
            json=body,
            headers={"X-Api-Key": "t-key"},
            timeout=30,
        )
        assert answer.status_code == 400, answer.text
        assert "dimension 'seq'" in answer.json()["error"], answer.text
        assert used(served, "t") == {"tokens-1d": 0}
    finally:
        store.stop()


def test_a_served_model_refuses_a_reloaded_policy_naming_an_input_it_lacks_on_its_gauge(
    serve, models, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The real process: its own reload check (the model's inputs) keeps the policy in force,
    and its gauge kubeonnx_quota_config_refused, which the alert reads, is 1 while the file
    is refused and back to 0 once a good one loads."""
    from tests.runtime.test_router import metric

    not_near_midnight()
    limits = {"t": [{"unit": "tokens", "limit": 1_000_000, "window": "1d"}]}
    config = in_memory(write_policy(tmp_path, "redis://unused", limits, tokens=NONZERO))
    served = serve_text(serve, models, config, "--quota-reload-s", "0.2")

    def refused() -> float:
        return metric(served.url, "kubeonnx_quota_config_refused", model="text")

    def rewrite(tokens: dict[str, str]) -> None:
        policy = json.loads(config.read_text())
        staged = config.with_suffix(".new")
        staged.write_text(json.dumps({**policy, "tokens": tokens}))
        staged.replace(config)  # whole, as the kubelet swaps a mounted file

    def until(check: Any, what: str) -> None:
        deadline = time.monotonic() + 120  # a loaded machine: waited for, never timed
        while not check():
            assert time.monotonic() < deadline, f"not in 120 s: {what}\n{served.logs()}"
            time.sleep(0.1)

    with httpx.Client(timeout=30) as http:
        assert refused() == 0
        assert infer(http, served, "t", text_body()).status_code == 200
        assert used(served, "t") == {"tokens-1d": 3}

        rewrite({"input": "ids", "count": "elements"})
        until(lambda: refused() == 1, "the gauge at 1")
        assert "counts tokens in input 'ids', which the model does not have" in served.logs()
        answer = infer(http, served, "t", text_body())
        assert answer.status_code == 200, answer.text
        assert used(served, "t") == {"tokens-1d": 6}  # still the mask's non-zero ones

        rewrite(ELEMENTS)
        until(lambda: refused() == 0, "the gauge back at 0")
        assert infer(http, served, "t", text_body()).status_code == 200
        assert used(served, "t") == {"tokens-1d": 11}  # every element now
