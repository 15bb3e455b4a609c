"""The one module that talks to the Kubernetes API (lightkube, async)."""

from __future__ import annotations

from typing import Any

from lightkube import ApiError, AsyncClient, codecs
from lightkube.codecs import resource_registry
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from .render.model import FIELD_MANAGER

# The kinds the operator reads or writes, by (apiVersion, kind).
# Custom resources get generic classes; built-in kinds use lightkube's own.
_CUSTOM = {
    ("kubeonnx.io/v1alpha1", "InferenceModel"): "inferencemodels",
    ("kubeonnx.io/v1alpha1", "QuotaPolicy"): "quotapolicies",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
}
for (_api_version, _kind), _plural in _CUSTOM.items():
    _group, _, _version = _api_version.rpartition("/")
    create_namespaced_resource(_group, _version, _kind, _plural)


def _resource(api_version: str, kind: str) -> Any:
    return resource_registry.load(api_version, kind)


def _as_dict(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return result


def is_not_found(exc: ApiError) -> bool:
    return exc.status.code == 404


class Kube:
    """Typed-enough access to the API: apply, delete, status."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply with the operator's field manager; returns the live object."""
        obj = await self.client.apply(
            codecs.from_dict(manifest), field_manager=FIELD_MANAGER, force=True
        )
        return _as_dict(obj)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            await self.client.delete(_resource(api_version, kind), name, namespace=namespace)
        except ApiError as exc:
            if not is_not_found(exc):
                raise

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        from lightkube.resources.core_v1 import Secret

        try:
            return _as_dict(await self.client.get(Secret, name, namespace=namespace))
        except ApiError as exc:
            if is_not_found(exc):
                return None
            raise

    async def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        try:
            await self.client.patch(
                _resource(api_version, kind).Status,
                name,
                {"status": status},
                namespace=namespace,
                patch_type=PatchType.MERGE,
            )
        except ApiError as exc:
            if not is_not_found(exc):  # deleted meanwhile: nothing to report on
                raise

    async def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self.patch_status("kubeonnx.io/v1alpha1", "InferenceModel", namespace, name, status)
