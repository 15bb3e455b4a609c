"""The Deployment of the runtime: the runtime's contract (env, port, probes), GPU placement,
S3 credentials, and a locked-down pod."""

from __future__ import annotations

import json
from typing import Any

from ..config import OperatorConfig
from ..quota import KEYS_DIR, LEDGER_DSN_ENV, REDIS_PASSWORD_ENV
from ..spec import duration_seconds
from .model import CONTAINER, HTTP_PORT, METRICS_PORT, Model
from .quota import QUOTA_DIR, QUOTA_FILE

CACHE_DIR = "/var/cache/kubeonnx"
TERMINATION_LOG = "/dev/termination-log"
RUNTIME_UID = 65532
DEFAULT_REQUESTS = {"cpu": "1", "memory": "1Gi"}
ASYNC_PASSWORD_ENV = "KUBEONNX_ASYNC_REDIS_PASSWORD"
LABELS_DIR = "/etc/kubeonnx/labels"
# Usage rows still waiting for the ledger's PostgreSQL at shutdown are spilled here, and
# replayed by the next start: an emptyDir (it outlives a container restart), or the model's
# own volume of that name in spec.pod.volumes (a shared persistent volume outlives the pod).
LEDGER_SPILL_DIR = "/var/lib/kubeonnx/ledger"
LEDGER_SPILL_VOLUME = "ledger-spill"
LABELS_FILE = "labels.txt"


def plain_env(values: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Environment entries for the pairs that have a value."""
    return [{"name": k, "value": v} for k, v in values if v]


def _env(model: Model) -> list[dict[str, Any]]:
    spec = model.spec
    values: list[tuple[str, str | None]] = [
        ("KUBEONNX_MODEL_URI", spec.model.uri),
        ("KUBEONNX_MODEL_SHA256", spec.model.sha256),
        ("KUBEONNX_MODEL_NAME", model.name),
        ("KUBEONNX_MODEL_VERSION", spec.model.version),
        ("KUBEONNX_S3_ENDPOINT", spec.model.s3.endpoint),
        ("KUBEONNX_S3_REGION", spec.model.s3.region),
        ("AWS_REGION", spec.model.s3.region),
        ("KUBEONNX_DEVICE", "cuda" if model.gpu else "cpu"),
        ("KUBEONNX_THREADS", str(spec.runtime.threads)),
        ("KUBEONNX_MAX_BATCH_SIZE", str(spec.runtime.max_batch_size)),
        ("KUBEONNX_MAX_BATCH_DELAY_MS", f"{spec.runtime.max_batch_delay_ms:g}"),
        ("KUBEONNX_MAX_QUEUE", str(spec.runtime.max_queue)),
        ("KUBEONNX_PORT", str(HTTP_PORT)),
        ("KUBEONNX_METRICS_PORT", str(METRICS_PORT)),
        ("KUBEONNX_ROUTE_PREFIX", model.route_path),
        ("KUBEONNX_CACHE_DIR", CACHE_DIR),
        ("KUBEONNX_TERMINATION_LOG", TERMINATION_LOG),
    ]
    processing = spec.processing
    if processing is not None:
        values.append(
            (
                "KUBEONNX_PROCESSING",
                json.dumps(processing.model_dump(by_alias=True, exclude_none=True), sort_keys=True),
            )
        )
        if processing.output.labels is not None:
            values.append(("KUBEONNX_LABELS_FILE", f"{LABELS_DIR}/{LABELS_FILE}"))
    env = plain_env(values)
    secret = spec.model.s3.credentials_secret
    if secret:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env + async_env(model) + quota_env(model)


def async_env(model: Model) -> list[dict[str, Any]]:
    """Where the asynchronous queue is, and how it behaves (the model's replicas and its
    gateway read the same)."""
    spec = model.spec.async_
    if not spec.enabled or spec.redis is None:
        return []
    values: list[tuple[str, str | None]] = [
        ("KUBEONNX_ASYNC_REDIS_URL", spec.redis.url),
        ("KUBEONNX_ASYNC_PREFIX", model.async_prefix),
        ("KUBEONNX_ASYNC_MAX_ATTEMPTS", str(spec.max_attempts)),
        ("KUBEONNX_ASYNC_RESULT_TTL_S", str(duration_seconds(spec.result_ttl))),
        ("KUBEONNX_ASYNC_CLAIM_AFTER_S", str(duration_seconds(spec.claim_after))),
        ("KUBEONNX_ASYNC_MAX_QUEUED", str(spec.max_queued)),
        ("KUBEONNX_ASYNC_MAX_ENTRY_BYTES", str(spec.max_entry_bytes)),
        ("KUBEONNX_ASYNC_MAX_RESULT_BYTES", str(spec.max_result_bytes)),
        ("KUBEONNX_ASYNC_DEAD_LETTER_MAX_LENGTH", str(spec.dead_letter_max_length)),
        ("KUBEONNX_ASYNC_MAX_QUEUED_BYTES", str(spec.max_queued_bytes)),
        ("KUBEONNX_ASYNC_DEAD_LETTER_MAX_BYTES", str(spec.dead_letter_max_bytes)),
        ("KUBEONNX_ASYNC_CALLBACK_HOSTS", ",".join(spec.callback_hosts)),
    ]
    env = plain_env(values)
    if spec.redis.password_secret is not None:
        ref = spec.redis.password_secret
        env.append(
            {
                "name": ASYNC_PASSWORD_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return env


def quota_env(model: Model) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if model.quota is not None:
        env.append({"name": "KUBEONNX_QUOTA_CONFIG", "value": f"{QUOTA_DIR}/{QUOTA_FILE}"})
        if model.quota.ledger_dsn is not None:
            env.append({"name": "KUBEONNX_LEDGER_SPILL_DIR", "value": LEDGER_SPILL_DIR})
        for variable, from_secret in (
            (REDIS_PASSWORD_ENV, model.quota.redis_password),
            (LEDGER_DSN_ENV, model.quota.ledger_dsn),
        ):
            if from_secret is not None:
                name, key = from_secret
                env.append(
                    {"name": variable, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
                )
    return env


def _resources(model: Model, config: OperatorConfig) -> dict[str, Any]:
    spec = model.spec
    requests = {k: str(v) for k, v in spec.resources.requests.items()}
    limits = {k: str(v) for k, v in spec.resources.limits.items()}
    for name, default in DEFAULT_REQUESTS.items():
        # A default request only where the user set neither: with a limit alone, the API
        # server takes the limit as the request (a 1Gi default over a 512Mi limit is a 422).
        if name not in requests and name not in limits:
            requests[name] = default
    # The model cache's emptyDir is bounded; the scheduler places the pod where it fits.
    requests.setdefault("ephemeral-storage", spec.model_cache.size_limit)
    profile = model.profile(config)
    if profile is not None:
        limits[profile.resource_name] = str(spec.accelerator.count)
    resources: dict[str, Any] = {"requests": requests}
    if limits:
        resources["limits"] = limits
    return resources


def _placement(model: Model, config: OperatorConfig) -> dict[str, Any]:
    """The profile's nodeSelector and tolerations merged with spec.scheduling (which wins)."""
    spec = model.spec
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    profile = model.profile(config)
    if profile is not None:
        node_selector.update(profile.node_selector)
        tolerations.extend(profile.tolerations)
    node_selector.update(spec.scheduling.node_selector)
    for toleration in spec.scheduling.tolerations:
        if toleration not in tolerations:
            tolerations.append(toleration)
    placement: dict[str, Any] = {}
    if node_selector:
        placement["nodeSelector"] = node_selector
    if tolerations:
        placement["tolerations"] = tolerations
    if spec.scheduling.affinity:
        placement["affinity"] = spec.scheduling.affinity
    runtime_class = spec.pod.runtime_class_name or (profile.runtime_class_name if profile else None)
    if runtime_class:
        placement["runtimeClassName"] = runtime_class
    if spec.pod.topology_spread_constraints:
        placement["topologySpreadConstraints"] = spec.pod.topology_spread_constraints
    if spec.pod.priority_class_name:
        placement["priorityClassName"] = spec.pod.priority_class_name
    return placement


def quota_volume(model: Model, container: dict[str, Any], pod_spec: dict[str, Any]) -> None:
    """Mount the quota configuration and, beside it, the tenants' key Secrets, if the model
    has a policy; and the ledger's spill volume, if it has a ledger.

    Mounted whole (no subPath), so the kubelet updates the files in place (a changed limit,
    a rotated key) and the runtime re-reads them. The Secrets are optional: a missing one (or
    key) stops a new pod at start-up with a message naming it, rather than hiding in a pod
    that never starts; the operator shows a missing Secret in status before that.
    """
    if model.quota is None:
        return
    container["volumeMounts"].append({"name": "quota", "mountPath": QUOTA_DIR, "readOnly": True})
    config = {"name": model.quota_config_name, "items": [{"key": QUOTA_FILE, "path": QUOTA_FILE}]}
    keys = [
        {
            "secret": {
                "name": name,
                "items": [{"key": key, "path": f"{KEYS_DIR}/{name}/{key}"} for key in keys],
                "optional": True,
            }
        }
        for name, keys in model.quota.key_secrets
    ]
    pod_spec["volumes"].append(
        {
            "name": "quota",
            "projected": {
                "defaultMode": 0o440,  # the runtime's group (fsGroup) reads; nobody else
                "sources": [{"configMap": config}, *keys],
            },
        }
    )
    if model.quota.ledger_dsn is not None:
        spill = LEDGER_SPILL_VOLUME
        container["volumeMounts"].append({"name": spill, "mountPath": LEDGER_SPILL_DIR})
        if not any(v.get("name") == spill for v in pod_spec["volumes"]):
            own = [v for v in model.spec.pod.volumes if v.get("name") == spill]
            pod_spec["volumes"].append(
                own[0] if own else {"name": spill, "emptyDir": {"sizeLimit": "256Mi"}}
            )


CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUNTIME_UID,
    "runAsGroup": RUNTIME_UID,
    "fsGroup": RUNTIME_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def render_deployment(model: Model, config: OperatorConfig) -> dict[str, Any]:
    spec = model.spec
    image = spec.runtime.image or (config.runtime_gpu_image if model.gpu else config.runtime_image)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["kubeonnx"],
        "args": ["serve"],
        "env": _env(model) + list(spec.pod.env),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # Up to 30 minutes to download and load a large model before liveness applies.
        "startupProbe": probe("/v2/health/live", 5, 360),
        "readinessProbe": probe("/v2/health/ready", 5, 2),
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "resources": _resources(model, config),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "model-cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            *spec.pod.volume_mounts,
        ],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        # The runtime answers not-ready for a few seconds after SIGTERM, then drains.
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": [
            {"name": "model-cache", "emptyDir": {"sizeLimit": spec.model_cache.size_limit}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            *spec.pod.volumes,
        ],
        **_placement(model, config),
    }
    if spec.pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = spec.pod.image_pull_secrets
    quota_volume(model, container, pod_spec)
    labels = spec.processing.output.labels if spec.processing else None
    if labels is not None:
        container["volumeMounts"].append(
            {"name": "labels", "mountPath": LABELS_DIR, "readOnly": True}
        )
        pod_spec["volumes"].append(
            {
                "name": "labels",
                "configMap": {
                    "name": labels.name,
                    "items": [{"key": labels.key, "path": LABELS_FILE}],
                },
            }
        )
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": model.selector},
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": 900,
        # Never below the ready count during a rollout: surge first, then retire.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "template": {
            "metadata": {
                # The user's labels never replace the ones the selector and Service use.
                "labels": {**spec.pod.labels, **model.labels},
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(METRICS_PORT),
                    "prometheus.io/path": "/metrics",
                    **spec.pod.annotations,
                },
            },
            "spec": pod_spec,
        },
    }
    if spec.scaling.autoscaler == "none":
        # With an autoscaler, it owns replicas; a replicas field here would fight it.
        deployment_spec["replicas"] = spec.scaling.min_replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": model.metadata(),
        "spec": deployment_spec,
    }
