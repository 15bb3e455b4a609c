"""List-then-watch caches of the objects the operator reads, with server-side selectors.

Each informer lists its kind in chunks (label selector and namespace on the server, so a
cluster full of unrelated pods costs nothing), then watches from the list's
resourceVersion. When the watch expires (410 Gone) or breaks, it lists again and
reconciles what it knew against what was listed: an object that vanished in the gap gets
a DELETED event of its own, by UID. `synced` is set once the first list is delivered.

No watch can hang: each asks the API server to end it after a jittered `timeoutSeconds`
(client-go's: between the configured timeout and twice that, so a restart does not bring
every watch back at once), resumes from the last resourceVersion (kept recent by
bookmarks), and has a read timeout above that, so a connection that silently stopped
delivering (half-open) fails and is listed again. `down_for()` says how long a watch has
been failing without a successful list since: readiness fails when it is minutes.

kopf's watches cannot do either (their label filter is client-side, and a relist is not
shown to handlers), so the operator's watches are these; kopf runs the process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx2
from lightkube import ALL_NS, ApiError

from . import metrics
from .kube import ApiClient, as_dict, resource

log = logging.getLogger(__name__)

# on_event(type, object): type is ADDED, MODIFIED or DELETED; object is a plain dict.
Handler = Callable[[str, dict[str, Any]], None]

LIST_CHUNK = 100  # objects per list call
RETRY_MAX_S = 30.0


def _tombstone(obj: dict[str, Any]) -> dict[str, Any]:
    """What a DELETED event for a vanished object carries: its identity and labels."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels") if k in meta},
    }


def _status_code(exc: Exception) -> int | None:
    if isinstance(exc, ApiError):
        return int(exc.status.code or 0)
    if isinstance(exc, httpx2.HTTPStatusError):  # an error without a Status body (404 of a group)
        return exc.response.status_code
    return None


class Informer:
    def __init__(
        self,
        client: ApiClient,
        on_event: Handler,
        *,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        labels: dict[str, Any] | None = None,
        optional: bool = False,
        list_lock: asyncio.Lock | None = None,
        watch_timeout_s: int = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.resource = resource(api_version, kind)
        self.on_event = on_event
        self.namespace = namespace or ALL_NS
        self.labels = labels
        self.api_version, self.kind = api_version, kind
        # A kind whose CRD may be absent (KEDA's, the Prometheus operator's): absent, it
        # counts as synced and empty, and is looked for again now and then.
        self.optional = optional
        self.list_lock = list_lock or asyncio.Lock()  # shared: one informer lists at a time
        self.known: dict[str, dict[str, Any]] = {}  # uid -> tombstone
        self.synced = asyncio.Event()
        self.installed = False  # the kind exists in the cluster (its list succeeded)
        self.relists = 0
        self.watch_timeout_s = watch_timeout_s
        self.clock = clock
        self._failing_since: float | None = None  # first failure since the last good list

    def down_for(self) -> float:
        """Seconds this watch has been failing without a successful list since (0: fine)."""
        return 0.0 if self._failing_since is None else self.clock() - self._failing_since

    @property
    def what(self) -> str:
        where = "all namespaces" if self.namespace == ALL_NS else self.namespace
        return f"{self.kind} in {where}"

    async def run(self) -> None:
        failures = 0
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                    failures = 0
                version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a watch never dies: it lists again after a pause
                code = _status_code(exc)
                if code == 404 and self.optional and version is None:
                    if not self.synced.is_set() or self.installed:
                        log.info("%s: not installed in the cluster; not watched", self.what)
                    self.installed = False
                    self.synced.set()
                    await asyncio.sleep(60)
                    continue
                version = None
                if code == 410:  # expired: list again, and see what vanished
                    log.info("watch of %s expired; listing again", self.what)
                    continue
                if self._failing_since is None:
                    self._failing_since = self.clock()
                failures += 1
                if isinstance(exc, ApiError):
                    why = f"API error {code}: {exc.status.message}"
                else:
                    why = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, (httpx2.HTTPError, OSError)):
                    log.exception("watch of %s: unexpected error", self.what)
                await self._pause(failures, why)

    async def _pause(self, failures: int, why: str) -> None:
        delay = min(RETRY_MAX_S, 0.5 * 2 ** min(failures, 8)) * (0.5 + random.random() / 2)
        log.warning("watch of %s failed (%s); listing again in %.1fs", self.what, why, delay)
        await asyncio.sleep(delay)

    async def _list(self) -> str:
        # One list at a time, in chunks, each object handed on as it arrives: a start into
        # a big cluster holds one chunk of decoded objects at a time, not every kind's.
        async with self.list_lock:
            listing = self.client.list(
                self.resource, namespace=self.namespace, labels=self.labels, chunk_size=LIST_CHUNK
            )
            previous, seen = self.known, {}
            async for item in listing:
                obj = self._complete(as_dict(item))
                uid = obj["metadata"]["uid"]
                seen[uid] = _tombstone(obj)
                self.on_event("MODIFIED" if uid in previous else "ADDED", obj)
            version = listing.resourceVersion
        if self.synced.is_set():
            self.relists += 1
            metrics.RELISTS.labels(self.kind).inc()
        # What vanished while the watch was down. Every cache removes by UID, so an object
        # re-created in the gap under the same name (listed above) is not touched.
        self.known = seen
        for uid, gone in previous.items():
            if uid not in seen:
                self.on_event("DELETED", gone)
        metrics.WATCHED.labels(self.kind).inc(len(seen) - len(previous))
        self.installed = True
        self._failing_since = None
        self.synced.set()
        return version

    async def _watch(self, version: str) -> str:
        """Follow one watch request until the server ends it; the version to resume from."""
        timeout = int(self.watch_timeout_s * (1 + random.random()))
        async for kind, item in self.client.watch_events(
            self.resource,
            namespace=self.namespace,
            labels=self.labels,
            resource_version=version,
            timeout_s=timeout,
        ):
            obj = self._complete(item)
            meta = obj["metadata"]
            version = meta.get("resourceVersion") or version
            if kind == "BOOKMARK":
                continue
            before = len(self.known)
            if kind == "DELETED":
                self.known.pop(meta["uid"], None)
            else:
                self.known[meta["uid"]] = _tombstone(obj)
            metrics.WATCHED.labels(self.kind).inc(len(self.known) - before)
            self.on_event(kind, obj)
        return version

    def _complete(self, obj: dict[str, Any]) -> dict[str, Any]:
        # List items of built-in kinds come without apiVersion and kind.
        obj["apiVersion"] = obj.get("apiVersion") or self.api_version
        obj["kind"] = obj.get("kind") or self.kind
        return obj
