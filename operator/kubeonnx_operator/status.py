"""Status derived in pure code from what was observed: the Deployment and its pods.

Conditions follow metav1.Condition: a list keyed by type, lastTransitionTime kept unless
the status flips, observedGeneration set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from .render.model import CONTAINER
from .render.versions import served_weights

READY = "Ready"
# Not blocking: the spec has fields this operator does not know (written under a newer CRD).
FIELDS_IGNORED = "FieldsIgnored"
# Not blocking: whether the HTTPRoute mirrors the mirrored candidates (spec.ingress.gateway).
GATEWAY_MIRROR = "GatewayMirror"
# Every reason the GatewayMirror condition can give.
MirrorReason = Literal[
    "Mirrored",
    "FeatureNotSupported",
    "GatewayNotFound",
    "GatewayClassNotFound",
    "GatewayNotReadable",
]
MIRROR_REASONS: tuple[str, ...] = get_args(MirrorReason)

# Every reason an InferenceModel's Ready condition can give: the one registry (mypy holds
# each Verdict to it; the Argo CD health check is tested against each).
ModelReason = Literal[
    "Ready",
    "ScaledToZero",
    "Progressing",
    "Unschedulable",
    "ModelLoadFailed",
    "CrashLoop",
    "ImagePullFailed",
    "ReplicaFailure",
    "ProgressDeadlineExceeded",
    "InvalidSpec",
    "KedaNotInstalled",
    "QuotaPolicyNotFound",
    "QuotaSecretNotFound",
    "QuotaPolicyInvalid",
    "CredentialsSecretNotFound",
    "LabelsConfigMapNotFound",
    "MirrorSecretNotFound",
    "GatewayNotReady",
    "RouterNotReady",
    "GatewayAPINotInstalled",
    "ChildConflict",
    "ReconcileError",
]
MODEL_REASONS: tuple[str, ...] = get_args(ModelReason)
# The reasons given with Ready=True: the model serves (or wakes on demand).
READY_REASONS = frozenset({"Ready", "ScaledToZero"})
# Every reason a QuotaPolicy's Ready condition can give.
PolicyReason = Literal["Ready", "InvalidSpec", "SecretNotFound", "ReconcileError"]
POLICY_REASONS: tuple[str, ...] = get_args(PolicyReason)


@dataclass(frozen=True)
class Verdict:
    ready: bool
    reason: ModelReason
    message: str


@dataclass(frozen=True)
class MirrorVerdict:
    """Whether the HTTPRoute carries the candidates' mirrors, and why (not)."""

    on: bool
    reason: MirrorReason
    message: str


def _container_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return dict(cs)
    return None


def _pod_problem(pod: dict[str, Any]) -> Verdict | None:
    """The one thing that keeps this pod from serving, if it is one we can name."""
    status = pod.get("status", {})
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return Verdict(False, "Unschedulable", cond.get("message") or "pod cannot be scheduled")
    cs = _container_status(pod)
    if cs is None:
        return None
    state = cs.get("state") or {}
    last = (cs.get("lastState") or {}).get("terminated") or {}
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    for term in (terminated, last):
        if term and term.get("exitCode", 0) != 0 and (term.get("message") or "").strip():
            return Verdict(False, "ModelLoadFailed", term["message"].strip())
    if waiting.get("reason") == "CrashLoopBackOff" or (terminated and terminated.get("exitCode")):
        code = (terminated or last).get("exitCode")
        why = (terminated or last).get("reason") or "Error"
        return Verdict(
            False,
            "CrashLoop",
            f"container {CONTAINER} restarted {cs.get('restartCount', 0)} times "
            f"(last exit: {why}, code {code})",
        )
    if waiting.get("reason") in {"ImagePullBackOff", "ErrImagePull", "InvalidImageName"}:
        return Verdict(False, "ImagePullFailed", waiting.get("message") or waiting["reason"])
    if waiting.get("reason") == "CreateContainerConfigError":
        return Verdict(False, "InvalidSpec", waiting.get("message") or waiting["reason"])
    return None


def derive_verdict(
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    min_replicas: int,
    wake: str | None = None,
) -> Verdict:
    """Ready only when the current Deployment has rolled out and at least minReplicas (at
    least 1) of its pods are ready: under an autoscaler the Deployment first asks for 1
    replica, until the autoscaler raises it to minReplicas, and `kubectl wait` must not
    return before. `wake`: what scales a model up from zero, in words."""
    if deployment is None:
        return Verdict(False, "Progressing", "waiting for the Deployment to be created")
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    desired = spec.get("replicas", 1)
    ready = status.get("readyReplicas", 0)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    observed = status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
    rolled_out = observed and updated >= desired and total == updated
    required = max(min_replicas, 1)
    asked = max(desired, required)
    if desired == 0 and min_replicas == 0 and observed:
        return Verdict(True, "ScaledToZero", f"scaled to zero; KEDA wakes it when {wake}")
    if rolled_out and ready >= required:
        return Verdict(True, "Ready", f"{ready}/{asked} replicas ready")
    # Not ready: name the first problem a pod shows, newest pods first.
    newest_first = sorted(
        pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True
    )
    for pod in newest_first:
        problem = _pod_problem(pod)
        if problem is not None:
            return problem
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            # Pods could not even be created: a missing ServiceAccount, a quota, a policy.
            return Verdict(False, "ReplicaFailure", cond.get("message") or "")
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Verdict(False, "ProgressDeadlineExceeded", cond.get("message") or "")
    waiting = (
        f"; the autoscaler has yet to scale the Deployment to minReplicas {required}"
        if desired < required
        else ""
    )
    return Verdict(
        False,
        "Progressing",
        f"{ready}/{asked} replicas ready, {updated}/{desired} updated{waiting}",
    )


def gateway_verdict(gateway: dict[str, Any] | None, name: str) -> Verdict | None:
    """What keeps an asynchronous model's gateway (Deployment `name`) from taking
    submissions, or None when at least one of its replicas is ready. While it rolls out
    that is Progressing; once it had rolled out, or when it cannot, GatewayNotReady:
    every submission fails, whatever the model's own replicas show."""
    return _helper_verdict(
        gateway,
        f"the async gateway {name}",
        "GatewayNotReady",
        "asynchronous submissions fail until one is",
    )


def router_verdict(router: dict[str, Any] | None, name: str, model: str) -> Verdict | None:
    """What keeps the router of a model that holds its requests (spec.scaling.holdRequests,
    Deployment `name`) from taking them, or None when one of its replicas is ready. Without
    it the model's Service has no endpoint: no request is held, so nothing wakes the model
    from zero, and none is answered. Progressing while it rolls out, RouterNotReady once
    it had rolled out or cannot."""
    return _helper_verdict(
        router,
        f"the router {name}",
        "RouterNotReady",
        "no request reaches the model, nor wakes it from zero, until one is "
        f"(its pods: kubectl describe pods -l kubeonnx.io/router={model})",
    )


def _helper_verdict(
    deployment: dict[str, Any] | None, what: str, reason: ModelReason, consequence: str
) -> Verdict | None:
    """The verdict on a Deployment the model needs beside its own (a gateway, a router)."""
    if deployment is None:
        return Verdict(False, "Progressing", f"waiting for {what} to be created")
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    ready, desired = status.get("readyReplicas", 0), spec.get("replicas", 1)
    if ready >= 1:
        return None
    counts = f"{what} has {ready}/{desired} replicas ready"
    stuck = ""
    for cond in status.get("conditions") or []:
        failed = cond.get("type") == "ReplicaFailure" and cond.get("status") == "True"
        settled = cond.get("type") == "Progressing" and cond.get("reason") in {
            "NewReplicaSetAvailable",
            "ProgressDeadlineExceeded",
        }
        if failed or settled:
            stuck = cond.get("message") or cond.get("reason") or ""
    if not stuck:
        return Verdict(False, "Progressing", counts)
    return Verdict(False, reason, f"{counts}: {consequence} ({stuck})")


def version_statuses(
    versions: list[tuple[str, str, int, str, dict[str, Any], dict[str, Any] | None]],
) -> list[dict[str, Any]]:
    """status.versions from (version, role, desired weight, Deployment name, its status,
    the Deployment or None), the stable first."""
    ready = [status.get("readyReplicas", 0) >= 1 for _, _, _, _, status, _ in versions]
    served = served_weights([w for _, _, w, _, _, _ in versions], ready)
    return [
        {
            "version": version,
            "role": role,
            "weight": weight,
            "desiredWeight": desired,
            "readyReplicas": status.get("readyReplicas", 0),
            "replicas": (deployment or {}).get("spec", {}).get("replicas", 0),
            "deployment": name,
        }
        for (version, role, desired, name, status, deployment), weight in zip(
            versions, served, strict=True
        )
    ]


def set_condition(
    conditions: list[dict[str, Any]], new: dict[str, Any], now: str
) -> list[dict[str, Any]]:
    """Replace the condition of new's type; keep lastTransitionTime unless the status flips."""
    out = []
    found = False
    for cond in conditions:
        if cond.get("type") != new["type"]:
            out.append(cond)
            continue
        found = True
        same = cond.get("status") == new["status"]
        out.append(
            {**new, "lastTransitionTime": cond.get("lastTransitionTime", now) if same else now}
        )
    if not found:
        out.append({**new, "lastTransitionTime": now})
    return out


def derive_status(
    *,
    generation: int,
    previous: dict[str, Any],
    verdict: Verdict,
    deployment: dict[str, Any] | None,
    url: str | None,
    external_url: str | None,
    now: str,
    mode: str | None = None,
    async_url: str | None = None,
    version: str | None = None,
    ignored: tuple[str, ...] | None = None,
    versions: list[dict[str, Any]] | None = None,
    min_replicas: int = 0,
    mirror: tuple[MirrorVerdict, ...] | None = None,
    rollout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole status subresource, from the verdict and what was observed. `ignored`:
    the spec's fields unknown to this operator (None: the spec was not read). `versions`:
    status.versions ([]: no candidates; None: the spec was not read, what is there stays).
    The REPLICAS column (replicaSummary) is ready/asked: the Deployment's replicas, or
    minReplicas while an autoscaler has yet to raise them to it. `mirror`: the GatewayMirror
    condition (one verdict; (): none, nothing is mirrored through a Gateway; None: not
    derived, what is there stays). `rollout`: status.rollout ({}: none, removed; None: not
    derived, what is there stays)."""
    desired = (deployment or {}).get("spec", {}).get("replicas", 0)
    ready = (deployment or {}).get("status", {}).get("readyReplicas", 0)
    asked = max(desired, min_replicas) if deployment is not None else desired
    condition = {
        "type": READY,
        "status": "True" if verdict.ready else "False",
        "reason": verdict.reason,
        "message": verdict.message,
        "observedGeneration": generation,
    }
    status = {
        "observedGeneration": generation,
        "replicas": desired,
        "readyReplicas": ready,
        "replicaSummary": f"{ready}/{asked}",
        "url": url,
        "externalURL": external_url,
        "conditions": _gateway_mirror(
            _fields_ignored(
                set_condition(list(previous.get("conditions") or []), condition, now),
                ignored,
                generation,
                now,
            ),
            mirror,
            generation,
            now,
        ),
    }
    if mode is None:  # the spec could not be read: what is served keeps its mode and URL
        mode, async_url = previous.get("mode"), previous.get("asyncURL")
        version = previous.get("version")
    if mode:
        status["mode"] = mode
    if async_url:
        status["asyncURL"] = async_url
    elif previous.get("asyncURL"):
        status["asyncURL"] = None  # status is written as a merge patch: null removes it
    if version:
        status["version"] = version
    if versions:
        status["versions"] = versions
    elif versions is not None and previous.get("versions"):
        status["versions"] = None  # a merge patch: null removes it
    if rollout:
        status["rollout"] = merge_patch(previous.get("rollout"), rollout)
    elif rollout is not None and previous.get("rollout"):
        status["rollout"] = None
    return status


def merge_patch(previous: Any, new: dict[str, Any]) -> dict[str, Any]:
    """`new` as a merge patch over `previous`: a key `previous` has and `new` lacks is
    null (removed), at any depth; nothing else is added, so an unchanged `new` equals
    `previous`."""
    if not isinstance(previous, dict):
        return new
    out: dict[str, Any] = {k: None for k in previous if k not in new}
    for k, v in new.items():
        out[k] = merge_patch(previous.get(k), v) if isinstance(v, dict) else v
    return out


def fields_ignored_message(status: dict[str, Any]) -> str | None:
    """The FieldsIgnored condition's message in `status` (None: no such condition)."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == FIELDS_IGNORED:
            return str(cond.get("message"))
    return None


def _fields_ignored(
    conditions: list[dict[str, Any]], ignored: tuple[str, ...] | None, generation: int, now: str
) -> list[dict[str, Any]]:
    if ignored is None:
        return conditions
    if not ignored:
        return [c for c in conditions if c.get("type") != FIELDS_IGNORED]
    condition = {
        "type": FIELDS_IGNORED,
        "status": "True",
        "reason": "UnknownFields",
        "message": (
            "NOT applied, unknown to this operator (set under a newer CRD?); the object is"
            f" served as if they were absent: {', '.join(ignored)}"
        )[:1024],
        "observedGeneration": generation,
    }
    return set_condition(conditions, condition, now)


def _gateway_mirror(
    conditions: list[dict[str, Any]],
    mirror: tuple[MirrorVerdict, ...] | None,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    if mirror is None:
        return conditions
    if not mirror:
        return [c for c in conditions if c.get("type") != GATEWAY_MIRROR]
    condition = {
        "type": GATEWAY_MIRROR,
        "status": "True" if mirror[0].on else "False",
        "reason": mirror[0].reason,
        "message": mirror[0].message[:1024],
        "observedGeneration": generation,
    }
    return set_condition(conditions, condition, now)
