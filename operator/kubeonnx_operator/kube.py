"""The one module that talks to the Kubernetes API (lightkube, async).

Every write passes the fence: a replica that does not hold the leader Lease raises
`Stopped` instead of writing.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from lightkube import ApiError, AsyncClient, codecs
from lightkube.codecs import resource_registry
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from . import metrics
from .render.model import FIELD_MANAGER
from .workqueue import Stopped

log = logging.getLogger(__name__)

# The kinds the operator reads or writes, by (apiVersion, kind).
# Custom resources get generic classes; built-in kinds use lightkube's own.
_CUSTOM = {
    ("kubeonnx.io/v1alpha1", "InferenceModel"): "inferencemodels",
    ("kubeonnx.io/v1alpha1", "QuotaPolicy"): "quotapolicies",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
}
for (_api_version, _kind), _plural in _CUSTOM.items():
    _group, _, _version = _api_version.rpartition("/")
    create_namespaced_resource(_group, _version, _kind, _plural)

COMPONENT = "kubeonnx-operator"


def resource(api_version: str, kind: str) -> Any:
    return resource_registry.load(api_version, kind)


def as_dict(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return result


def is_not_found(exc: ApiError) -> bool:
    return exc.status.code == 404


class Kube:
    """Typed-enough access to the API: apply, delete, status, events."""

    def __init__(
        self,
        client: AsyncClient,
        may_write: Callable[[], bool] = lambda: True,
        identity: str = COMPONENT,
    ) -> None:
        self.client = client
        self.may_write = may_write
        self.identity = identity

    def _fence(self, verb: str) -> None:
        if not self.may_write():
            raise Stopped(f"not the leader: {verb} not sent")
        metrics.API_WRITES.labels(verb).inc()

    async def _call(self, call: Any) -> Any:
        try:
            return await call
        except ApiError as exc:
            if not is_not_found(exc):  # a 404 is an answer (absent), not a failure
                metrics.API_ERRORS.labels(str(exc.status.code)).inc()
            raise

    async def apply(
        self, manifest: dict[str, Any], *, manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        """Server-side apply with the operator's field manager; returns the live object."""
        self._fence("apply")
        meta = manifest["metadata"]
        obj = await self._call(
            self.client.patch(
                resource(manifest["apiVersion"], manifest["kind"]),
                meta["name"],
                manifest,  # as a dict: a partial manifest (the replicas hand-over) is valid
                namespace=meta["namespace"],
                patch_type=PatchType.APPLY,
                field_manager=manager,
                force=True,
            )
        )
        return as_dict(obj)

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            obj = await self._call(
                self.client.get(resource(api_version, kind), name, namespace=namespace)
            )
        except ApiError as exc:
            if is_not_found(exc):
                return None
            raise
        return as_dict(obj)

    async def delete(
        self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None
    ) -> None:
        """Delete; with `uid`, only that object (not one re-created under the same name)."""
        self._fence("delete")
        res = resource(api_version, kind)
        try:
            if uid is None:
                await self._call(self.client.delete(res, name, namespace=namespace))
            else:
                await self._call(self._delete_uid(res, namespace, name, uid))
        except ApiError as exc:
            # Gone, or (409) the name now holds another object: either way not ours to delete.
            if not is_not_found(exc) and exc.status.code != 409:
                raise

    async def _delete_uid(self, res: Any, namespace: str, name: str, uid: str) -> None:
        # lightkube's delete takes no DeleteOptions body; build the same request with one.
        generic = self.client._client
        request = generic.prepare_request("delete", res=res, name=name, namespace=namespace)
        request.data = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        response = await generic.send(generic.build_adapter_request(request))
        generic.handle_response("delete", response, request)

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get("v1", "Secret", namespace, name)

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        self._fence("status")
        try:
            await self._call(
                self.client.patch(
                    resource(api_version, kind).Status,
                    name,
                    {"status": status},
                    namespace=namespace,
                    patch_type=PatchType.MERGE,
                )
            )
        except ApiError as exc:
            if not is_not_found(exc):  # deleted meanwhile: nothing to report on
                raise

    async def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.patch_status("kubeonnx.io/v1alpha1", "InferenceModel", namespace, name, status)

    async def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about `body` (what `kubectl describe` shows). Best effort:
        an Event that cannot be posted is logged, never a reason to fail a reconcile."""
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{secrets.token_hex(8)}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": f"kubeonnx.io/{COMPONENT}",
            "reportingInstance": self.identity[:128],
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }
        self._fence("event")
        try:
            await self._call(self.client.create(codecs.from_dict(event)))
        except ApiError as exc:
            log.warning(
                "Event %s on %s/%s not posted: %s", reason, meta["namespace"], meta["name"], exc
            )
            return
        metrics.EVENTS.labels(type_, reason).inc()
