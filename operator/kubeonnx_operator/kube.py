"""The one module that talks to the Kubernetes API (lightkube, async).

Every write passes the fence: a replica that does not hold the leader Lease raises
`Stopped` instead of writing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, codecs
from lightkube.codecs import resource_registry
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.selector import build_selector
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import Status
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
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateways",
}
# Cluster-scoped custom resources (read only).
_CUSTOM_GLOBAL = {("gateway.networking.k8s.io/v1", "GatewayClass"): "gatewayclasses"}
for (_api_version, _kind), _plural in _CUSTOM.items():
    _group, _, _version = _api_version.rpartition("/")
    create_namespaced_resource(_group, _version, _kind, _plural)
for (_api_version, _kind), _plural in _CUSTOM_GLOBAL.items():
    _group, _, _version = _api_version.rpartition("/")
    create_global_resource(_group, _version, _kind, _plural)

COMPONENT = "kubeonnx-operator"
# Asks the API server for an object's metadata only (no data, no spec).
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def resource(api_version: str, kind: str) -> Any:
    return resource_registry.load(api_version, kind)


def as_dict(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return result


def as_api_error(exc: httpx2.HTTPStatusError) -> ApiError:
    """An error answer without a Status body (the text/plain "404 page not found" of an API
    group not installed, such as KEDA's) as the ApiError lightkube raises for the others."""
    code = exc.response.status_code
    text = exc.response.text.strip()[:200] or exc.response.reason_phrase
    return ApiError(request=exc.request, status=Status(code=code, message=text))


def is_not_found(exc: ApiError) -> bool:
    return exc.status.code == 404


# A resourceVersion no object has: etcd's revision 1 is its empty store, and every write
# makes a new revision (see Kube.create_absent).
NO_OBJECT_VERSION = "1"
REQUEST_TIMEOUT_S = 10.0  # connect, send, each read, wait for a pooled connection
WATCH_READ_MARGIN_S = 30.0  # a watch's read timeout is this much above its server timeout


class ApiClient(AsyncClient):
    """lightkube's client, plus a watch that can neither hang nor miss a bookmark."""

    async def watch_events(
        self,
        res: Any,
        *,
        namespace: str,
        labels: dict[str, Any] | None,
        resource_version: str,
        timeout_s: int,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """One watch request: its events (as plain dicts) until the API server ends it after
        `timeout_s` (timeoutSeconds), which ends the iteration. Bookmarks are asked for, so
        the resourceVersion to resume from stays recent even for a quiet selector. The read
        timeout is above the server's, so a connection that stops delivering (half-open: a
        dead peer, a frozen load balancer) fails instead of holding the watch forever."""
        generic = self._client
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        if labels:
            params["labelSelector"] = build_selector(labels)
        request = generic.prepare_request("list", res=res, namespace=namespace, watch=True)
        timeout = httpx2.Timeout(REQUEST_TIMEOUT_S, read=timeout_s + WATCH_READ_MARGIN_S)
        http = generic._client.build_request(
            request.method, request.url, params={**request.params, **params}, timeout=timeout
        )
        response = await generic.send(http, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                generic.raise_for_status(response)
            async for line in response.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":  # 410 Gone: resume from a list instead
                    status = Status.from_dict(event.get("object") or {})
                    raise ApiError(status=status)  # type: ignore[arg-type]
                yield event["type"], event["object"]
        finally:
            await response.aclose()


class _Transport(httpx2.AsyncHTTPTransport):
    """Sends every request with the replica's own User-Agent, so the API server's audit log
    tells which replica wrote what."""

    def __init__(self, user_agent: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user_agent = user_agent

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.headers["User-Agent"] = self.user_agent
        return await super().handle_async_request(request)


def connect(
    *,
    connections: int,
    user_agent: str,
    timeout_s: float = REQUEST_TIMEOUT_S,
    config: SingleConfig | None = None,
) -> ApiClient:
    """A client with a pool of `connections` (every watch holds one for its whole length,
    so the pool is sized from the watches: a full pool would queue writes and time them
    out). Config: in a pod its service account, else KUBECONFIG or ~/.kube/config."""
    config = config or KubeConfig.from_env().get()
    assert config is not None and config.user is not None, "the kubeconfig names no user"
    transport = _Transport(
        user_agent,
        verify=verify_cluster(config.cluster, config.user, config.abs_file),
        limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
    )
    return ApiClient(
        config,
        timeout=httpx2.Timeout(timeout_s),
        field_manager=FIELD_MANAGER,
        transport=transport,
    )


class Kube:
    """Typed-enough access to the API: apply, delete, status, events."""

    def __init__(
        self,
        client: AsyncClient,
        write_budget: Callable[[], float] = lambda: math.inf,
        identity: str = COMPONENT,
    ) -> None:
        self.client = client
        # Seconds a write may still take before another replica may lead (0: it may not
        # write at all). See leader.LeaderElector.write_budget.
        self.write_budget = write_budget
        self.identity = identity

    def _fence(self, verb: str) -> float:
        """Open: the seconds this write may take; closed: Stopped, nothing sent."""
        budget = self.write_budget()
        if budget <= 0:
            raise Stopped(f"not the leader: {verb} not sent")
        metrics.API_WRITES.labels(verb).inc()
        return budget

    async def _call(
        self, call: Any, budget: float = math.inf, answers: tuple[int, ...] = (404,)
    ) -> Any:
        try:
            # A write that passed the fence is abandoned if it has not been answered when
            # the Lease could pass to another replica: a slow pool, connect or server can
            # delay it past the fence, never past the Lease.
            async with asyncio.timeout(None if math.isinf(budget) else budget):
                try:
                    return await call
                except ApiError:
                    raise
                except httpx2.HTTPStatusError as exc:
                    raise as_api_error(exc) from exc
        except TimeoutError:
            metrics.API_ERRORS.labels("timeout").inc()
            raise
        except ApiError as exc:
            if exc.status.code not in answers:  # a 404 is an answer (absent), not a failure
                metrics.API_ERRORS.labels(str(exc.status.code)).inc()
            raise

    async def apply(
        self,
        manifest: dict[str, Any],
        *,
        manager: str = FIELD_MANAGER,
        answers: tuple[int, ...] = (404,),
    ) -> dict[str, Any]:
        """Server-side apply with the operator's field manager; returns the live object."""
        budget = self._fence("apply")
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
            ),
            budget,
            answers,
        )
        return as_dict(obj)

    async def create_absent(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Server-side apply that only creates: the object it created, or None when the name
        is taken (by anyone's object, which is left untouched). The apply carries a
        resourceVersion no object has (etcd's revision 1 is its empty store): the API server
        creates an absent object, and holds an existing one to the precondition, refusing
        it with 409 Conflict. One request where a look-up and an apply take two."""
        meta = manifest["metadata"]
        precondition = {**manifest, "metadata": {**meta, "resourceVersion": NO_OBJECT_VERSION}}
        try:
            return await self.apply(precondition, answers=(404, 409))
        except ApiError as exc:
            if exc.status.code == 409:
                return None
            raise

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        metrics.API_READS.labels("get", kind).inc()
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
        budget = self._fence("delete")
        res = resource(api_version, kind)
        try:
            if uid is None:
                await self._call(self.client.delete(res, name, namespace=namespace), budget)
            else:
                await self._call(self._delete_uid(res, namespace, name, uid), budget)
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

    async def secret_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret's metadata alone (a PartialObjectMetadata), or None when it does not
        exist: the API server leaves its data out, so the operator never receives a key."""
        return await self.metadata("Secret", namespace, name)

    async def metadata(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The metadata alone (a PartialObjectMetadata) of a core (v1) object, or None when it
        does not exist."""
        metrics.API_READS.labels("get", kind).inc()
        generic = self.client._client
        request = generic.prepare_request(
            "get",
            res=resource("v1", kind),
            name=name,
            namespace=namespace,
            headers={"Accept": PARTIAL_METADATA},
        )
        response = await generic.send(generic.build_adapter_request(request))
        if response.status_code == 404:
            return None
        try:
            generic.raise_for_status(response)
        except ApiError as exc:
            metrics.API_ERRORS.labels(str(exc.status.code)).inc()
            raise
        found: dict[str, Any] = response.json()
        if found.get("kind") != "PartialObjectMetadata":  # never keep what was not asked for
            raise ValueError(f"{kind} {namespace}/{name}: the API server sent {found.get('kind')}")
        return found

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        budget = self._fence("status")
        try:
            await self._call(
                self.client.patch(
                    resource(api_version, kind).Status,
                    name,
                    {"status": status},
                    namespace=namespace,
                    patch_type=PatchType.MERGE,
                ),
                budget,
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
        budget = self._fence("event")
        try:
            await self._call(self.client.create(codecs.from_dict(event)), budget)
        except ApiError as exc:
            log.warning(
                "Event %s on %s/%s not posted: %s", reason, meta["namespace"], meta["name"], exc
            )
            return
        metrics.EVENTS.labels(type_, reason).inc()
