"""What the watches last saw of each InferenceModel's children and pods.

The reconciler reads pods and prunes children from here instead of listing them from the
API on every reconcile; each watch event also triggers a reconcile of the owner, so a
reconcile that ran on a slightly stale view runs again once the view catches up.
Only the fields the reconciler reads are kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .render.model import FIELD_MANAGER

Key = tuple[str, str]  # namespace, owner name


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def our_fields(obj: dict[str, Any]) -> str:
    """A digest of the fields the operator's server-side apply owns in `obj`. Another
    writer changing one of them takes it over, and the digest changes: that is drift."""
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply":
            return digest(entry.get("fieldsV1"))
    return ""


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str
    owner_uids: frozenset[str]
    fields: str  # our_fields() of the child as last seen


def _slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    status = pod.get("status") or {}
    return {
        "metadata": {"creationTimestamp": pod.get("metadata", {}).get("creationTimestamp")},
        "status": {
            k: status[k] for k in ("phase", "conditions", "containerStatuses") if k in status
        },
    }


def _slim_deployment(deployment: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"generation": deployment["metadata"].get("generation", 0)},
        "spec": {"replicas": deployment.get("spec", {}).get("replicas", 1)},
        "status": deployment.get("status") or {},
    }


class ObservedChildren:
    def __init__(self) -> None:
        self._children: dict[Key, dict[tuple[str, str, str], ChildRef]] = {}
        self._pods: dict[Key, dict[str, dict[str, Any]]] = {}
        self._deployments: dict[Key, dict[str, Any]] = {}

    def record(self, owner: Key, obj: dict[str, Any], deleted: bool) -> None:
        meta = obj["metadata"]
        if obj.get("kind") == "Pod":
            pods = self._pods.setdefault(owner, {})
            if deleted:
                pods.pop(meta["name"], None)
            else:
                pods[meta["name"]] = _slim_pod(obj)
            return
        ident = (obj["apiVersion"], obj["kind"], meta["name"])
        children = self._children.setdefault(owner, {})
        if deleted:
            children.pop(ident, None)
            if obj["kind"] == "Deployment":
                self._deployments.pop(owner, None)
        else:
            uids = frozenset(r.get("uid", "") for r in meta.get("ownerReferences") or [])
            children[ident] = ChildRef(*ident, uids, our_fields(obj))
            if obj["kind"] == "Deployment" and meta["name"] == owner[1]:
                self._deployments[owner] = _slim_deployment(obj)

    def forget(self, owner: Key) -> None:
        self._children.pop(owner, None)
        self._pods.pop(owner, None)
        self._deployments.pop(owner, None)

    def child(self, owner: Key, api_version: str, kind: str, name: str) -> ChildRef | None:
        return self._children.get(owner, {}).get((api_version, kind, name))

    def deployment(self, owner: Key) -> dict[str, Any] | None:
        return self._deployments.get(owner)

    def children(self, owner: Key) -> list[ChildRef]:
        return list(self._children.get(owner, {}).values())

    def pods(self, owner: Key) -> list[dict[str, Any]]:
        return list(self._pods.get(owner, {}).values())
