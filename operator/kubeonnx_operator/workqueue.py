"""A per-object work queue: many triggers, one reconcile at a time per InferenceModel.

A trigger while a reconcile runs marks the key dirty, so it runs once more afterwards;
failures retry with exponential backoff. Bodies come from the watch (a local cache), so a
trigger from a child or the resync timer costs no API read.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, str]  # namespace, name


class WorkQueue:
    def __init__(
        self,
        reconcile: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        self._reconcile = reconcile
        self.bodies: dict[Key, dict[str, Any]] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._retries: dict[Key, asyncio.TimerHandle] = {}
        self.base_delay, self.max_delay = base_delay, max_delay

    def observe(self, key: Key, body: dict[str, Any] | None, *, trigger: bool = True) -> None:
        """Record the latest body from the watch (None: deleted) and, unless told not to,
        trigger a reconcile."""
        if body is None:
            self.bodies.pop(key, None)
            self._failures.pop(key, None)
            retry = self._retries.pop(key, None)
            if retry:
                retry.cancel()
            return
        self.bodies[key] = body
        if trigger:
            self.trigger(key)

    def trigger(self, key: Key) -> None:
        if key not in self.bodies:
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._run(key))

    def trigger_all(self) -> None:
        for key in list(self.bodies):
            self.trigger(key)

    async def _run(self, key: Key) -> None:
        try:
            while True:
                self._dirty.discard(key)
                body = self.bodies.get(key)
                if body is None:
                    return
                try:
                    await self._reconcile(body)
                except Exception:
                    failures = self._failures.get(key, 0) + 1
                    self._failures[key] = failures
                    delay = min(self.base_delay * 2 ** (failures - 1), self.max_delay)
                    delay *= 0.5 + random.random()
                    log.exception(
                        "reconcile of %s/%s failed (%d); retrying in %.1fs", *key, failures, delay
                    )
                    self._schedule_retry(key, delay)
                    return
                self._failures.pop(key, None)
                if key not in self._dirty:
                    return
        finally:
            self._running.pop(key, None)

    def _schedule_retry(self, key: Key, delay: float) -> None:
        old = self._retries.pop(key, None)
        if old:
            old.cancel()
        self._retries[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self._retries.pop(key, None)
        self.trigger(key)

    async def idle(self) -> None:
        """Wait until no reconcile is running (tests and shutdown)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
