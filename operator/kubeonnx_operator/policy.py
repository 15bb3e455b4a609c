"""QuotaPolicy status: which models use the policy, whether its Secrets are there, and where
usage is counted. The models themselves are reconciled by `reconcile.Reconciler`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from .kube import Kube
from .quota import (
    DEFAULT_TENANT,
    QuotaPolicySpec,
    counter_key,
    parse_policy,
    reset_at,
    secret_keys,
    tenant_keys,
)
from .reconcile import status_changed, utc_now
from .spec import InvalidSpec
from .status import READY, PolicyReason, set_condition

log = logging.getLogger(__name__)

USAGE_EVERY_S = 15.0  # how often a Redis-backed policy's status shows fresh usage


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class UsageReader:
    """Reads a policy's counters from its Redis: one MGET for every tenant and window."""

    def __init__(self, kube: Kube, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.clock = clock
        self._clients: dict[tuple[str, str | None], Any] = {}

    async def read(self, namespace: str, name: str, spec: QuotaPolicySpec) -> list[dict[str, Any]]:
        import redis.asyncio as aioredis

        store = spec.backend.redis
        assert store is not None
        password = None
        if store.password_secret is not None:
            ref = store.password_secret
            secret = await self.kube.get_secret(namespace, ref.name)
            found = secret_keys(secret, ref.key) if secret is not None else None
            password = found[0] if found else None
        client = self._clients.get((store.url, password))
        if client is None:
            client = self._clients[(store.url, password)] = aioredis.Redis.from_url(
                store.url, password=password, socket_timeout=2, socket_connect_timeout=2
            )
        now = self.clock()
        rows = [(t.name, lim) for t in spec.tenants for lim in t.limits]
        if spec.default_tenant is not None:
            rows += [(DEFAULT_TENANT, lim) for lim in spec.default_tenant.limits]
        keys = [counter_key(namespace, name, t, lim.unit, lim.window, now) for t, lim in rows]
        values = await client.mget(keys) if keys else []
        return [
            {
                "tenant": tenant,
                "unit": lim.unit,
                "window": lim.window,
                "used": int(value or 0),
                "limit": lim.limit,
                "resetAt": _rfc3339(reset_at(lim.window, now)),
            }
            for (tenant, lim), value in zip(rows, values, strict=True)
        ]


def models_using(
    models: Mapping[tuple[str, str], dict[str, Any]], namespace: str, policy: str
) -> list[tuple[str, str]]:
    """The InferenceModels (from the watch's cache) in `namespace` that name `policy`."""
    return [
        key
        for key, body in models.items()
        if key[0] == namespace and (body.get("spec") or {}).get("quotaPolicy") == policy
    ]


class PolicyReconciler:
    def __init__(
        self,
        kube: Kube,
        models: Mapping[tuple[str, str], dict[str, Any]],
        now: Callable[[], str] = utc_now,
        usage: UsageReader | None = None,
    ) -> None:
        self.kube = kube
        self.models = models
        self.now = now
        self.usage = usage or UsageReader(kube)

    async def reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        namespace, name = meta["namespace"], meta["name"]
        generation = int(meta.get("generation", 1))
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "models": len(models_using(self.models, namespace, name)),
        }
        reason: PolicyReason
        try:
            spec = parse_policy(body.get("spec"))
        except InvalidSpec as exc:
            ready, reason, message = False, "InvalidSpec", str(exc)
        else:
            names = {t.api_key_secret.name for t in spec.tenants}
            secrets = {s: await self.kube.get_secret(namespace, s) for s in sorted(names)}
            keys, missing = tenant_keys(spec, secrets)
            store = spec.backend.redis
            redis = store is not None
            status["tenants"] = len(keys)
            status["store"] = "redis" if redis else "memory"
            unreachable = None
            if store is not None:
                try:
                    status["usage"] = await self.usage.read(namespace, name, spec)
                except Exception as exc:  # the store, not the operator, is at fault
                    unreachable = (
                        f"Redis at {store.url} did not answer "
                        f"({type(exc).__name__}: {exc}); usage unknown"
                    )
            if missing:
                ready, reason = False, "SecretNotFound"
                message = "no API key for tenants: " + ", ".join(
                    f"{t.name} (Secret {t.api_key_secret.name}, key {t.api_key_secret.key})"
                    for t in missing
                )
            elif unreachable:
                ready, reason, message = False, "StoreUnreachable", unreachable
            else:
                ready, reason = True, "Ready"
                message = (
                    f"{len(spec.tenants)} tenants; usage counted in "
                    + (
                        "Redis, exact across replicas"
                        if redis
                        else "each replica's memory, inexact across replicas"
                    )
                    + (" (shadow: never refuses)" if spec.shadow else "")
                )
        previous = body.get("status") or {}
        condition = {
            "type": READY,
            "status": "True" if ready else "False",
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
        }
        status["conditions"] = set_condition(
            list(previous.get("conditions") or []), condition, self.now()
        )
        if status_changed(previous, status):
            await self.kube.patch_status(
                "kubeonnx.io/v1alpha1", "QuotaPolicy", namespace, name, status
            )
            body["status"] = status
