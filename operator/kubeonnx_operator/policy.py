"""QuotaPolicy status: which models use the policy, whether its Secrets are there, and where
usage is counted. The models themselves are reconciled by `reconcile.Reconciler`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .kube import Kube
from .quota import parse_policy, secret_keys
from .reconcile import status_changed, utc_now
from .spec import InvalidSpec
from .status import READY, set_condition

log = logging.getLogger(__name__)


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
    ) -> None:
        self.kube = kube
        self.models = models
        self.now = now

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
        try:
            spec = parse_policy(body.get("spec"))
        except InvalidSpec as exc:
            ready, reason, message = False, "InvalidSpec", str(exc)
        else:
            missing = []
            for tenant in spec.tenants:
                ref = tenant.api_key_secret
                secret = await self.kube.get_secret(namespace, ref.name)
                if secret is None or not secret_keys(secret, ref.key):
                    missing.append(f"{tenant.name} (Secret {ref.name}, key {ref.key})")
            redis = spec.backend.redis is not None
            status["tenants"] = len(spec.tenants) - len(missing)
            status["store"] = "redis" if redis else "memory (per replica, inexact)"
            if missing:
                ready, reason = False, "SecretNotFound"
                message = "no API key for tenants: " + ", ".join(missing)
            else:
                ready, reason = True, "Ready"
                message = (
                    f"{len(spec.tenants)} tenants; usage counted in "
                    + ("Redis, exact across replicas" if redis else "each replica's memory")
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
