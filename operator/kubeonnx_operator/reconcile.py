"""One level-based reconcile of an InferenceModel: render, apply, prune, observe, report.

Running it twice changes nothing: applies of unchanged manifests are no-ops on the server,
and status is written only when what was derived differs from what is there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from lightkube import ApiError

from .config import OperatorConfig
from .kube import Kube, is_not_found
from .observed import ObservedChildren, digest, our_fields
from .quota import QuotaProblem, ResolvedQuota, resolve_quota, secret_names
from .render import Model, render_children
from .render.model import load_model
from .spec import InvalidSpec
from .status import Verdict, derive_status, derive_verdict

log = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def status_changed(previous: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(previous.get(k) != v for k, v in new.items())


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        observed: ObservedChildren,
        now: Callable[[], str] = utc_now,
        policies: dict[tuple[str, str], dict[str, Any]] | None = None,
    ) -> None:
        self.kube = kube
        self.observed = observed
        # QuotaPolicy bodies by (namespace, name), kept current by their watch.
        self.policies = policies if policies is not None else {}
        # What was last applied to each child: (digest of the manifest, our_fields of the
        # result). In memory only: after a restart every child is applied once again.
        self.applied: dict[tuple[str, str, str, str], tuple[str, str]] = {}
        self.config = config
        self.now = now

    async def reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return  # the garbage collector removes the children
        name, namespace = meta["name"], meta["namespace"]
        try:
            model = load_model(name, namespace, body.get("spec"), self.config)
        except InvalidSpec as exc:
            log.warning("InferenceModel %s/%s: invalid spec: %s", namespace, name, exc)
            await self._report(body, Verdict(False, "InvalidSpec", str(exc)))
            return

        key = (namespace, name)
        if model.spec.quota_policy:
            resolved = await self._resolve_quota(model)
            if isinstance(resolved, Verdict):
                # Not served without the budgets it names: nothing is applied until they
                # can be; what runs already keeps running as it was.
                await self._report(body, resolved, self.observed.deployment(key), model)
                return
            model = dataclasses.replace(model, quota=resolved)

        owner = owner_reference(body)
        rendered: set[tuple[str, str]] = set()
        deployment: dict[str, Any] | None = None
        problem: Verdict | None = None
        for child in render_children(model, self.config):
            child["metadata"]["ownerReferences"] = [owner]
            kind = (child["apiVersion"], child["kind"])
            rendered.add(kind)
            try:
                live = await self._apply_if_needed(key, child)
            except ApiError as exc:
                if exc.status.code == 403 and "being terminated" in (exc.status.message or ""):
                    return  # the namespace is going away, and the model with it
                if child["kind"] == "ScaledObject" and is_not_found(exc):
                    problem = Verdict(
                        False,
                        "KedaNotInstalled",
                        "autoscaler keda needs KEDA (keda.sh/v1alpha1 ScaledObject) in the cluster",
                    )
                    continue
                if exc.status.code in (400, 422):  # the API server refused what we rendered
                    problem = Verdict(
                        False, "InvalidSpec", f"{child['kind']} refused: {exc.status.message}"
                    )
                    continue
                raise
            if child["kind"] == "Deployment":
                deployment = live or self.observed.deployment(key)
        await self._prune(model, body["metadata"]["uid"], rendered)

        pods = self.observed.pods((namespace, name))
        verdict = derive_verdict(deployment, pods, model.spec.scaling.min_replicas)
        if problem is not None:  # a child we could not create outranks what the pods show
            verdict = problem
        await self._report(body, verdict, deployment, model)

    async def _resolve_quota(self, model: Model) -> ResolvedQuota | Verdict:
        """The runtime's quota file for the model's QuotaPolicy, with every tenant's API keys
        hashed; or the verdict that says what is missing."""
        name, namespace = model.spec.quota_policy or "", model.namespace
        policy = self.policies.get((namespace, name))
        secrets = {
            secret: await self.kube.get_secret(namespace, secret)
            for secret in sorted(secret_names(policy))
        }
        try:
            return resolve_quota(name, namespace, policy, secrets, model.spec.scaling.max_replicas)
        except QuotaProblem as problem:
            return Verdict(False, problem.reason, str(problem))

    async def _apply_if_needed(
        self, key: tuple[str, str], manifest: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply unless the watch shows the child as last applied, untouched since: an idle
        resync then sends nothing. Returns the live object when it applied."""
        meta = manifest["metadata"]
        ident = (manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        wanted = digest(manifest)
        seen = self.observed.child(key, manifest["apiVersion"], manifest["kind"], meta["name"])
        if seen is not None and self.applied.get(ident) == (wanted, seen.fields):
            return None
        live = await self.kube.apply(manifest)
        self.applied[ident] = (wanted, our_fields(live))
        return live

    async def _prune(self, model: Model, owner_uid: str, keep: set[tuple[str, str]]) -> None:
        """Delete children this model owns that were not rendered this time."""
        for child in self.observed.children((model.namespace, model.name)):
            if (child.api_version, child.kind) in keep or owner_uid not in child.owner_uids:
                continue
            log.info(
                "deleting %s %s/%s: no longer rendered", child.kind, model.namespace, child.name
            )
            await self.kube.delete(child.api_version, child.kind, model.namespace, child.name)

    async def _report(
        self,
        body: dict[str, Any],
        verdict: Verdict,
        deployment: dict[str, Any] | None = None,
        model: Model | None = None,
    ) -> None:
        """Write the derived status, only when it differs from what the object has."""
        previous = body.get("status") or {}
        status = derive_status(
            generation=int(body["metadata"].get("generation", 1)),
            previous=previous,
            verdict=verdict,
            deployment=deployment,
            url=model.url(self.config) if model else None,
            external_url=model.external_url() if model else None,
            now=self.now(),
        )
        if status_changed(previous, status):
            meta = body["metadata"]
            await self.kube.patch_model_status(meta["namespace"], meta["name"], status)
            body["status"] = status
