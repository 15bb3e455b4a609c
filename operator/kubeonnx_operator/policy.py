"""QuotaPolicy status: which models use the policy, whether its tenants' Secrets exist, and
where usage is counted. The models themselves are reconciled by `reconcile.Reconciler`.

The operator never connects to the policy's Redis (it would have to hold its password, and
would connect wherever a policy's author points it): usage is the runtime's to tell
(`GET /v2/quota`, its metrics) and the ledger's (`kubeonnx usage`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from lightkube import ApiError

from .kube import Kube
from .presence import SecretPresence
from .quota import read_policy
from .reconcile import status_changed, utc_now
from .spec import InvalidSpec
from .status import FIELDS_IGNORED, READY, PolicyReason, set_condition
from .workqueue import Stopped

log = logging.getLogger(__name__)

MISSING_SHOWN = 5  # tenants named in the message; the rest are counted


def models_using(
    models: Mapping[tuple[str, str], dict[str, Any]], namespace: str, policy: str
) -> list[tuple[str, str]]:
    """The InferenceModels (from the watch's cache) in `namespace` that name `policy`."""
    return [
        key
        for key, body in models.items()
        if key[0] == namespace and (body.get("spec") or {}).get("quotaPolicy") == policy
    ]


def _key(body: dict[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def _ready_message(status: dict[str, Any]) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == READY:
            return str(cond.get("message") or "")
    return ""


class PolicyReconciler:
    def __init__(
        self,
        kube: Kube,
        models: Mapping[tuple[str, str], dict[str, Any]],
        now: Callable[[], str] = utc_now,
        secrets: SecretPresence | None = None,
    ) -> None:
        self.kube = kube
        self.models = models
        self.now = now
        self.secrets = secrets or SecretPresence(kube)

    async def reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        try:
            await self._reconcile(body)
        except Stopped:
            raise  # no longer the leader: the next one reports
        except Exception as exc:
            # As `Reconciler.reconcile`: shown on the policy (a stale Ready=True would hide
            # that the new generation was never checked), then retried with backoff.
            if isinstance(exc, ApiError):
                message = f"API error {exc.status.code}: {exc.status.message}"
            else:
                message = f"{type(exc).__name__}: {exc}"[:1024] if str(exc) else type(exc).__name__
            try:
                await self._write(body, {}, False, "ReconcileError", message)
            except Stopped:
                raise
            except Exception as again:
                log.warning("status of %s/%s not written: %s", *_key(body), again)
            raise

    async def _reconcile(self, body: dict[str, Any]) -> None:
        namespace, name = _key(body)
        status: dict[str, Any] = {
            "models": len(models_using(self.models, namespace, name)),
        }
        reason: PolicyReason
        try:
            spec, ignored = read_policy(body.get("spec"))
        except InvalidSpec as exc:
            ready, reason, message = False, "InvalidSpec", str(exc)
        else:
            absent = await self.secrets.missing(
                namespace, (t.api_key_secret.name for t in spec.tenants)
            )
            missing = [t for t in spec.tenants if t.api_key_secret.name in absent]
            redis = spec.backend.redis is not None
            status["tenants"] = len(spec.tenants) - len(missing)
            status["store"] = "redis" if redis else "memory"
            if missing:
                ready, reason = False, "SecretNotFound"
                message = "no API key Secret for tenants: " + ", ".join(
                    f"{t.name} (Secret {t.api_key_secret.name})" for t in missing[:MISSING_SHOWN]
                )
                if len(missing) > MISSING_SHOWN:
                    message += f", and {len(missing) - MISSING_SHOWN} more"
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
                if spec.tokens is not None:
                    message += "; " + spec.tokens_message()
            if ignored:  # written under a newer CRD: served without them, and said so
                unknown = (
                    "NOT applied, unknown to this operator (set under a newer CRD?): "
                    + ", ".join(ignored)
                )
                message += "; " + unknown
                if unknown not in _ready_message(body.get("status") or {}):
                    # Fail-open made loud, as for a model: one Warning per change.
                    await self.kube.event(body, "Warning", FIELDS_IGNORED, unknown[:1024])
        await self._write(body, status, ready, reason, message)

    async def _write(
        self,
        body: dict[str, Any],
        status: dict[str, Any],
        ready: bool,
        reason: PolicyReason,
        message: str,
    ) -> None:
        namespace, name = _key(body)
        generation = int(body["metadata"].get("generation", 1))
        previous = body.get("status") or {}
        if not status:  # a failure: the counts found before stay as they were
            status = {k: v for k, v in previous.items() if k != "conditions"}
        status["observedGeneration"] = generation
        status.setdefault("models", len(models_using(self.models, namespace, name)))
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
