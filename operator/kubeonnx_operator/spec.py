"""The InferenceModel spec, parsed once into typed models (camelCase on the wire).

The CRD's schema and CEL rules refuse most bad objects at the API server; these models
repeat the same rules so that `kubeonnx render` and the operator name the same problem
when a spec reaches them some other way.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

SUPPORTED_SCHEMES = ("s3://", "file://")
# metadata.name becomes a Service name (a DNS-1035 label) and a label value: 63 at most.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX = 63
# Volumes and variables the runtime's contract already uses.
RESERVED_VOLUMES = ("model-cache", "tmp", "quota")
RESERVED_ENV_PREFIX = "KUBEONNX_"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class S3Spec(_Spec):
    endpoint: str | None = None
    region: str | None = None
    credentials_secret: str | None = None


class ModelSource(_Spec):
    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    s3: S3Spec = S3Spec()

    @model_validator(mode="after")
    def _scheme(self) -> ModelSource:
        if not self.uri.startswith(SUPPORTED_SCHEMES):
            raise ValueError(
                f"spec.model.uri {self.uri!r} must start with one of {', '.join(SUPPORTED_SCHEMES)}"
            )
        return self


class RuntimeSpec(_Spec):
    image: str = ""
    max_batch_size: int = Field(1, ge=1, le=4096)  # 1: off; rows may depend on each other
    max_batch_delay_ms: float = Field(2, ge=0, le=1000)
    max_queue: int = Field(256, ge=1, le=100000)
    threads: int = Field(0, ge=0, le=256)


class ResourcesSpec(_Spec):
    requests: dict[str, str | int] = {}
    limits: dict[str, str | int] = {}


class AcceleratorSpec(_Spec):
    count: int = Field(0, ge=0, le=64)
    profile: str | None = None

    @model_validator(mode="after")
    def _profile(self) -> AcceleratorSpec:
        if self.count > 0 and not self.profile:
            raise ValueError("spec.accelerator.profile is required when spec.accelerator.count > 0")
        return self


class SchedulingSpec(_Spec):
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] = {}


class DemandSpec(_Spec):
    """A demand signal that exists while no replica runs, so KEDA can wake the model."""

    prometheus_query: str = Field(min_length=1)
    threshold: str = Field("1", pattern=r"^[0-9]+(\.[0-9]+)?$")


class ScalingSpec(_Spec):
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(1, ge=1, le=1000)
    autoscaler: Literal["hpa", "keda", "none"] = "hpa"
    target_cpu_utilization: int = Field(70, ge=1, le=100, alias="targetCPUUtilization")
    target_inflight_requests: int = Field(8, ge=1, le=100000)
    demand: DemandSpec | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas"
            )
        if self.min_replicas == 0 and (self.autoscaler != "keda" or self.demand is None):
            raise ValueError(SCALE_TO_ZERO_NEEDS)
        return self


SCALE_TO_ZERO_NEEDS = (
    "spec.scaling.minReplicas 0 (scale to zero) needs autoscaler keda and "
    "spec.scaling.demand.prometheusQuery, a demand signal that exists while no replica "
    "runs (the ingress controller's request rate for the route, for example): at zero "
    "replicas the runtime's own in-flight metric does not exist"
)


class IngressSpec(_Spec):
    enabled: bool = False
    host: str | None = None
    path: str | None = Field(None, pattern=r"^/")
    class_name: str | None = None
    tls_secret: str | None = None

    @model_validator(mode="after")
    def _host(self) -> IngressSpec:
        if self.enabled and not self.host:
            raise ValueError("spec.ingress.host is required when spec.ingress.enabled is true")
        return self


class ModelCacheSpec(_Spec):
    size_limit: str = Field("10Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")


class PodSpec(_Spec):
    """Passed through to the runtime pods."""

    annotations: dict[str, str] = {}
    labels: dict[str, str] = {}
    env: list[dict[str, Any]] = []
    image_pull_secrets: list[dict[str, str]] = []
    priority_class_name: str | None = None
    runtime_class_name: str | None = None
    topology_spread_constraints: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    volume_mounts: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _reserved(self) -> PodSpec:
        for var in self.env:
            if str(var.get("name", "")).startswith(RESERVED_ENV_PREFIX):
                raise ValueError(
                    f"spec.pod.env {var.get('name')!r}: {RESERVED_ENV_PREFIX}* variables are "
                    "the operator's (set them through the spec's own fields)"
                )
        for volume in self.volumes:
            if volume.get("name") in RESERVED_VOLUMES:
                raise ValueError(
                    f"spec.pod.volumes {volume.get('name')!r}: the name is the runtime's own "
                    f"({', '.join(RESERVED_VOLUMES)})"
                )
        names = {v.get("name") for v in self.volumes}
        for mount in self.volume_mounts:
            if mount.get("name") not in names:
                raise ValueError(
                    f"spec.pod.volumeMounts {mount.get('name')!r}: no volume of that name "
                    "in spec.pod.volumes"
                )
        return self


class InferenceModelSpec(_Spec):
    model: ModelSource
    service_account_name: str | None = None
    runtime: RuntimeSpec = RuntimeSpec()
    resources: ResourcesSpec = ResourcesSpec()
    accelerator: AcceleratorSpec = AcceleratorSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    scaling: ScalingSpec = ScalingSpec()
    ingress: IngressSpec = IngressSpec()
    quota_policy: str | None = None
    pod: PodSpec = PodSpec()
    model_cache: ModelCacheSpec = ModelCacheSpec()


class InvalidSpec(ValueError):
    """The spec cannot be served as written; the message names the field."""


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = re.sub(r"^Value error, ", "", err["msg"])
        problems.append(f"spec.{loc}: {msg}" if loc and not msg.startswith("spec.") else msg)
    return "; ".join(problems)


def check_name(name: str) -> None:
    """Refuse a metadata.name the children cannot carry (the CRD refuses it too)."""
    if len(name) > NAME_MAX or not re.match(NAME_PATTERN, name):
        raise InvalidSpec(
            f"metadata.name {name!r} must be at most {NAME_MAX} characters of a-z, 0-9 and "
            "'-', starting with a letter: it names the model's Service and labels"
        )


def parse_spec(raw: dict[str, Any] | None) -> InferenceModelSpec:
    """Parse an InferenceModel's spec, or raise InvalidSpec naming every bad field."""
    try:
        return InferenceModelSpec.model_validate(raw or {})
    except ValidationError as exc:
        raise InvalidSpec(_describe(exc)) from None
