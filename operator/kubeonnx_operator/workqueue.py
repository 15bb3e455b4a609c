"""A per-object work queue: many triggers, one reconcile at a time per object, a few at once.

A trigger while a reconcile runs marks the key dirty, so it runs once more afterwards;
failures retry with exponential backoff, and a trigger from a child's event or the resync
does not cut a backoff short (a change of the object itself does, even one that arrives
while the failing reconcile still runs). At most
`max_concurrent` reconciles run at once. The queue starts stopped: it runs once the
caches have synced and this replica leads, and stops at once when it no longer does.
Bodies come from the watch (a local cache), so a trigger costs no API read.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import metrics

log = logging.getLogger(__name__)

Key = tuple[str, str]  # namespace, name


class Stopped(Exception):
    """Raised by a write while this replica may not write (it does not hold the lease)."""


class WorkQueue:
    def __init__(
        self,
        reconcile: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        kind: str = "InferenceModel",
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        max_concurrent: int = 8,
        running: bool = True,
    ) -> None:
        self._reconcile = reconcile
        self.kind = kind
        self.bodies: dict[Key, dict[str, Any]] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._retries: dict[Key, asyncio.TimerHandle] = {}
        self._later: dict[Key, asyncio.TimerHandle] = {}
        self.base_delay, self.max_delay = base_delay, max_delay
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running = running

    def observe(self, key: Key, body: dict[str, Any] | None, *, trigger: bool = True) -> None:
        """Record the latest body from the watch (None: deleted) and, unless told not to,
        trigger a reconcile. A new generation ends a backoff: the object was changed."""
        if body is None:
            self.bodies.pop(key, None)
            self._end_backoff(key)
            return
        old = self.bodies.get(key)
        self.bodies[key] = body
        if old is not None and _generation(old) != _generation(body):
            self._end_backoff(key)
        if trigger:
            self.trigger(key)

    def forget(self, key: Key, uid: str) -> bool:
        """The watch says object `uid` was deleted: drop it, unless `key` now holds another
        object (re-created under the name, its events first). True if it was dropped."""
        body = self.bodies.get(key)
        if body is not None and body["metadata"].get("uid") != uid:
            return False
        self.observe(key, None)
        return True

    def trigger(self, key: Key) -> None:
        if key not in self.bodies:
            return
        if not self.running:
            return  # start() runs everything
        if key in self._retries:
            return  # failing: the retry timer runs it when its backoff is over
        if key in self._running:
            self._dirty.add(key)
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._run(key))
        self._depth()

    def requeue_after(self, key: Key, delay: float | None) -> None:
        """Reconcile `key` again in `delay` seconds (a rollout's next analysis or the end
        of its pause), replacing the time asked before; None cancels it."""
        old = self._later.pop(key, None)
        if old:
            old.cancel()
        if delay is None or key not in self.bodies:
            return
        self._later[key] = asyncio.get_running_loop().call_later(delay, self._due, key)

    def _due(self, key: Key) -> None:
        self._later.pop(key, None)
        self.trigger(key)

    def trigger_all(self) -> None:
        for key in list(self.bodies):
            self.trigger(key)

    def start(self) -> None:
        """Run every object once, then as triggered."""
        self.running = True
        self.trigger_all()

    async def stop(self) -> None:
        """Stop at once: cancel running reconciles and pending retries."""
        self.running = False
        for key in list(self._retries):
            self._end_backoff(key)
        for key in list(self._later):
            self.requeue_after(key, None)
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dirty.clear()
        self._depth()

    def _end_backoff(self, key: Key) -> None:
        self._failures.pop(key, None)
        retry = self._retries.pop(key, None)
        if retry:
            retry.cancel()

    async def _run(self, key: Key) -> None:
        try:
            async with self._slots:
                while True:
                    self._dirty.discard(key)
                    body = self.bodies.get(key)
                    if body is None or not self.running:
                        return
                    started = time.monotonic()
                    try:
                        await self._reconcile(body)
                    except Stopped:
                        return
                    except Exception:
                        metrics.RECONCILES.labels(self.kind, "error").inc()
                        if _generation(self.bodies.get(key) or body) != _generation(body):
                            # The object changed while this run failed: the new generation
                            # runs now, not after the old one's backoff.
                            log.warning(
                                "reconcile of %s %s/%s failed; its spec changed meanwhile: "
                                "running again now",
                                self.kind,
                                *key,
                                exc_info=True,
                            )
                            self._failures.pop(key, None)
                            continue
                        failures = self._failures.get(key, 0) + 1
                        self._failures[key] = failures
                        delay = min(self.base_delay * 2 ** (failures - 1), self.max_delay)
                        delay *= 0.5 + random.random()
                        log.exception(
                            "reconcile of %s %s/%s failed (%d); retrying in %.1fs",
                            self.kind,
                            *key,
                            failures,
                            delay,
                        )
                        self._schedule_retry(key, delay)
                        return
                    finally:
                        metrics.RECONCILE_SECONDS.labels(self.kind).observe(
                            time.monotonic() - started
                        )
                    metrics.RECONCILES.labels(self.kind, "ok").inc()
                    self._failures.pop(key, None)
                    if key not in self._dirty:
                        return
        finally:
            self._running.pop(key, None)
            self._depth()

    def _schedule_retry(self, key: Key, delay: float) -> None:
        old = self._retries.pop(key, None)
        if old:
            old.cancel()
        self._retries[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self._retries.pop(key, None)
        self.trigger(key)

    def _depth(self) -> None:
        waiting = len(self._running) + len(self._retries)
        metrics.QUEUE_DEPTH.labels(self.kind).set(waiting)

    async def idle(self) -> None:
        """Wait until no reconcile is running (tests and shutdown)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)


def _generation(body: dict[str, Any]) -> Any:
    return (body.get("metadata") or {}).get("generation")
