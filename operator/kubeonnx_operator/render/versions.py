"""Versions: the stable one (spec.model) and up to three candidates (spec.traffic), each in
a Deployment of its own with its own autoscaler, and the router that splits requests
between them (the runtime's router role, see docs/router.md).

Which Deployment serves a version is decided by `place`: the one already labelled
kubeonnx.io/version=V is kept, so that adding, changing or removing a candidate never
touches the stable's Deployment, and promoting a candidate (moving it into spec.model)
keeps its pods. A Deployment's selector cannot change: the first stable Deployment,
named after the model, selects kubeonnx.io/inferencemodel=NAME (as it always has); every
other one selects kubeonnx.io/version-of=NAME and kubeonnx.io/version=V, and its pods do
not carry kubeonnx.io/inferencemodel, so no two selectors overlap (an HPA refuses pods
that two of them select).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from ..config import OperatorConfig
from ..spec import AsyncSpec, InferenceModelSpec, ModelSource, TrafficSpec
from .deployment import CONTAINER_SECURITY, POD_SECURITY, TERMINATION_LOG, plain_env, probe
from .model import (
    CONTAINER,
    GROUP,
    HTTP_PORT,
    METRICS_PORT,
    MODEL_LABEL,
    ROUTER_SUFFIX,
    SERVICE_PORT,
    Model,
)

VERSION_LABEL = f"{GROUP}/version"
VERSION_OF_LABEL = f"{GROUP}/version-of"
ROUTER_LABEL = f"{GROUP}/router"
MIRROR_SUFFIX = "-mirror"
MIRROR_KEY = "secret"
MIRROR_ENV = "KUBEONNX_MIRROR_SECRET"
ROUTER_CONFIG_DIR = "/etc/kubeonnx/router"
ROUTER_CONFIG_FILE = "router.json"
# The router reads its file once, at start: a change of it rolls the router's pods.
ROUTER_CONFIG_ANNOTATION = f"{GROUP}/router-config-sha256"
ROUTER_REPLICAS = 2
ROUTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}

Role = Literal["stable", "candidate"]
# The end of a name version_name made unique with a hash: no version keeps it as it is.
HASHED = re.compile(r"-[0-9a-f]{8}$")


def version_name(name: str, version: str) -> str:
    """NAME-vVERSION, a DNS label: the version lower-cased, '.' and '_' as '-'; a version
    that changes on the way (or a name too long) gets `-` and 8 hex digits of its sha256
    at the end, and so does a version that already ends that way (else "1-0-d0ff5974"
    would be the name of "1.0" too): two versions never share a name."""
    clean = re.sub(r"[._]", "-", version.lower())
    base = f"{name}-v{clean}"
    if clean == version and len(base) <= 63 and not HASHED.search(version):
        return base
    tag = hashlib.sha256(version.encode()).hexdigest()[:8]
    return f"{base[: 63 - len(tag) - 1].rstrip('-')}-{tag}"


@dataclass(frozen=True)
class Placed:
    """One version as served: its role, Deployment, Service, effective spec and weights."""

    model: str
    version: str
    role: Role
    deployment: str
    spec: InferenceModelSpec  # spec.model and the runtime, resources and scaling it runs
    weight: int  # desired share of requests, percent
    mirror_percent: int = 0
    # The version the Deployment's selector names when it is not this one (a stable
    # Deployment rolled in place to a new version): its pods keep that label.
    selects: str | None = None

    @property
    def first(self) -> bool:
        """The Deployment named after the model, with the selector it always had."""
        return self.deployment == self.model

    @property
    def selector(self) -> dict[str, str]:
        if self.first:
            return {MODEL_LABEL: self.model}
        return {VERSION_OF_LABEL: self.model, VERSION_LABEL: self.pod_version}

    @property
    def pod_version(self) -> str:
        """The kubeonnx.io/version label of the version's pods."""
        return self.selects or self.version

    @property
    def service(self) -> str:
        """The version's own Service (the router's upstream)."""
        return version_name(self.model, self.version)


def candidate_weights(model: Model) -> list[int]:
    candidates = model.spec.traffic.candidates
    if model.spec.traffic.rollout is not None and model.rollout_weight is not None:
        return [model.rollout_weight for _ in candidates]
    return [c.weight for c in candidates]


def _candidate_spec(spec: InferenceModelSpec, index: int) -> InferenceModelSpec:
    """The spec a candidate runs: the stable's, with its own model file and whichever of
    runtime, resources and scaling it sets (each replaces the stable's section whole). No
    queue: the stable version alone consumes it."""
    c = spec.traffic.candidates[index]
    source = ModelSource.model_construct(
        uri=c.model.uri, sha256=c.model.sha256, version=c.version, s3=c.model.s3
    )
    scaling = (c.scaling or spec.scaling).model_copy(update={"hold_requests": False})
    if scaling.min_replicas == 0 and scaling.demand is None:
        scaling = scaling.model_copy(update={"min_replicas": 1})  # nothing would wake it
    return spec.model_copy(
        update={
            "model": source,
            "runtime": c.runtime or spec.runtime,
            "resources": c.resources or spec.resources,
            "scaling": scaling,
            "async_": AsyncSpec(),
            "traffic": TrafficSpec(),
        }
    )


def place(model: Model) -> list[Placed]:
    """Every version, the stable first, with the Deployment that serves it: the one the
    cluster already has labelled with the version; else, for the stable, the stable's
    Deployment of before (one no candidate holds: a new stable version rolls it in place),
    or the one named after the model unless a candidate holds it; else NAME-vVERSION."""
    spec = model.spec
    labelled = {v: n for n, v in model.deployments if v is not None}
    selects = dict(model.selectors)
    candidates = spec.traffic.candidates
    weights = candidate_weights(model)
    held = {labelled.get(c.version) for c in candidates}
    stable_version = spec.model.version
    stable_deployment = labelled.get(stable_version)
    if stable_deployment is None:
        # The previous stable's: a Deployment of the model that serves no candidate (the
        # one named after the model first).
        free = sorted(
            (n != model.name, n) for n, v in model.deployments if v is not None and n not in held
        )
        stable_deployment = free[0][1] if free else None
    if stable_deployment is None:
        stable_deployment = model.name if model.name not in held else None
    if stable_deployment is None:
        stable_deployment = version_name(model.name, stable_version)
    placed = [
        Placed(
            model.name,
            stable_version,
            "stable",
            stable_deployment,
            spec,
            100 - sum(weights),
            selects=_selects(selects, stable_deployment, stable_version),
        )
    ]
    for i, c in enumerate(candidates):
        deployment = labelled.get(c.version) or version_name(model.name, c.version)
        placed.append(
            Placed(
                model.name,
                c.version,
                "candidate",
                deployment,
                _candidate_spec(spec, i),
                weights[i],
                c.mirror_percent,
                selects=_selects(selects, deployment, c.version),
            )
        )
    return placed


def _selects(selects: dict[str, str], deployment: str, version: str) -> str | None:
    """The version `deployment`'s selector names, where it is another."""
    found = selects.get(deployment)
    return found if found is not None and found != version else None


def served_weights(desired: list[int], ready: list[bool]) -> list[int]:
    """The percent of requests each version serves: the router shares the weights among
    the versions that have a ready replica (a version with none serves 0). Integers that
    sum to 100 (the remainder of the rounding goes to the first, the stable), or all 0."""
    total = sum(w for w, r in zip(desired, ready, strict=True) if r)
    if total == 0:
        return [0 for _ in desired]
    served = [w * 100 // total if r else 0 for w, r in zip(desired, ready, strict=True)]
    first = next(i for i, (w, r) in enumerate(zip(desired, ready, strict=True)) if r and w)
    served[first] += 100 - sum(served)
    return served


def mirrored(model: Model) -> bool:
    return any(c.mirror_percent for c in model.spec.traffic.candidates)


def mirror_secret_name(model: Model) -> str:
    return f"{model.name}{MIRROR_SUFFIX}"


def mirror_env(model: Model, optional: bool = True) -> dict[str, Any]:
    """The mirror secret, from Secret NAME-mirror (made by the user: the operator writes no
    Secret), which the reconciler requires while a candidate is mirrored. Optional for the
    versions: their pods start without it (then they charge a copy as any request)."""
    ref: dict[str, Any] = {"name": mirror_secret_name(model), "key": MIRROR_KEY}
    if optional:
        ref["optional"] = True
    return {"name": MIRROR_ENV, "valueFrom": {"secretKeyRef": ref}}


def version_model(model: Model, placed: Placed) -> Model:
    """The model as one version's renderers see it: its effective spec."""
    return dataclasses.replace(model, spec=placed.spec)


def relabel_version(model: Model, placed: Placed, child: dict[str, Any]) -> dict[str, Any]:
    """Name a child rendered for the stable after the version's Deployment, and label it
    with the version (metadata only: the stable's pods are not touched by this)."""
    meta = child["metadata"]
    meta["name"] = placed.deployment
    meta["labels"] = {**meta["labels"], VERSION_LABEL: placed.version}
    spec = child.get("spec", {})
    if "scaleTargetRef" in spec:
        spec["scaleTargetRef"]["name"] = placed.deployment
    if "selector" in spec and "matchLabels" in spec["selector"]:
        spec["selector"]["matchLabels"] = placed.selector
    return child


def version_deployment(model: Model, placed: Placed, rendered: dict[str, Any]) -> dict[str, Any]:
    """The runtime Deployment rendered from the version's spec, as that version's."""
    relabel_version(model, placed, rendered)
    template = rendered["spec"]["template"]
    if not placed.first:
        labels = {k: v for k, v in template["metadata"]["labels"].items() if k != MODEL_LABEL}
        template["metadata"]["labels"] = {**labels, **placed.selector}
        # Every Deployment but the first may serve a candidate, mirrored or not: the same
        # variable in each, so that a mirror set or a promotion never rolls its pods.
        container = template["spec"]["containers"][0]
        container["env"].append(mirror_env(model))
    return rendered


def version_service(model: Model, placed: Placed) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": placed.service,
            "namespace": model.namespace,
            "labels": {**model.labels, VERSION_LABEL: placed.version},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": placed.selector,
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def routed(model: Model) -> bool:
    """Whether the model's requests go through the router: it has candidates, or holds
    requests while no replica is ready (spec.scaling.holdRequests)."""
    return bool(model.spec.traffic.candidates) or model.holds_requests


def router_name(model: Model) -> str:
    return f"{model.name}{ROUTER_SUFFIX}"


def router_selector(model: Model) -> dict[str, str]:
    return {ROUTER_LABEL: model.name}


def router_config(model: Model, config: OperatorConfig, placed: list[Placed]) -> dict[str, Any]:
    """The router's configuration file (docs/router.md): every version's own Service."""
    traffic = model.spec.traffic
    versions = []
    for p in placed:
        host = f"{p.service}.{model.namespace}.svc.{config.cluster_domain}"
        entry: dict[str, Any] = {"name": p.version, "url": f"http://{host}", "weight": p.weight}
        if p.mirror_percent:
            entry["mirror_percent"] = p.mirror_percent
        if model.holds_requests and p.role == "candidate":
            # Held requests wake the stable alone: one pinned to a candidate not ready is
            # refused at once, not held (nor counted as the stable's demand).
            entry["hold"] = False
        versions.append(entry)
    out: dict[str, Any] = {
        "model": model.name,
        "versions": versions,
        "sticky": traffic.sticky,
        "pin_header": traffic.pin_header,
    }
    if not model.holds_requests:
        out["max_held_requests"] = 0  # holding is opt-in: 503 at once, as without it
    if model.quota is not None:
        out["tenant_header"] = model.quota.config.get("tenantHeader", "X-Api-Key")
    return out


def _router_labels(model: Model) -> dict[str, str]:
    return {**model.labels, "app.kubernetes.io/component": "router"}


def render_router_config_map(
    model: Model, config: OperatorConfig, placed: list[Placed]
) -> dict[str, Any]:
    text = json.dumps(router_config(model, config, placed), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": router_name(model),
            "namespace": model.namespace,
            "labels": _router_labels(model),
        },
        "data": {ROUTER_CONFIG_FILE: text},
    }


def render_router_pdb(model: Model) -> dict[str, Any]:
    """The router's PodDisruptionBudget, as each version's (render/pdb.py): a node drain
    takes one of its replicas at a time, so the model's Service always has one to reach."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": router_name(model),
            "namespace": model.namespace,
            "labels": _router_labels(model),
        },
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": router_selector(model)}},
    }


def render_router(
    model: Model, config: OperatorConfig, config_map: dict[str, Any]
) -> dict[str, Any]:
    """The router's Deployment: `kubeonnx serve --role router`, no model, no GPU. It reads
    its file at start, so the file's digest is in the pod template: a change rolls it."""
    text = config_map["data"][ROUTER_CONFIG_FILE]
    checksum = hashlib.sha256(text.encode()).hexdigest()
    env = plain_env(
        [
            ("KUBEONNX_PORT", str(HTTP_PORT)),
            ("KUBEONNX_METRICS_PORT", str(METRICS_PORT)),
            ("KUBEONNX_TERMINATION_LOG", TERMINATION_LOG),
        ]
    )
    if mirrored(model):
        env.append(mirror_env(model, optional=False))
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": config.runtime_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["kubeonnx"],
        "args": [
            "serve",
            "--role",
            "router",
            "--router-config",
            f"{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_FILE}",
        ],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # Holding, the router takes requests while no version is ready: it is ready itself
        # as soon as it answers (else Service NAME would have no endpoint at zero).
        "readinessProbe": probe(
            "/v2/health/live" if model.holds_requests else "/v2/health/ready", 2, 2
        ),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "resources": ROUTER_RESOURCES,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "router", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True},
        ],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "router", "configMap": {"name": config_map["metadata"]["name"]}},
        ],
    }
    if model.spec.pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = model.spec.pod.image_pull_secrets
    pod_labels = {k: v for k, v in _router_labels(model).items() if k != MODEL_LABEL}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": router_name(model),
            "namespace": model.namespace,
            "labels": _router_labels(model),
        },
        "spec": {
            "replicas": ROUTER_REPLICAS,
            "selector": {"matchLabels": router_selector(model)},
            "revisionHistoryLimit": 3,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": {**pod_labels, **router_selector(model)},
                    "annotations": {
                        ROUTER_CONFIG_ANNOTATION: checksum,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def render_router_pod_monitor(model: Model) -> dict[str, Any]:
    """The router's PodMonitor (as each version's, render/monitor.py): its metrics, the
    held requests that wake a model scaled to zero among them."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": router_name(model),
            "namespace": model.namespace,
            "labels": _router_labels(model),
        },
        "spec": {
            "selector": {"matchLabels": router_selector(model)},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }
