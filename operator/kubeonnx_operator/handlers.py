"""kopf wiring: watches feed the work queue; the queue runs the one reconcile.

Every trigger is level-based: an InferenceModel event (create, update, resume on start,
our own status write), an event on an owned child (deleted or edited by hand, a pod
changing state), or the periodic resync. The handlers store nothing on the objects: no
finalizers, no kopf annotations, so Argo CD sees only what it applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from typing import Any

import kopf
from lightkube import AsyncClient

from .config import OperatorConfig
from .kube import Kube
from .observed import ObservedChildren
from .policy import USAGE_EVERY_S, PolicyReconciler, models_using
from .reconcile import Reconciler
from .render.model import FIELD_MANAGER, MANAGED_BY, MODEL_LABEL
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

CHILD_RESOURCES = [
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "pods"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("networking.k8s.io", "v1", "ingresses"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("keda.sh", "v1alpha1", "scaledobjects"),
    ("", "v1", "secrets"),  # the runtime's quota configuration
]


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    state: dict[str, Any] = {}
    observed = ObservedChildren()
    policies: dict[tuple[str, str], dict[str, Any]] = {}  # QuotaPolicy bodies from the watch

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        client = AsyncClient(field_manager=FIELD_MANAGER)
        kube = Kube(client)
        reconciler = Reconciler(kube, config, observed, policies=policies)
        queue = WorkQueue(reconciler.reconcile)
        policy_queue = WorkQueue(PolicyReconciler(kube, queue.bodies).reconcile)
        state.update(client=client, queue=queue, policy_queue=policy_queue)
        loop = asyncio.get_running_loop()
        state["resync"] = loop.create_task(_resync([queue, policy_queue], config))
        state["usage"] = loop.create_task(_refresh_usage(policy_queue))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for name in ("resync", "usage"):
            task = state.get(name)
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for name in ("queue", "policy_queue"):
            if name in state:
                await state[name].idle()
        if "client" in state:
            await state["client"].close()

    @kopf.on.probe(id="reconciling", registry=registry)
    def probe(**_: Any) -> int:
        queue: WorkQueue | None = state.get("queue")
        return len(queue.bodies) if queue else 0

    @kopf.on.event("kubeonnx.io", "v1alpha1", "inferencemodels", registry=registry)
    async def model_event(
        event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
    ) -> None:
        queue: WorkQueue = state["queue"]
        assert namespace is not None  # InferenceModel is namespaced
        before = (queue.bodies.get((namespace, name)) or {}).get("spec") or {}
        if event.get("type") == "DELETED":
            queue.observe((namespace, name), None)
            observed.forget((namespace, name))
        else:
            queue.observe((namespace, name), copy.deepcopy(dict(body)))
        # A policy counts the models that name it.
        after = (body.get("spec") or {}) if event.get("type") != "DELETED" else {}
        for policy in {before.get("quotaPolicy"), after.get("quotaPolicy")} - {None}:
            state["policy_queue"].trigger((namespace, policy))

    @kopf.on.event("kubeonnx.io", "v1alpha1", "quotapolicies", registry=registry)
    async def policy_event(
        event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
    ) -> None:
        assert namespace is not None  # QuotaPolicy is namespaced
        key = (namespace, name)
        old = policies.get(key)
        if event.get("type") == "DELETED":
            policies.pop(key, None)
            state["policy_queue"].observe(key, None)
            changed = True
        else:
            generation = body["metadata"].get("generation")
            changed = old is None or old["metadata"].get("generation") != generation
            policies[key] = copy.deepcopy(dict(body))
            # Not for our own status writes (usage changes at every read of it).
            state["policy_queue"].observe(key, policies[key], trigger=changed)
        if changed:
            queue: WorkQueue = state["queue"]
            for model in models_using(queue.bodies, namespace, name):
                queue.trigger(model)

    async def child_event(
        event: kopf.RawEvent,
        body: kopf.Body,
        labels: kopf.Labels,
        namespace: str | None,
        **_: Any,
    ) -> None:
        owner = labels.get(MODEL_LABEL)
        if owner and namespace and "queue" in state:
            key = (namespace, owner)
            observed.record(key, dict(body), deleted=event.get("type") == "DELETED")
            state["queue"].trigger(key)

    for group, version, plural in CHILD_RESOURCES:
        kopf.on.event(
            group,
            version,
            plural,
            registry=registry,
            labels={"app.kubernetes.io/managed-by": MANAGED_BY, MODEL_LABEL: kopf.PRESENT},
        )(child_event)

    return registry


async def _refresh_usage(policy_queue: WorkQueue) -> None:
    """Re-read the usage of every Redis-backed QuotaPolicy into its status."""
    while True:
        await asyncio.sleep(USAGE_EVERY_S)
        for key, body in list(policy_queue.bodies.items()):
            if ((body.get("spec") or {}).get("backend") or {}).get("redis"):
                policy_queue.trigger(key)


async def _resync(queues: list[WorkQueue], config: OperatorConfig) -> None:
    """Re-run every reconcile now and then, so drift that no event reports is repaired (and
    a rotated API key in a tenant's Secret reaches the runtime's quota file)."""
    while True:
        await asyncio.sleep(config.resync_seconds)
        for queue in queues:
            queue.trigger_all()
