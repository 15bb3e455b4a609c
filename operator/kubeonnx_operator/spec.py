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


class ScalingSpec(_Spec):
    min_replicas: int = Field(1, ge=0, le=1000)
    max_replicas: int = Field(1, ge=1, le=1000)
    autoscaler: Literal["hpa", "keda", "none"] = "hpa"
    target_cpu_utilization: int = Field(70, ge=1, le=100, alias="targetCPUUtilization")
    target_inflight_requests: int = Field(8, ge=1, le=100000)

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas"
            )
        if self.min_replicas == 0 and self.autoscaler != "keda":
            raise ValueError("spec.scaling.minReplicas 0 (scale to zero) needs autoscaler keda")
        return self


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


class InvalidSpec(ValueError):
    """The spec cannot be served as written; the message names the field."""


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = re.sub(r"^Value error, ", "", err["msg"])
        problems.append(f"spec.{loc}: {msg}" if loc and not msg.startswith("spec.") else msg)
    return "; ".join(problems)


def parse_spec(raw: dict[str, Any] | None) -> InferenceModelSpec:
    """Parse an InferenceModel's spec, or raise InvalidSpec naming every bad field."""
    try:
        return InferenceModelSpec.model_validate(raw or {})
    except ValidationError as exc:
        raise InvalidSpec(_describe(exc)) from None
