"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

One replica holds the Lease and renews it every `retry_s`; the others watch it and take it
over only once its record has not changed for `lease_s` by their own clock (no trust in
another machine's clock). The holder may write only while its last renewal is younger
than `renew_deadline_s`, which is shorter than `lease_s`: a leader that cannot renew
stops writing before any standby can take over, so two replicas never write at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, codecs
from lightkube.resources.coordination_v1 import Lease

from . import metrics

log = logging.getLogger(__name__)

# A Lease request has its own client (a full pool elsewhere never delays a renewal) and
# this much time in all, so two tries fit in the renew deadline.
REQUEST_TIMEOUT_S = 4.0
WRITE_MARGIN_S = 1.0  # what a write sent just in time may still take at the API server
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_namespace() -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip()
    except OSError:
        return os.environ.get("POD_NAMESPACE") or "default"


def _micro(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: AsyncClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert renew_deadline_s + WRITE_MARGIN_S < lease_s
        self.client = client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_s, self.renew_deadline_s, self.retry_s = lease_s, renew_deadline_s, retry_s
        self.clock = clock
        self._renewed_at: float | None = None  # our clock, at our last successful write
        self._observed: str | None = None  # the other holder's record (its resourceVersion)
        self._observed_at = 0.0

    def holding(self) -> bool:
        """True while this replica may write."""
        return (
            self._renewed_at is not None and self.clock() - self._renewed_at < self.renew_deadline_s
        )

    def write_budget(self) -> float:
        """0 while this replica may not write; else how long a write it starts now may take:
        until the Lease could pass to another replica (its last renewal plus the lease), less
        a second for the API server to finish it. Past the renew deadline no write starts,
        so a write in flight has at least `lease_s - renew_deadline_s - 1` seconds."""
        if not self.holding() or self._renewed_at is None:
            return 0.0
        return self._renewed_at + self.lease_s - WRITE_MARGIN_S - self.clock()

    async def run(
        self,
        on_started: Callable[[], None],
        on_stopped: Callable[[], Awaitable[None]],
    ) -> None:
        """Try to acquire, then renew; call on_started on winning and on_stopped on losing."""
        leading = False
        try:
            while True:
                ok = await self._try()
                now_holding = ok and self.holding()
                if now_holding and not leading:
                    leading = True
                    metrics.LEADER.set(1)
                    log.info(
                        "this replica (%s) leads: Lease %s/%s",
                        self.identity,
                        self.namespace,
                        self.name,
                    )
                    on_started()
                elif leading and not self.holding():
                    leading = False
                    metrics.LEADER.set(0)
                    log.warning(
                        "lost the Lease %s/%s; stopping all writes", self.namespace, self.name
                    )
                    await on_stopped()
                delay = self.retry_s
                if leading and self._renewed_at is not None:
                    # Wake in time to stop before the deadline passes if renewals keep failing.
                    left = self.renew_deadline_s - (self.clock() - self._renewed_at)
                    delay = max(0.05, min(delay, left))
                await asyncio.sleep(delay)
        finally:
            metrics.LEADER.set(0)

    async def _try(self) -> bool:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                return await self._acquire_or_renew()
        except (ApiError, httpx2.HTTPError, OSError, TimeoutError) as exc:
            code = exc.status.code if isinstance(exc, ApiError) else type(exc).__name__
            log.info("Lease %s/%s not renewed (%s)", self.namespace, self.name, code)
            return False

    async def _acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease = (await self.client.get(Lease, self.name, namespace=self.namespace)).to_dict()
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            started = self.clock()
            await self.client.create(self._lease(None, now, now, 0))
            self._renewed_at = started
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = lease["metadata"]["resourceVersion"]  # changes with every write of it
        if holder != self.identity:
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            duration = spec.get("leaseDurationSeconds") or self.lease_s
            if holder and self.clock() - self._observed_at < duration:
                return False  # someone else holds a live lease
            transitions = (spec.get("leaseTransitions") or 0) + 1
            acquired = now
        else:
            transitions = spec.get("leaseTransitions") or 0
            acquired = spec.get("acquireTime") or now
        started = self.clock()
        await self.client.replace(
            self._lease(record, acquired, now, transitions)
        )  # a conflict (409) means someone else wrote first: this round is lost
        self._renewed_at = started
        return True

    def _lease(
        self, version: str | None, acquired: Any, renewed: datetime, transitions: int
    ) -> Any:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if version:
            meta["resourceVersion"] = version
        return codecs.from_dict(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": meta,
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": int(self.lease_s),
                    "acquireTime": acquired if isinstance(acquired, str) else _micro(acquired),
                    "renewTime": _micro(renewed),
                    "leaseTransitions": transitions,
                },
            }
        )

    async def release(self) -> None:
        """On a clean shutdown: hand the Lease back so a standby takes over at once."""
        if not self.holding():
            return
        self._renewed_at = None
        try:
            lease = (await self.client.get(Lease, self.name, namespace=self.namespace)).to_dict()
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = None
            lease["spec"]["leaseDurationSeconds"] = 1
            await self.client.replace(codecs.from_dict(lease))
        except (ApiError, httpx2.HTTPError, OSError) as exc:
            log.info("Lease %s/%s not released: %s", self.namespace, self.name, exc)
