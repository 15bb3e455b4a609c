"""Dynamic batching: pure merge and split, and an async batcher with a bounded queue.

Batching is for models whose rows are independent (each output row depends only on the same
input row); the owner says so by asking for batches of more than one row. Concurrent
requests whose inputs agree on everything but the first dimension, and whose inputs all
have the same number of rows, are merged into one model run of at most `max_batch_size`
rows, waiting at most `max_delay_s` for company, and split back. A merged run that fails
is run again request by request, so only the request at fault gets the error. A full queue
refuses at once (ServerBusy) instead of growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import ServerBusy

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
BatchKey = tuple[tuple[str, str, tuple[int, ...]], ...]


def batch_key(inputs: Tensors) -> BatchKey:
    """Requests with equal keys can be concatenated along their first dimension."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def rows(inputs: Tensors) -> int | None:
    """The request's rows: the first dimension that every input shares, else None (such a
    request cannot be cut back out of a merged run, so it runs alone)."""
    n: int | None = None
    for i, a in enumerate(inputs.values()):
        if not a.ndim or (i and a.shape[0] != n):
            return None
        n = a.shape[0]
    return n


def merge(requests: list[Tensors]) -> Tensors:
    if len(requests) == 1:
        return requests[0]
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def split(outputs: Tensors, sizes: list[int]) -> list[Tensors]:
    """Split merged outputs back into per-request outputs of `sizes` rows each."""
    if len(sizes) == 1:
        return [outputs]
    total = sum(sizes)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise ValueError(f"output '{name}' has {arr.shape[:1]} rows for a batch of {total}")
    cuts = list(itertools.accumulate(sizes))[:-1]
    parts = {name: np.split(arr, cuts) for name, arr in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]


class Reservation:
    """Places held in a batcher's queue for the parts of one request (`Batcher.reserve`)."""

    __slots__ = ("left",)

    def __init__(self, n: int) -> None:
        self.left = n


@dataclass
class _Pending:
    inputs: Tensors
    rows: int
    key: BatchKey | None  # None: runs alone
    future: asyncio.Future[Tensors]
    deadline: float = field(default=0.0)


class Batcher:
    """Queues requests and runs them, merged where the model allows, one batch at a time."""

    def __init__(
        self,
        run: Callable[[Tensors], Tensors],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        batchable: bool,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._run = run
        self._clock = clock  # times model runs (the inline threshold); a test injects its own
        self.max_batch_size = max_batch_size if batchable else 1
        self.max_delay_s = max_delay_s if self.max_batch_size > 1 else 0.0
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda n: None)
        self._on_queue_depth = on_queue_depth or (lambda n: None)
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        # One model run at a time: the session already uses every CPU of the container.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubeonnx-infer")
        self._task: asyncio.Task[None] | None = None
        # Requests admitted but still being decoded: worth waiting for only if there are any.
        self.arriving = 0
        self.reserved = 0  # places held for parts of requests not queued yet (`reserve`)
        # Model runs shorter than this block the event loop for less than a thread hand-off
        # costs, so they run inline; longer ones go to the executor (measured, EWMA).
        self.inline_below_s = 0.0005
        self._run_seconds = float("inf")

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def admit(self) -> None:
        """A request has arrived and is being read; `withdraw` once it is decoded or refused."""
        self.arriving += 1

    def withdraw(self) -> None:
        self.arriving = max(0, self.arriving - 1)

    def reserve(self, n: int) -> Reservation:
        """Hold `n` places in the queue for one request's parts (the images of a batch), or
        refuse it (ServerBusy) at once: checked before the request is charged and decoded, so
        no part finds the queue full after the others ran. A request larger than the queue
        gets in alone (the queue then holds at most its parts). `infer(..., reservation=)`
        takes a place; `release` gives back the places not taken."""
        held = len(self._queue) + self.reserved
        if held + n > self.max_queue and held > 0:
            raise ServerBusy(
                f"the request queue has no room for {n} requests ({held} of {self.max_queue} "
                "places taken); retry shortly"
            )
        self.reserved += n
        return Reservation(n)

    def release(self, reservation: Reservation) -> None:
        self.reserved -= reservation.left
        reservation.left = 0

    async def infer(self, inputs: Tensors, reservation: Reservation | None = None) -> Tensors:
        if reservation is not None and reservation.left > 0:
            reservation.left -= 1
            self.reserved -= 1
        elif len(self._queue) + self.reserved >= self.max_queue:
            raise ServerBusy(f"the request queue is full ({self.max_queue} waiting); retry shortly")
        n = rows(inputs) if self.max_batch_size > 1 else None
        key = batch_key(inputs) if n is not None else None
        loop = asyncio.get_running_loop()
        item = _Pending(inputs, n or 1, key, loop.create_future())
        item.deadline = time.monotonic() + self.max_delay_s
        self._queue.append(item)
        self._on_queue_depth(len(self._queue))
        self._wakeup.set()
        return await item.future

    def _take_batch(self) -> list[_Pending]:
        """Take the head request and every queued one that merges with it, up to the limit."""
        head = self._queue.popleft()
        batch, total, skipped = [head], head.rows, deque[_Pending]()
        while head.key is not None and self._queue and total < self.max_batch_size:
            item = self._queue.popleft()
            if item.key == head.key and total + item.rows <= self.max_batch_size:
                batch.append(item)
                total += item.rows
            else:
                skipped.append(item)
        self._queue.extendleft(reversed(skipped))
        return batch

    def _ready_rows(self) -> int:
        head = self._queue[0]
        if head.key is None:
            return self.max_batch_size
        return sum(i.rows for i in self._queue if i.key == head.key)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company until the head's deadline or a full batch, and only while
            # other requests are on their way: a lone request is never delayed.
            while self._ready_rows() < self.max_batch_size and self.arriving > 0:
                remaining = self._queue[0].deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = [i for i in self._take_batch() if not i.future.cancelled()]
            self._on_queue_depth(len(self._queue))
            if not batch:
                continue
            self._on_batch(sum(i.rows for i in batch))
            try:
                if self._run_seconds < self.inline_below_s:
                    results, took = self._run_batch(batch)
                    await asyncio.sleep(0)  # let the loop read sockets between runs
                else:
                    results, took = await loop.run_in_executor(
                        self._executor, self._run_batch, batch
                    )
                self._run_seconds = (
                    took
                    if self._run_seconds == float("inf")
                    else 0.9 * self._run_seconds + 0.1 * took
                )
            except Exception as exc:  # the executor itself failed; the model's errors are results
                results = [exc] * len(batch)
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _run_batch(self, batch: list[_Pending]) -> tuple[list[Tensors | Exception], float]:
        """Run a batch: each request's outputs, or the error that request alone caused. Also
        return how long the model took, timed in the thread that ran it (timing the await
        instead would add the event loop's own delays, and keep a fast model off the loop
        for good once it had been sent to the executor)."""
        started = self._clock()
        if len(batch) > 1:
            try:
                outputs = self._run(merge([i.inputs for i in batch]))
                merged: list[Tensors | Exception] = list(split(outputs, [i.rows for i in batch]))
                return merged, self._clock() - started
            except Exception as exc:
                # One request may have poisoned the run (a value the model refuses), or the
                # outputs do not follow the rows: answer each request on its own.
                log.info(
                    "merged run of %d requests failed (%s); running them one by one",
                    len(batch),
                    type(exc).__name__,
                )
        results: list[Tensors | Exception] = []
        for item in batch:
            try:
                results.append(self._run(item.inputs))
            except Exception as exc:
                results.append(exc)
        return results, self._clock() - started
