"""Batching: pure merge/split, and the async batcher's grouping and bounded queue."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from kubeonnx_runtime.batching import Batcher, batch_key, merge, split
from kubeonnx_runtime.errors import ServerBusy


def test_merge_then_split_is_identity() -> None:
    rng = np.random.default_rng(1)
    parts = [{"x": rng.standard_normal((n, 3)), "y": rng.integers(0, 9, (n, 2))} for n in (1, 3, 2)]
    merged = merge(parts)
    assert merged["x"].shape == (6, 3)
    for got, want in zip(split(merged, [1, 3, 2]), parts, strict=True):
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(got["y"], want["y"])


def test_split_refuses_outputs_that_do_not_follow_the_rows() -> None:
    with pytest.raises(ValueError, match="rows for a batch of 3"):
        split({"sum": np.zeros((1,))}, [1, 2])


def test_batch_key_separates_shapes_and_dtypes() -> None:
    a = {"x": np.zeros((2, 4), np.float32)}
    assert batch_key(a) == batch_key({"x": np.zeros((5, 4), np.float32)})
    assert batch_key(a) != batch_key({"x": np.zeros((2, 5), np.float32)})
    assert batch_key(a) != batch_key({"x": np.zeros((2, 4), np.float64)})


async def test_concurrent_requests_are_merged_and_answered_correctly() -> None:
    runs: list[int] = []

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(inputs["x"].shape[0])
        return {"y": inputs["x"] * 2}

    batcher = Batcher(model, max_batch_size=8, max_delay_s=0.05, max_queue=100, batchable=True)
    batcher.start()
    try:
        xs = [np.full((1, 2), i, np.float32) for i in range(8)]
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs))
    finally:
        await batcher.stop()
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out["y"], x * 2)
    assert runs == [8]


async def test_incompatible_requests_run_separately() -> None:
    runs: list[tuple[int, ...]] = []

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(inputs["x"].shape)
        return {"y": inputs["x"].sum(axis=1, keepdims=True)}

    batcher = Batcher(model, max_batch_size=8, max_delay_s=0.02, max_queue=100, batchable=True)
    batcher.start()
    try:
        a, b, c = (np.ones((1, 2)), np.ones((1, 3)), np.ones((2, 2)))
        oa, ob, oc = await asyncio.gather(*(batcher.infer({"x": v}) for v in (a, b, c)))
    finally:
        await batcher.stop()
    assert oa["y"].tolist() == [[2.0]] and ob["y"].tolist() == [[3.0]]
    assert oc["y"].tolist() == [[2.0], [2.0]]
    assert sorted(runs) == [(1, 3), (3, 2)]


async def test_a_full_queue_refuses_instead_of_growing() -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return inputs

    batcher = Batcher(model, max_batch_size=1, max_delay_s=0, max_queue=2, batchable=False)
    batcher.start()
    try:
        running = asyncio.ensure_future(batcher.infer({"x": np.zeros(1)}))
        await asyncio.sleep(0.05)  # the first is now in the model, off the queue
        queued = [asyncio.ensure_future(batcher.infer({"x": np.zeros(1)})) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ServerBusy, match="queue is full"):
            await batcher.infer({"x": np.zeros(1)})
        assert batcher.depth == 2
        release.set()
        await asyncio.gather(running, *queued)
    finally:
        release.set()
        await batcher.stop()


@pytest.mark.parametrize(("model_seconds", "inline"), [(0.0, True), (0.003, False)])
async def test_only_fast_models_run_on_the_event_loop_however_busy_it_is(
    model_seconds: float, inline: bool
) -> None:
    """The batcher's clock is the test's: a model run takes exactly `model_seconds` on it,
    whatever the machine's load, so the decision is the model's alone to make."""
    threads: list[str] = []
    now = [0.0]

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        threads.append(threading.current_thread().name)
        now[0] += model_seconds
        return inputs

    async def hog() -> None:
        # Other work on the loop: an await on the executor comes back late.
        while True:
            time.sleep(0.002)  # noqa: ASYNC251 - blocking on purpose
            await asyncio.sleep(0)

    batcher = Batcher(
        model,
        max_batch_size=1,
        max_delay_s=0,
        max_queue=10,
        batchable=False,
        clock=lambda: now[0],
    )
    batcher.start()
    busy = asyncio.ensure_future(hog())
    try:
        for _ in range(6):
            await batcher.infer({"x": np.zeros((1, 2))})
    finally:
        busy.cancel()
        await batcher.stop()
    # The first run is timed on the inference thread; what follows depends on the model only.
    assert threads[0].startswith("kubeonnx-infer")
    on_loop = [name == threading.current_thread().name for name in threads[1:]]
    assert on_loop == [inline] * 5, threads


async def test_a_request_whose_inputs_disagree_on_rows_runs_alone() -> None:
    """Its rows could not be cut back out of a merged run: another request's would leak."""
    runs: list[dict[str, tuple[int, ...]]] = []

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append({k: v.shape for k, v in inputs.items()})
        return {"a": inputs["a"] + 1, "b": inputs["b"] + 1}

    batcher = Batcher(model, max_batch_size=8, max_delay_s=0.05, max_queue=100, batchable=True)
    batcher.start()
    try:
        even = {"a": np.full((2, 1), 10.0), "b": np.full((2, 1), 20.0)}
        odd = {"a": np.full((1, 1), 30.0), "b": np.full((2, 1), 40.0)}
        twin = {"a": np.full((1, 1), 50.0), "b": np.full((1, 1), 60.0)}
        outs = await asyncio.gather(*(batcher.infer(x) for x in (even, odd, twin)))
    finally:
        await batcher.stop()
    for x, out in zip((even, odd, twin), outs, strict=True):
        np.testing.assert_array_equal(out["a"], x["a"] + 1)
        np.testing.assert_array_equal(out["b"], x["b"] + 1)
    assert {"a": (1, 1), "b": (2, 1)} in runs  # the odd one, alone
    assert {"a": (3, 1), "b": (3, 1)} in runs  # the two that agree, merged


async def test_a_failed_merged_run_is_answered_request_by_request() -> None:
    class Poison(Exception):
        pass

    def model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["x"] < 0).any():
            raise Poison("negative value")
        return {"y": inputs["x"] * 2}

    batcher = Batcher(model, max_batch_size=8, max_delay_s=0.05, max_queue=100, batchable=True)
    batcher.start()
    try:
        xs = [np.full((1, 2), v, np.float32) for v in (1, 2, -3, 4)]
        outs = await asyncio.gather(*(batcher.infer({"x": x}) for x in xs), return_exceptions=True)
    finally:
        await batcher.stop()
    assert isinstance(outs[2], Poison)
    for i in (0, 1, 3):
        result = outs[i]
        assert isinstance(result, dict)
        np.testing.assert_array_equal(result["y"], xs[i] * 2)
