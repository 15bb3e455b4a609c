"""Whether the Secrets that QuotaPolicy tenants name exist (and the S3 credentials Secret and
labels ConfigMap a model names): asked by name, metadata only, and remembered, so that a
resync asks nothing and a policy of many tenants costs its GETs once.

The operator holds no list or watch on Secrets and never reads their data: the kubelet mounts
them into the model's pods. It asks only so that a missing Secret shows in status
(`QuotaSecretNotFound`, `SecretNotFound`) rather than as pods that fail to start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from .kube import Kube

# A Secret seen is trusted this long (its deletion shows in status within it); a missing one
# is asked about again after MISSING_RECHECK_S, so creating it is noticed soon.
PRESENT_RECHECK_S = 600.0
MISSING_RECHECK_S = 15.0
# GETs in flight at once, for all reconciles together: a policy of a thousand tenants takes
# its turn rather than the API server's attention or the client's connections.
MAX_IN_FLIGHT = 8


class SecretPresence:
    def __init__(
        self,
        kube: Kube,
        clock: Callable[[], float] = time.monotonic,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.kube = kube
        self.clock = clock
        # (namespace, name, kind) -> (exists, checked at)
        self._known: dict[tuple[str, str, str], tuple[bool, float]] = {}
        self._asking: dict[tuple[str, str, str], asyncio.Future[bool]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)

    async def missing(self, namespace: str, names: Iterable[str]) -> set[str]:
        """The names among `names` that no Secret in `namespace` has."""
        wanted = list(dict.fromkeys(names))
        found = await asyncio.gather(*(self.exists(namespace, name) for name in wanted))
        return {name for name, exists in zip(wanted, found, strict=True) if not exists}

    async def exists(self, namespace: str, name: str, kind: str = "Secret") -> bool:
        key = (namespace, name, kind)
        known = self._known.get(key)
        if known is not None:
            exists, checked = known
            if self.clock() - checked < (PRESENT_RECHECK_S if exists else MISSING_RECHECK_S):
                return exists
        asking = self._asking.get(key)
        if asking is None:  # one GET per name, however many reconciles wait for it
            asking = self._asking[key] = asyncio.ensure_future(self._ask(key))
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _ask(self, key: tuple[str, str, str]) -> bool:
        namespace, name, kind = key
        async with self._slots:
            if kind == "Secret":
                exists = await self.kube.secret_metadata(namespace, name) is not None
            else:
                exists = await self.kube.metadata(kind, namespace, name) is not None
        self._known[key] = (exists, self.clock())
        return exists

    def recheck_missing(self, namespace: str) -> None:
        """Ask again about the namespace's missing Secrets at the next reconcile (a policy
        there changed, perhaps because its Secrets were just created)."""
        stale = [k for k, (exists, _) in self._known.items() if k[0] == namespace and not exists]
        for key in stale:
            del self._known[key]
