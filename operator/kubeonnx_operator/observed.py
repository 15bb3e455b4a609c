"""What the watches last saw of each InferenceModel's children and pods.

The reconciler reads pods and prunes children from here instead of listing them from the
API on every reconcile; each watch event also triggers a reconcile of the owner, so a
reconcile that ran on a slightly stale view runs again once the view catches up.
Only the fields the reconciler reads are kept. Objects are removed by UID: the events of a
child deleted and re-created under its name may arrive in either order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .render.model import FIELD_MANAGER, GATEWAY_SUFFIX, ROUTER_SUFFIX
from .render.versions import VERSION_LABEL, VERSION_OF_LABEL

Key = tuple[str, str]  # namespace, owner name


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def _our_entry(obj: dict[str, Any]) -> dict[str, Any] | None:
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply":
            return dict(entry)
    return None


# On every child: the digest of the manifest last applied to it (the annotation left out),
# so that an operator that restarts knows what it had applied without applying it again.
APPLIED_ANNOTATION = "kubeonnx.io/applied"
# What server-side apply never records as owned (the object's identity and bookkeeping).
_UNOWNED = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}


def _owned_paths(fields: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The paths a fieldsV1 owns, down to the first list element (a list's elements are
    the list's path)."""
    out: set[tuple[str, ...]] = set()
    for key, sub in fields.items():
        if key == ".":
            continue
        if not key.startswith("f:"):  # k:, v:, i: an element of the list `prefix`
            out.add(prefix)
            continue
        path = (*prefix, key[2:])
        below = _owned_paths(sub, path) if isinstance(sub, dict) else set()
        out |= below or {path}
    return out


def manifest_paths(value: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The paths an apply of `value` owns, as _owned_paths reads them from the result:
    each scalar, list and empty map (a null is no field)."""
    if not isinstance(value, dict) or not value:
        return set() if prefix in _UNOWNED else {prefix}
    out: set[tuple[str, ...]] = set()
    for key, sub in value.items():
        if sub is not None:
            out |= manifest_paths(sub, (*prefix, key))
    return out


# Children of one kind and spec shape own the same paths: one copy of each set is kept.
_PATH_SETS: dict[frozenset[tuple[str, ...]], frozenset[tuple[str, ...]]] = {}


def owned_paths(obj: dict[str, Any]) -> frozenset[tuple[str, ...]]:
    """The paths the operator's apply owns in `obj` (empty if none): an atomic field (a
    selector) is one path, however deep the manifest sets it."""
    entry = _our_entry(obj)
    paths = frozenset(_owned_paths(entry.get("fieldsV1") or {})) if entry else frozenset()
    return _PATH_SETS.setdefault(paths, paths)


def owns_exactly(owned: frozenset[tuple[str, ...]], manifest: dict[str, Any]) -> bool:
    """Whether `owned` is what an apply of `manifest` owns: each of its fields is owned
    (itself, or the atomic field it is in), and nothing else is."""
    wanted = manifest_paths(manifest)
    prefixes = {path[:i] for path in wanted for i in range(1, len(path) + 1)}
    return owned <= prefixes and all(
        any(path[:i] in owned for i in range(1, len(path) + 1)) for path in wanted
    )


def our_fields(obj: dict[str, Any]) -> str:
    """A digest of the fields the operator's server-side apply owns in `obj`. Another
    writer changing one of them takes it over, and the digest changes: that is drift."""
    entry = _our_entry(obj)
    return digest(entry.get("fieldsV1")) if entry else ""


def owns_replicas(obj: dict[str, Any]) -> bool:
    """Whether the operator's apply owns the Deployment's spec.replicas."""
    entry = _our_entry(obj) or {}
    return "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str
    uid: str
    owner_uids: frozenset[str]
    fields: str  # our_fields() of the child as last seen
    # Its APPLIED_ANNOTATION, and owned_paths(): with both, a restarted operator tells a
    # child left as it applied it (nothing to send) from one changed since.
    applied: str = ""
    owned: frozenset[tuple[str, ...]] = frozenset()


def _slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    status = pod.get("status") or {}
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    return {
        "metadata": {
            "creationTimestamp": meta.get("creationTimestamp"),
            # Which version's Deployment it is of: None for the first stable's (see versions).
            "version": labels.get(VERSION_LABEL) if VERSION_OF_LABEL in labels else None,
        },
        "status": {
            k: status[k] for k in ("phase", "conditions", "containerStatuses") if k in status
        },
    }


def slim_deployment(deployment: dict[str, Any]) -> dict[str, Any]:
    meta = deployment["metadata"]
    version = (meta.get("labels") or {}).get(VERSION_LABEL)
    return {
        "metadata": {
            "name": meta.get("name"),
            "generation": meta.get("generation", 0),
            "uid": meta.get("uid"),
            "version": version,
            # The version its (immutable) selector names: a stable Deployment rolled in
            # place to a new version keeps selecting its pods by the version it began with.
            "selects": (deployment.get("spec", {}).get("selector") or {})
            .get("matchLabels", {})
            .get(VERSION_LABEL),
        },
        "spec": {"replicas": deployment.get("spec", {}).get("replicas", 1)},
        "status": deployment.get("status") or {},
        "ownsReplicas": owns_replicas(deployment),
    }


class ObservedChildren:
    def __init__(self) -> None:
        self._children: dict[Key, dict[tuple[str, str, str], ChildRef]] = {}
        self._pods: dict[Key, dict[str, dict[str, Any]]] = {}  # by pod UID
        # The runtime's Deployments of each model (one per version), by name.
        self._deployments: dict[Key, dict[str, dict[str, Any]]] = {}
        self._gateways: dict[Key, dict[str, Any]] = {}  # the async gateway's Deployment
        self._routers: dict[Key, dict[str, Any]] = {}  # the router's Deployment (versions)
        # The selector of Service NAME: the stable's pods or the router's.
        self._service_selectors: dict[Key, dict[str, str]] = {}

    def record(self, owner: Key, obj: dict[str, Any], deleted: bool) -> None:
        meta = obj["metadata"]
        uid = meta.get("uid", "")
        if obj.get("kind") == "Pod":
            pods = self._pods.setdefault(owner, {})
            if deleted:
                pods.pop(uid, None)
            else:
                pods[uid] = _slim_pod(obj)
            return
        ident = (obj["apiVersion"], obj["kind"], meta["name"])
        children = self._children.setdefault(owner, {})
        if deleted:
            seen = children.get(ident)
            if seen is not None and seen.uid == uid:
                del children[ident]
            for kept in (self._gateways, self._routers):
                seen_one = kept.get(owner)
                if seen_one is not None and seen_one["metadata"]["uid"] == uid:
                    del kept[owner]
            if obj.get("kind") == "Service" and meta["name"] == owner[1]:
                self._service_selectors.pop(owner, None)
            versions = self._deployments.get(owner, {})
            deployment = versions.get(meta["name"])
            if deployment is not None and deployment["metadata"]["uid"] == uid:
                del versions[meta["name"]]
        else:
            uids = frozenset(r.get("uid", "") for r in meta.get("ownerReferences") or [])
            applied = (meta.get("annotations") or {}).get(APPLIED_ANNOTATION, "")
            children[ident] = ChildRef(
                *ident, uid, uids, our_fields(obj), str(applied), owned_paths(obj)
            )
            if obj["kind"] == "Service" and meta["name"] == owner[1]:
                self._service_selectors[owner] = dict((obj.get("spec") or {}).get("selector") or {})
            if obj["kind"] != "Deployment":
                return
            if meta["name"] == f"{owner[1]}{ROUTER_SUFFIX}":
                self._routers[owner] = slim_deployment(obj)
                return
            if meta["name"] == f"{owner[1]}{GATEWAY_SUFFIX}":
                self._gateways[owner] = slim_deployment(obj)
            elif meta["name"] == owner[1] or VERSION_LABEL in (meta.get("labels") or {}):
                self._deployments.setdefault(owner, {})[meta["name"]] = slim_deployment(obj)

    def forget(self, owner: Key) -> None:
        self._children.pop(owner, None)
        self._pods.pop(owner, None)
        self._deployments.pop(owner, None)
        self._gateways.pop(owner, None)
        self._routers.pop(owner, None)
        self._service_selectors.pop(owner, None)

    def child(self, owner: Key, api_version: str, kind: str, name: str) -> ChildRef | None:
        return self._children.get(owner, {}).get((api_version, kind, name))

    def deployment(self, owner: Key, name: str | None = None) -> dict[str, Any] | None:
        """The runtime Deployment `name` (default: the one named after the model)."""
        return self._deployments.get(owner, {}).get(name or owner[1])

    def deployments(self, owner: Key) -> dict[str, dict[str, Any]]:
        """The model's runtime Deployments by name (each version's)."""
        return dict(self._deployments.get(owner, {}))

    def gateway(self, owner: Key) -> dict[str, Any] | None:
        return self._gateways.get(owner)

    def router(self, owner: Key) -> dict[str, Any] | None:
        """The router's Deployment, as the watch last showed it."""
        return self._routers.get(owner)

    def service_selector(self, owner: Key) -> dict[str, str] | None:
        """The selector of Service NAME, as the watch last showed it."""
        return self._service_selectors.get(owner)

    def children(self, owner: Key) -> list[ChildRef]:
        return list(self._children.get(owner, {}).values())

    def pods(self, owner: Key, version: str | None = None) -> list[dict[str, Any]]:
        """The pods of one Deployment of the model: the first stable's (`version` None, as
        it always was), or the one of `version` that selects by version."""
        pods = self._pods.get(owner, {}).values()
        return [p for p in pods if p["metadata"].get("version") == version]
