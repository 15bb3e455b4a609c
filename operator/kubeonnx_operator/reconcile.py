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

import httpx2
from lightkube import ApiError

from . import analysis, metrics, rollout
from .config import OperatorConfig
from .kube import Kube, is_not_found
from .observed import (
    APPLIED_ANNOTATION,
    ChildRef,
    ObservedChildren,
    digest,
    our_fields,
    owns_exactly,
    slim_deployment,
)
from .presence import SecretPresence
from .quota import QuotaProblem, ResolvedQuota, resolve_quota, secret_names
from .render import Model, render_children
from .render.httproute import API_VERSION as GATEWAY_API
from .render.httproute import mirror_features, parent_gateways
from .render.model import load_model
from .render.versions import (
    MIRROR_KEY,
    VERSION_LABEL,
    Placed,
    mirror_secret_name,
    mirrored,
    place,
    routed,
    router_name,
    router_selector,
)
from .spec import InvalidSpec, RouteRefused
from .status import (
    FIELDS_IGNORED,
    READY,
    MirrorVerdict,
    ModelReason,
    Verdict,
    derive_status,
    derive_verdict,
    fields_ignored_message,
    gateway_verdict,
    router_verdict,
    version_statuses,
)
from .workqueue import Stopped

log = logging.getLogger(__name__)
ROUTER_COMPONENT = "router"  # app.kubernetes.io/component of the router's objects

# The field manager that keeps a Deployment's replicas while an autoscaler takes them over
# (the hand-over in Kubernetes' server-side apply docs, "Transferring ownership").
HANDOVER_MANAGER = "kubeonnx-replicas-handover"


class ChildConflict(Exception):
    """A child's name is taken by an object this InferenceModel does not control."""


class PreviousOwner(Exception):
    """A child's name is held by a child of a deleted InferenceModel of the same name,
    which the garbage collector is about to remove."""


def _refused_by_admission(message: str) -> bool:
    return "admission webhook" in message or "ValidatingAdmissionPolicy" in message


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


# What the reconciler calls to bind a rollout's analysis to one model: (namespace, model,
# stable version, candidate version, thresholds) -> the `analyse` of rollout.advance.
Analyser = Callable[[str, str, str, str, analysis.Thresholds], rollout.Analyse]
# Never requeue a rollout sooner than this (an analysis due "now" is already past).
MIN_REQUEUE_S = 1.0


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        observed: ObservedChildren,
        now: Callable[[], str] = utc_now,
        policies: dict[tuple[str, str], dict[str, Any]] | None = None,
        pod_monitor: Callable[[], bool] = lambda: False,
        secrets: SecretPresence | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        analyser: Analyser | None = None,
        requeue: Callable[[tuple[str, str], float | None], None] = lambda key, after: None,
    ) -> None:
        self.kube = kube
        # The rollouts' time (status.rollout's timers), their analysis (Prometheus by
        # default), and how a model asks to be reconciled again (the work queue's timer).
        self.clock = clock
        self.analyser = analyser or self._prometheus_analyser
        self.requeue = requeue
        self._http: httpx2.AsyncClient | None = None
        # Whether the tenants' Secrets exist (metadata, by name, cached); never their data.
        self.secrets = secrets or SecretPresence(kube)
        self.observed = observed
        # QuotaPolicy bodies by (namespace, name), kept current by their watch.
        self.policies = policies if policies is not None else {}
        # What was last applied to each child: (digest of the manifest, our_fields of the
        # result). After a restart, a child's digest is read from its annotation
        # (APPLIED_ANNOTATION) and its fields from its managedFields (_as_applied).
        self.applied: dict[tuple[str, str], dict[tuple[str, str, str], tuple[str, str]]] = {}
        # The Deployments (by name, one per version) each model's last applies returned:
        # newer than the watch's copy until the watch delivers the change, and status is
        # never derived from an older one.
        self.applied_deployments: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        # The name of each model's stable Deployment, as last rendered (after a promotion it
        # is the candidate's, NAME-vVERSION).
        self.stable_names: dict[tuple[str, str], str] = {}
        self.config = config
        self.now = now
        self.pod_monitor = pod_monitor  # whether the cluster has the PodMonitor CRD

    def _prometheus_analyser(
        self,
        namespace: str,
        name: str,
        stable: str,
        candidate: str,
        thresholds: analysis.Thresholds,
    ) -> rollout.Analyse:
        if self._http is None:  # one client for every model, made when first needed
            self._http = httpx2.AsyncClient()
        return analysis.analyser(
            self.config.prometheus_address,
            self._http,
            namespace,
            name,
            stable,
            candidate,
            thresholds,
        )

    def forget(self, key: tuple[str, str]) -> None:
        """Drop what is kept of a deleted model."""
        self.requeue(key, None)
        self.applied.pop(key, None)
        self.applied_deployments.pop(key, None)
        self.stable_names.pop(key, None)
        metrics.forget_model(*key)

    def deployment(self, key: tuple[str, str], name: str | None = None) -> dict[str, Any] | None:
        """The newest view of the model's Deployment `name` (default: the stable's): the
        watch's, unless our last apply returned a later generation of the same object."""
        name = name or self.stable_names.get(key) or key[1]
        seen = self.observed.deployment(key, name)
        applied = self.applied_deployments.get(key, {}).get(name)
        if applied is None:
            return seen
        if seen is None or seen["metadata"]["uid"] != applied["metadata"]["uid"]:
            # Not seen yet, or the watch shows another object (re-created): trust our apply
            # only while the watch has nothing.
            return applied if seen is None else seen
        newer = seen["metadata"]["generation"] >= applied["metadata"]["generation"]
        return seen if newer else applied

    async def reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return  # the garbage collector removes the children
        try:
            await self._reconcile(body)
        except Stopped:
            raise  # no longer the leader: the next one reports
        except Exception as exc:
            # Shown on the object, then retried with backoff by the queue.
            if isinstance(exc, ApiError):
                message = f"API error {exc.status.code}: {exc.status.message}"
            else:  # the connection, a timeout, an answer that is no Status, a bug of ours
                message = f"{type(exc).__name__}: {exc}"[:1024] if str(exc) else type(exc).__name__
            await self._report_quietly(body, Verdict(False, "ReconcileError", message))
            raise

    async def _reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        key = (namespace, name)
        try:
            model = load_model(name, namespace, body.get("spec"), self.config, from_cluster=True)
        except InvalidSpec as exc:
            log.warning("InferenceModel %s/%s: invalid spec: %s", namespace, name, exc)
            if isinstance(exc, RouteRefused):
                # An Ingress made before the route was refused (by an older operator) would
                # keep taking another namespace's traffic: it goes.
                await self._prune_kind(key, meta["uid"], "Ingress")
            # What runs already keeps running, and status says so.
            await self._report(body, Verdict(False, "InvalidSpec", str(exc)), self.deployment(key))
            return

        if model.spec.quota_policy:
            resolved = await self._resolve_quota(model)
            if isinstance(resolved, Verdict):
                # Not served without the budgets it names: nothing is applied until they
                # can be; what runs already keeps running as it was.
                await self._report(body, resolved, self.deployment(key), model)
                return
            model = dataclasses.replace(model, quota=resolved)

        seen = self.observed.deployments(key)
        model = dataclasses.replace(
            model,
            deployments=tuple(sorted((n, d["metadata"].get("version")) for n, d in seen.items())),
            selectors=tuple(
                sorted(
                    (n, d["metadata"]["selects"])
                    for n, d in seen.items()
                    if d["metadata"].get("selects")
                )
            ),
        )
        placed = place(model)
        clash = _selector_clash(placed)
        if clash is not None:
            await self._report(body, clash, self.deployment(key), model)
            return
        ready_versions = self._ready_versions(key, placed)
        try:
            decision = await self._rollout(body, model, ready_versions)
        except InvalidSpec as exc:
            await self._report(body, Verdict(False, "InvalidSpec", str(exc)), self.deployment(key))
            return
        if decision is not None and model.spec.traffic.rollout is not None:
            # The rollout's weight is the candidate's desired weight (served once ready).
            model = dataclasses.replace(model, rollout_weight=decision.weight)
            placed = place(model)
        stable_name = placed[0].deployment
        mirror = await self._gateway_mirror(model, placed)
        router = self.observed.router(key) or {}
        model = dataclasses.replace(
            model,
            ready_versions=ready_versions,
            gateway_mirror=bool(mirror) and mirror[0].on,
            router_ready=router.get("status", {}).get("readyReplicas", 0) >= 1,
        )

        missing = await self._missing_reference(model)
        if missing is not None:
            # Found here rather than by the kubelet (a pod stuck in CreateContainerConfigError):
            # nothing is applied until it exists; what runs already keeps running. The
            # rollout's analysis ran on what serves: its result (a rollback) is kept.
            await self._finish(key, body, missing, self.deployment(key), model, decision)
            return

        owner = owner_reference(body)
        children = render_children(model, self.config, pod_monitor=self.pod_monitor())
        try:
            checked = await self._check_version_children(key, children, owner["uid"])
        except ChildConflict as exc:
            # Another model's (or someone's) object under a version's name: nothing is
            # applied, so neither Service NAME nor the router is pointed at it.
            verdict = Verdict(False, "ChildConflict", str(exc))
            await self._finish(key, body, verdict, self.deployment(key), model, decision)
            return
        except PreviousOwner as exc:
            verdict = Verdict(False, "Progressing", str(exc))
            await self._finish(key, body, verdict, self.deployment(key), model, decision)
            return
        self.stable_names[key] = stable_name
        rendered: set[tuple[str, str, str]] = set()
        problem: Verdict | None = None
        for child in children:
            child["metadata"]["ownerReferences"] = [owner]
            rendered.add((child["apiVersion"], child["kind"], child["metadata"]["name"]))
            try:
                live = await self._apply_if_needed(key, child, owner["uid"], checked)
            except ChildConflict as exc:
                problem = problem or Verdict(False, "ChildConflict", str(exc))
                continue
            except PreviousOwner as exc:
                problem = problem or Verdict(False, "Progressing", str(exc))
                continue
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
                if child["kind"] == "HTTPRoute" and is_not_found(exc):
                    # Not retried: the next resync (or event) applies it once installed.
                    problem = Verdict(
                        False,
                        "GatewayAPINotInstalled",
                        "spec.ingress.gateway needs the Gateway API (gateway.networking.k8s.io"
                        "/v1 HTTPRoute) in the cluster",
                    )
                    continue
                if child["kind"] == "PodMonitor" and is_not_found(exc):
                    # Its CRD went away since the watch saw it: the pods keep their
                    # prometheus.io annotations, and the watch notices within a minute.
                    log.warning("PodMonitor %s/%s not applied: no such kind", namespace, name)
                    continue
                message = exc.status.message or ""
                if exc.status.code in (400, 422) and not _refused_by_admission(message):
                    # The API server's schema refused what the spec made of it.
                    problem = Verdict(False, "InvalidSpec", f"{child['kind']} refused: {message}")
                    continue
                raise
            if child["kind"] == "Deployment" and live is not None:
                served = {p.deployment for p in placed}
                if child["metadata"]["name"] in served:
                    applied = self.applied_deployments.setdefault(key, {})
                    applied[child["metadata"]["name"]] = slim_deployment(live)
        for version in placed:
            current = self.deployment(key, version.deployment)
            if current is not None and version.spec.scaling.autoscaler == "hpa":
                await self._wake_from_zero(key, version, current)
        deployment = self.deployment(key, stable_name)
        if self.observed.service_selector(key) == router_selector(model) and not routed(model):
            # The router is no longer needed (the last candidate went, holdRequests was
            # turned off): Service NAME is switched back to the stable's pods
            # above; the router (and what it forwards to) goes once the watch shows that.
            log.info("%s/%s: pruning waits for Service %s to select the stable", *key, name)
        else:
            await self._prune(model, body["metadata"]["uid"], rendered)
        kept = {p.deployment for p in placed}
        for gone in set(self.applied_deployments.get(key, {})) - kept:
            del self.applied_deployments[key][gone]

        # The stable's pods (by the label its Deployment selects on).
        stable = placed[0]
        pods = self.observed.pods(key, None if stable.first else stable.pod_version)
        verdict = derive_verdict(
            deployment, pods, model.spec.scaling.min_replicas, model.wake_signal()
        )
        if verdict.ready and model.spec.async_.enabled:
            verdict = gateway_verdict(self.observed.gateway(key), model.gateway_name) or verdict
        if verdict.ready and model.holds_requests:
            # Only the router holds the requests that wake the model: without it, neither.
            unheld = router_verdict(self.observed.router(key), router_name(model), model.name)
            verdict = unheld or verdict
        if problem is not None:  # a child we could not create outranks what the pods show
            verdict = problem
        await self._finish(
            key, body, verdict, deployment, model, decision, self._versions(key, placed), mirror
        )

    async def _finish(
        self,
        key: tuple[str, str],
        body: dict[str, Any],
        verdict: Verdict,
        deployment: dict[str, Any] | None,
        model: Model,
        decision: rollout.RolloutDecision | None,
        versions: list[dict[str, Any]] | None = None,
        mirror: tuple[MirrorVerdict, ...] | None = None,
    ) -> None:
        """Report, with the rollout's status, its Events and its requeue: on every return
        once the rollout has advanced (an analysis made is never lost). The Events go
        before the status that tells of them: an operator killed in between posts them
        again rather than never."""
        if decision is not None:
            for event in decision.events:
                await self.kube.event(body, event.type, event.reason, event.message)
        await self._report(
            body,
            verdict,
            deployment,
            model,
            versions,
            mirror=mirror,
            rollout_status=decision.status if decision is not None else {},
        )
        after = decision.requeue_after if decision is not None else None
        self.requeue(key, None if after is None else max(after, MIN_REQUEUE_S))

    async def _rollout(
        self, body: dict[str, Any], model: Model, ready: frozenset[str]
    ) -> rollout.RolloutDecision | None:
        """The rollout's decision (spec.traffic.rollout with its one candidate), or the
        conclusion of one (no candidate left: Succeeded if it was promoted); None: no
        rollout, status.rollout goes."""
        spec = model.spec
        previous = (body.get("status") or {}).get("rollout")
        if not spec.traffic.candidates:
            return rollout.conclude(previous, spec.model.version)
        if spec.traffic.rollout is None:
            return None
        traffic = body["spec"]["traffic"]
        try:
            rollout_spec = rollout.RolloutSpec.from_dict(traffic["rollout"])
        except ValueError as exc:
            raise InvalidSpec(str(exc)) from None
        entry = traffic["candidates"][0]
        candidate = spec.traffic.candidates[0].version
        annotations = body["metadata"].get("annotations") or {}
        analyse = self.analyser(
            model.namespace, model.name, spec.model.version, candidate, rollout_spec.analysis
        )
        return await rollout.advance(
            rollout_spec,
            previous,
            candidate=candidate,
            candidate_ready=candidate in ready,
            candidate_spec_hash=rollout.candidate_spec_hash(entry),
            now=self.clock(),
            analyse=analyse,
            resume=annotations.get(rollout.RESUME_ANNOTATION),
        )

    def _ready_versions(self, key: tuple[str, str], placed: list[Placed]) -> frozenset[str]:
        """The versions whose Deployment has a ready replica (the HTTPRoute's weights)."""
        ready = set()
        for p in placed:
            current = self.deployment(key, p.deployment) or {}
            if current.get("status", {}).get("readyReplicas", 0) >= 1:
                ready.add(p.version)
        return frozenset(ready)

    async def _gateway_mirror(
        self, model: Model, placed: list[Placed]
    ) -> tuple[MirrorVerdict, ...]:
        """Whether the HTTPRoute may carry the mirrored candidates' RequestMirror filters:
        only where the class of every Gateway it attaches to lists the features they need
        in status.supportedFeatures. () where nothing is mirrored through a Gateway (none
        named, no mirror, `sticky` or `holdRequests`: the router mirrors). Read by name on
        each reconcile that needs it, so a class that gains the feature is seen by the next
        resync."""
        needed = mirror_features(placed)
        through_router = model.spec.traffic.sticky or model.holds_requests
        if model.spec.ingress.gateway is None or not needed or through_router:
            return ()
        off = "spec.traffic.candidates[].mirrorPercent is not applied to requests through the"
        for namespace, name in parent_gateways(model):
            try:
                gateway = await self.kube.get(GATEWAY_API, "Gateway", namespace, name)
            except ApiError as exc:
                why = f"Gateway {namespace}/{name} cannot be read ({exc.status.code})"
                return (MirrorVerdict(False, "GatewayNotReadable", f"{off} Gateway: {why}"),)
            if gateway is None:
                why = f"Gateway {namespace}/{name} does not exist"
                return (MirrorVerdict(False, "GatewayNotFound", f"{off} Gateway: {why}"),)
            class_name = str((gateway.get("spec") or {}).get("gatewayClassName") or "")
            try:
                gateway_class = await self.kube.get(GATEWAY_API, "GatewayClass", "", class_name)
            except ApiError as exc:
                why = f"GatewayClass {class_name} cannot be read ({exc.status.code})"
                return (MirrorVerdict(False, "GatewayNotReadable", f"{off} Gateway: {why}"),)
            if gateway_class is None:
                why = f"GatewayClass {class_name} (of Gateway {namespace}/{name}) does not exist"
                return (MirrorVerdict(False, "GatewayClassNotFound", f"{off} Gateway: {why}"),)
            features = (gateway_class.get("status") or {}).get("supportedFeatures") or []
            supported = {str(f.get("name")) for f in features if isinstance(f, dict)}
            missing = [f for f in needed if f not in supported]
            if missing:
                why = (
                    f"GatewayClass {class_name} (of Gateway {namespace}/{name}) does not list "
                    f"{', '.join(missing)} in status.supportedFeatures"
                )
                return (MirrorVerdict(False, "FeatureNotSupported", f"{off} Gateway: {why}"),)
        return (
            MirrorVerdict(
                True,
                "Mirrored",
                f"the HTTPRoute mirrors requests to the mirrored candidates ({', '.join(needed)})",
            ),
        )

    def _versions(self, key: tuple[str, str], placed: list[Placed]) -> list[dict[str, Any]]:
        """status.versions: each version's weights and replicas (none without candidates)."""
        if len(placed) < 2:
            return []
        seen = [(p, self.deployment(key, p.deployment)) for p in placed]
        return version_statuses(
            [
                (p.version, p.role, p.weight, p.deployment, d["status"] if d else {}, d)
                for p, d in seen
            ]
        )

    async def _missing_reference(self, model: Model) -> Verdict | None:
        """The verdict naming the S3 credentials Secret or labels ConfigMap the spec names
        and the namespace lacks (or the mirror Secret a mirrored candidate needs), asked by
        name for metadata alone and remembered as the tenants' Secrets are (`presence`): an
        idle resync reads nothing."""
        spec, namespace = model.spec, model.namespace
        wanted: list[tuple[str, str, ModelReason, str]] = []
        if spec.model.s3.credentials_secret:
            secret = spec.model.s3.credentials_secret
            wanted.append(
                ("Secret", secret, "CredentialsSecretNotFound", "spec.model.s3.credentialsSecret")
            )
        for i, c in enumerate(spec.traffic.candidates):
            if c.model.s3.credentials_secret:
                field = f"spec.traffic.candidates[{i}].model.s3.credentialsSecret"
                secret = c.model.s3.credentials_secret
                wanted.append(("Secret", secret, "CredentialsSecretNotFound", field))
        output = spec.processing.output if spec.processing else None
        if output is not None and output.labels is not None:
            which = "detection" if output.detection is not None else "classification"
            field = f"spec.processing.output.{which}.labelsConfigMap"
            wanted.append(("ConfigMap", output.labels.name, "LabelsConfigMapNotFound", field))
        for kind, ref, reason, field in wanted:
            if not await self.secrets.exists(namespace, ref, kind):
                return Verdict(
                    False,
                    reason,
                    f"{field} names {kind} {ref!r}, which namespace {namespace} lacks",
                )
        if mirrored(model):
            name = mirror_secret_name(model)
            if not await self.secrets.exists(namespace, name):
                return Verdict(
                    False,
                    "MirrorSecretNotFound",
                    f"spec.traffic.candidates[].mirrorPercent needs Secret {name!r} (key "
                    f"{MIRROR_KEY!r}: a random token that marks the router's copies), which "
                    f"namespace {namespace} lacks",
                )
        return None

    async def _resolve_quota(self, model: Model) -> ResolvedQuota | Verdict:
        """The runtime's quota file for the model's QuotaPolicy, once every tenant's Secret
        exists; or the verdict that says what is missing."""
        name, namespace = model.spec.quota_policy or "", model.namespace
        policy = self.policies.get((namespace, name))
        missing = await self.secrets.missing(namespace, secret_names(policy))
        try:
            return resolve_quota(name, namespace, policy, model.admitting_replicas, missing)
        except QuotaProblem as problem:
            return Verdict(False, problem.reason, str(problem))

    async def _check_version_children(
        self, key: tuple[str, str], children: list[dict[str, Any]], owner_uid: str
    ) -> set[tuple[str, str, str]]:
        """Before anything is applied: every child named after a version or the router
        (names another model may hold: model `m` with version 2 renders `m-v2`) that the
        watch does not show as ours is looked up, and ChildConflict (or PreviousOwner) is
        raised for one this model does not control. Returns those found free or ours."""
        checked: set[tuple[str, str, str]] = set()
        for child in children:
            meta = child["metadata"]
            ident = (child["apiVersion"], child["kind"], meta["name"])
            labels = meta.get("labels") or {}
            router = labels.get("app.kubernetes.io/component") == ROUTER_COMPONENT
            if meta["name"] == key[1] or not (VERSION_LABEL in labels or router):
                continue
            seen = self.observed.child(key, *ident)
            if seen is not None and owner_uid in seen.owner_uids:
                continue
            live = await self.kube.get(ident[0], ident[1], key[0], ident[2])
            if live is not None:
                _check_controller(live, owner_uid, ident[1], ident[2], key[1])
            checked.add(ident)
        return checked

    async def _apply_if_needed(
        self,
        key: tuple[str, str],
        manifest: dict[str, Any],
        owner_uid: str,
        checked: set[tuple[str, str, str]] | None = None,
    ) -> dict[str, Any] | None:
        """Apply unless the watch shows the child as last applied, untouched since: an idle
        resync then sends nothing. Returns the live object when it applied. Raises
        ChildConflict rather than take over an object this model does not control."""
        meta = manifest["metadata"]
        api_version, kind, name = manifest["apiVersion"], manifest["kind"], meta["name"]
        ident = (api_version, kind, name)
        applied = self.applied.setdefault(key, {})
        wanted = digest(manifest)
        meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_ANNOTATION: wanted}
        seen = self.observed.child(key, api_version, kind, name)
        ours = seen is not None and owner_uid in seen.owner_uids
        if seen is not None and ours:
            if applied.get(ident) == (wanted, seen.fields):
                return None
            if ident not in applied and _as_applied(seen, wanted, manifest):
                # Applied by an earlier run of the operator, untouched since: nothing to send.
                applied[ident] = (wanted, seen.fields)
                return None
        known = ours or (checked is not None and ident in checked)
        live = None
        if not known and seen is None:
            # Never seen: most likely absent. Created only if absent, in one request; a 409
            # says the name is taken (someone's object, or ours the watch has yet to show).
            live = await self.kube.create_absent(manifest)
        if live is None:
            if not known:
                # Not known as ours: look before applying, since a forced apply would adopt it.
                found = await self.kube.get(api_version, kind, meta["namespace"], name)
                if found is not None:
                    _check_controller(found, owner_uid, kind, name, key[1])
            if kind == "Deployment":
                await self._hand_over_replicas(key, manifest)
            live = await self.kube.apply(manifest)
        applied[ident] = (wanted, our_fields(live))
        return live

    async def _hand_over_replicas(self, key: tuple[str, str], manifest: dict[str, Any]) -> None:
        """Before the operator stops setting replicas (an autoscaler takes over), give the
        current count to a field manager of its own: otherwise the apply that drops the
        field resets the Deployment to its default of 1 replica."""
        if "replicas" in manifest["spec"]:
            return
        current = self.deployment(key, manifest["metadata"]["name"])
        if current is None or not current.get("ownsReplicas"):
            return
        meta = manifest["metadata"]
        await self.kube.apply(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                "spec": {"replicas": current["spec"]["replicas"]},
            },
            manager=HANDOVER_MANAGER,
        )

    async def _wake_from_zero(
        self, key: tuple[str, str], version: Placed, deployment: dict[str, Any]
    ) -> None:
        """An HPA never scales a Deployment at 0 replicas (left there by KEDA before a
        switch to hpa, or by hand): hand over minReplicas, at least 1, for it to take on."""
        if deployment["spec"].get("replicas", 1) != 0:
            return
        replicas = max(version.spec.scaling.min_replicas, 1)
        log.info(
            "%s/%s: %s at 0 replicas under an HPA; setting %d", *key, version.deployment, replicas
        )
        live = await self.kube.apply(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": version.deployment, "namespace": key[0]},
                "spec": {"replicas": replicas},
            },
            manager=HANDOVER_MANAGER,
        )
        self.applied_deployments.setdefault(key, {})[version.deployment] = slim_deployment(live)

    async def _prune(self, model: Model, owner_uid: str, keep: set[tuple[str, str, str]]) -> None:
        """Delete children this model owns that were not rendered this time: by UID, so
        that an object re-created under the name meanwhile is left alone."""
        for child in self.observed.children((model.namespace, model.name)):
            if (child.api_version, child.kind, child.name) in keep:
                continue
            if owner_uid not in child.owner_uids:
                continue
            log.info(
                "deleting %s %s/%s: no longer rendered", child.kind, model.namespace, child.name
            )
            await self.kube.delete(
                child.api_version, child.kind, model.namespace, child.name, uid=child.uid
            )

    async def _prune_kind(self, key: tuple[str, str], owner_uid: str, kind: str) -> None:
        for child in self.observed.children(key):
            if child.kind == kind and owner_uid in child.owner_uids:
                log.info("deleting %s %s/%s: its route is refused", kind, key[0], child.name)
                await self.kube.delete(child.api_version, kind, key[0], child.name, uid=child.uid)

    async def _report_quietly(self, body: dict[str, Any], verdict: Verdict) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        try:
            await self._report(body, verdict, self.deployment(key))
        except Stopped:
            raise
        except Exception as exc:
            log.warning("status of %s/%s not written: %s", *key, exc)

    async def _report(
        self,
        body: dict[str, Any],
        verdict: Verdict,
        deployment: dict[str, Any] | None = None,
        model: Model | None = None,
        versions: list[dict[str, Any]] | None = None,
        mirror: tuple[MirrorVerdict, ...] | None = None,
        rollout_status: dict[str, Any] | None = None,
    ) -> None:
        """Write the derived status, only when it differs from what the object has.
        `rollout_status`: status.rollout ({}: there is none; None: what is there stays)."""
        previous = body.get("status") or {}
        status = derive_status(
            generation=int(body["metadata"].get("generation", 1)),
            previous=previous,
            verdict=verdict,
            deployment=deployment,
            url=model.url(self.config) if model else None,
            external_url=model.external_url() if model else None,
            now=self.now(),
            mode=model.spec.mode if model else None,
            async_url=model.async_url(self.config) if model else None,
            version=model.spec.model.version if model else None,
            ignored=model.ignored if model else None,
            versions=versions if model else None,
            min_replicas=model.spec.scaling.min_replicas if model else 0,
            mirror=mirror,
            rollout=rollout_status,
        )
        meta = body["metadata"]
        metrics.set_model_ready(meta["namespace"], meta["name"], verdict.ready, verdict.reason)
        if status_changed(previous, status):
            await self.kube.patch_model_status(meta["namespace"], meta["name"], status)
            body["status"] = status
            before = _ready_reason(previous)
            if before != verdict.reason:
                # `kubectl describe` tells the story: one Event per change of reason.
                await self.kube.event(
                    body,
                    "Normal" if verdict.ready or verdict.reason == "Progressing" else "Warning",
                    verdict.reason,
                    verdict.message,
                )
            ignored = fields_ignored_message(status)
            if ignored and ignored != fields_ignored_message(previous):
                # Fail-open made loud: a field a newer CRD added (it may restrict something)
                # is not applied; one Warning per change, for whoever alerts on Events.
                await self.kube.event(body, "Warning", FIELDS_IGNORED, ignored)


def _as_applied(seen: ChildRef, wanted: str, manifest: dict[str, Any]) -> bool:
    """Whether the child, as the watch shows it, is what applying `manifest` would leave:
    it carries the manifest's digest (the values were applied), and the operator's field
    manager owns exactly the manifest's fields (none taken over or removed since)."""
    return seen.applied == wanted and bool(seen.owned) and owns_exactly(seen.owned, manifest)


def _selector_clash(placed: list[Placed]) -> Verdict | None:
    """A candidate whose pods the stable's Deployment would select too: the stable was
    rolled in place from that version, and its selector (which cannot change) names it."""
    stable = placed[0]
    for p in placed[1:]:
        if p.selector == stable.selector or p.deployment == stable.deployment:
            return Verdict(
                False,
                "InvalidSpec",
                f"spec.traffic.candidates[].version {p.version!r}: the stable's Deployment "
                f"{stable.deployment} (version {stable.version}) selects the pods labelled "
                f"version {stable.pod_version}; choose another version for the candidate",
            )
    return None


def _ready_reason(status: dict[str, Any]) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == READY:
            return str(cond.get("reason"))
    return None


def _check_controller(
    live: dict[str, Any], owner_uid: str, kind: str, name: str, model: str
) -> None:
    """`name` is the child's, `model` the InferenceModel's (NAME-gateway, NAME-quota are
    children of NAME)."""
    refs = (live.get("metadata") or {}).get("ownerReferences") or []
    controller = next((r for r in refs if r.get("controller")), None)
    if controller is None:
        raise ChildConflict(
            f"{kind} {name} already exists and is not managed by this InferenceModel; "
            "rename or delete it, or rename the model"
        )
    if controller.get("uid") != owner_uid:
        if controller.get("kind") == "InferenceModel" and controller.get("name") == model:
            raise PreviousOwner(
                f"waiting for the garbage collector to delete {kind} {name} of the previous "
                f"InferenceModel {model} (uid {controller.get('uid')})"
            )
        raise ChildConflict(
            f"{kind} {name} is controlled by {controller.get('kind')} {controller.get('name')} "
            f"(uid {controller.get('uid')}), not by this InferenceModel"
        )
