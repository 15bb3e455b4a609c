"""The operator: watches feed the work queues; the queues run the one reconcile.

Every trigger is level-based: an InferenceModel event (create, update, the listing on
start, our own status write), an event on an owned child (deleted or edited by hand, a pod
changing state), or the periodic resync. The handlers store nothing on the objects: no
finalizers, no annotations, so Argo CD sees only what it applied.

kopf runs the process (login, start-up, clean-up, signals); the watches are
`informer.Informer`s, with server-side label selectors and relists that notice what
vanished. Every replica watches; only the one holding the Lease reconciles and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

import kopf
from lightkube import AsyncClient, operators

from . import metrics
from .config import OperatorConfig
from .informer import Informer
from .kube import COMPONENT, ApiClient, Kube, connect
from .leader import LeaderElector, default_identity, default_namespace
from .observed import ObservedChildren
from .policy import PolicyReconciler, models_using
from .presence import SecretPresence
from .reconcile import Reconciler
from .render.model import MANAGED_BY, MODEL_LABEL
from .render.versions import VERSION_OF_LABEL
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

# (apiVersion, kind, optional: its CRD may be absent)
CHILD_KINDS = [
    ("apps/v1", "Deployment", False),
    ("v1", "Service", False),
    ("v1", "Pod", False),
    ("autoscaling/v2", "HorizontalPodAutoscaler", False),
    ("networking.k8s.io/v1", "Ingress", False),
    ("policy/v1", "PodDisruptionBudget", False),
    ("keda.sh/v1alpha1", "ScaledObject", True),
    ("monitoring.coreos.com/v1", "PodMonitor", True),
    ("gateway.networking.k8s.io/v1", "HTTPRoute", True),
    ("v1", "ConfigMap", False),  # the runtime's quota file
]
API_VERSION = "kubeonnx.io/v1alpha1"
# A watch failing this long (its kind cannot even be listed) makes the replica not ready.
WATCH_DOWN_LIMIT_S = 120.0
# Only what the operator made: selected by the API server, not filtered here.
CHILD_SELECTOR = {"app.kubernetes.io/managed-by": MANAGED_BY, MODEL_LABEL: operators.exists()}
# The pods of every version's Deployment but the first stable's carry the model's name in
# another label (their selectors must not overlap): a watch of their own.
VERSION_POD_SELECTOR = {
    "app.kubernetes.io/managed-by": MANAGED_BY,
    VERSION_OF_LABEL: operators.exists(),
}


def watch_count(namespaces: list[str]) -> int:
    return max(1, len(namespaces)) * (3 + len(CHILD_KINDS))


def connections(config: OperatorConfig, namespaces: list[str]) -> int:
    """The pool of the main client: a connection per watch (each holds one for its whole
    length), one per reconcile that may run at once (both queues), and a few for the
    list, Events and status writes between them."""
    return watch_count(namespaces) + 2 * config.max_concurrent_reconciles + 8


class Controller:
    def __init__(
        self,
        client: ApiClient,
        config: OperatorConfig,
        namespaces: list[str],
        *,
        lease_client: AsyncClient | None = None,
        identity: str | None = None,
    ) -> None:
        self.config = config
        identity = identity or default_identity()
        self.elector: LeaderElector | None = None
        if config.leader_election:
            self.elector = LeaderElector(
                lease_client or client,
                config.lease_namespace or default_namespace(),
                config.lease_name,
                identity,
            )
        self.kube = Kube(
            client, self.elector.write_budget if self.elector else lambda: math.inf, identity
        )
        self.observed = ObservedChildren()
        limit = config.max_concurrent_reconciles
        # Shared by both reconcilers: a tenant's Secret is asked about once for all.
        self.secrets = SecretPresence(self.kube)
        self.reconciler = Reconciler(
            self.kube,
            config,
            self.observed,
            pod_monitor=self._pod_monitor,
            secrets=self.secrets,
            requeue=lambda key, after: self.queue.requeue_after(key, after),
        )
        self.queue = WorkQueue(
            self.reconciler.reconcile, kind="InferenceModel", max_concurrent=limit, running=False
        )
        self.policy_queue = WorkQueue(
            PolicyReconciler(self.kube, self.queue.bodies, secrets=self.secrets).reconcile,
            kind="QuotaPolicy",
            max_concurrent=limit,
            running=False,
        )
        # QuotaPolicy bodies, as their watch keeps them in the policy queue.
        self.reconciler.policies = self.policy_queue.bodies
        self.informers: list[Informer] = []
        self.failure: str | None = None  # a background task that ended (see alive())
        lock = asyncio.Lock()
        for namespace in list[str | None](namespaces) or [None]:
            for kind, on_event in (
                ("InferenceModel", self._model_event),
                ("QuotaPolicy", self._policy_event),
            ):
                self.informers.append(
                    Informer(
                        client,
                        on_event,
                        namespace=namespace,
                        api_version=API_VERSION,
                        kind=kind,
                        list_lock=lock,
                        watch_timeout_s=config.watch_timeout_seconds,
                    )
                )
            watched = [(*kind, CHILD_SELECTOR) for kind in CHILD_KINDS]
            for api_version, kind, optional, labels in [
                *watched,
                ("v1", "Pod", False, VERSION_POD_SELECTOR),
            ]:
                self.informers.append(
                    Informer(
                        client,
                        self._child_event,
                        namespace=namespace,
                        labels=labels,
                        api_version=api_version,
                        kind=kind,
                        optional=optional,
                        list_lock=lock,
                        watch_timeout_s=config.watch_timeout_seconds,
                    )
                )

    def _pod_monitor(self) -> bool:
        return any(i.kind == "PodMonitor" and i.installed for i in self.informers)

    def alive(self) -> str | None:
        """None while every background task runs; else which one ended, and how."""
        return self.failure

    def supervise(self, task: asyncio.Task[None], what: str) -> asyncio.Task[None]:
        """A task that should run until cancelled: if it ends, /healthz turns red, so the
        kubelet restarts the process rather than leave it half working."""

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled() or self.failure:
                return
            exc = task.exception()
            self.failure = f"{what} ended: {exc!r}" if exc else f"{what} ended"
            log.error("%s; /healthz now fails", self.failure, exc_info=exc)

        task.add_done_callback(ended)
        return task

    def ready(self) -> str | None:
        """None once every watch has listed its kind and none has been down for minutes;
        else what is still listing, or down."""
        waiting = [i.what for i in self.informers if not i.synced.is_set()]
        if waiting:
            return f"listing {', '.join(waiting)}"
        down = [
            f"{i.what} for {i.down_for():.0f}s"
            for i in self.informers
            if i.down_for() > WATCH_DOWN_LIMIT_S
        ]
        return f"watch down: {', '.join(down)}" if down else None

    async def run(self) -> None:
        tasks = [
            self.supervise(asyncio.create_task(i.run()), f"the watch of {i.what}")
            for i in self.informers
        ]
        tasks.append(self.supervise(asyncio.create_task(self._resync()), "the resync"))
        try:
            # No apply before every cache is filled: a child not yet seen would look absent.
            await asyncio.gather(*(i.synced.wait() for i in self.informers))
            log.info("caches synced: %d objects watched", sum(len(i.known) for i in self.informers))
            if self.elector is None:
                self._lead()
                await asyncio.gather(*tasks)
            else:
                await self.elector.run(self._lead, self._follow)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._follow()

    def _lead(self) -> None:
        self.queue.start()
        self.policy_queue.start()

    async def _follow(self) -> None:
        await self.queue.stop()
        await self.policy_queue.stop()

    async def release(self) -> None:
        if self.elector is not None:
            await self.elector.release()

    def _model_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        current = self.queue.bodies.get(key)
        before = (current or {}).get("spec") or {}
        if kind == "DELETED":
            if not self.queue.forget(key, meta["uid"]):
                return  # an older object of this name; the new one stays
            self.observed.forget(key)
            self.reconciler.forget(key)
            after: dict[str, Any] = {}
        else:
            self.queue.observe(key, _without_managed_fields(body))
            after = body.get("spec") or {}
        # A policy counts the models that name it.
        for policy in {before.get("quotaPolicy"), after.get("quotaPolicy")} - {None}:
            self.policy_queue.trigger((key[0], str(policy)))

    def _policy_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        old = self.policy_queue.bodies.get(key)
        if kind == "DELETED":
            if not self.policy_queue.forget(key, meta["uid"]):
                return
            changed = True
        else:
            generation = meta.get("generation")
            changed = old is None or old["metadata"].get("generation") != generation
            # Not for our own status writes.
            self.policy_queue.observe(key, _without_managed_fields(body), trigger=changed)
        if changed:
            self.secrets.recheck_missing(key[0])  # perhaps its Secrets were just made
            for model in models_using(self.queue.bodies, *key):
                self.queue.trigger(model)

    def _child_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        labels = meta.get("labels") or {}
        owner = labels.get(MODEL_LABEL) or labels.get(VERSION_OF_LABEL)
        namespace = meta.get("namespace")
        if owner and namespace:
            key = (namespace, owner)
            self.observed.record(key, body, deleted=kind == "DELETED")
            self.queue.trigger(key)

    async def _resync(self) -> None:
        """Re-run every reconcile now and then, so drift that no event reports is repaired."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            self.queue.trigger_all()
            self.policy_queue.trigger_all()


def _without_managed_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The watch's object as the queue keeps it (each event brings a fresh one)."""
    body["metadata"].pop("managedFields", None)
    return body


def build_registry(config: OperatorConfig, namespaces: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    state: dict[str, Any] = {}

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # Events are the reconciler's, one per reason change
        settings.scanning.disabled = True  # kopf watches nothing: no CRD or namespace scans
        identity = default_identity()
        user_agent = f"{COMPONENT} ({identity})"
        client = connect(connections=connections(config, namespaces), user_agent=user_agent)
        # The Lease has a client of its own: renewals never wait behind watches or writes.
        lease_client = connect(connections=2, user_agent=user_agent)
        controller = Controller(
            client, config, namespaces, lease_client=lease_client, identity=identity
        )
        health = await metrics.serve_health(
            metrics.health_app(controller.ready, controller.alive), config.health_port
        )
        state.update(client=client, lease_client=lease_client, controller=controller, health=health)
        state["task"] = controller.supervise(
            asyncio.get_running_loop().create_task(controller.run()), "the controller"
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        task = state.get("task")
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if "controller" in state:
            await state["controller"].release()
        if "health" in state:
            await state["health"].cleanup()
        for name in ("client", "lease_client"):
            if name in state:
                await state[name].close()

    return registry
