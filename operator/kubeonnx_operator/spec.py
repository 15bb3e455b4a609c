"""The InferenceModel spec, parsed once into typed models (camelCase on the wire).

The CRD's schema and CEL rules refuse most bad objects at the API server; these models
repeat the same rules so that `kubeonnx render` and the operator name the same problem
when a spec reaches them some other way.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

SUPPORTED_SCHEMES = ("s3://", "file://")
# metadata.name becomes a Service name (a DNS-1035 label) and a label value: 63 at most.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX = 63
# Volumes and variables the runtime's contract already uses.
RESERVED_VOLUMES = ("model-cache", "tmp", "quota", "labels")
RESERVED_ENV_PREFIX = "KUBEONNX_"
# spec.model.version is a URL path segment (/v2/models/NAME/versions/V) and a label value.
VERSION_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
DEFAULT_VERSION = "1"
S3_OBJECT = r"^s3://[^/]+/.*[^/]$"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class S3Spec(_Spec):
    endpoint: str | None = None
    region: str | None = None
    credentials_secret: str | None = None


class ModelSource(_Spec):
    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    version: str = Field(DEFAULT_VERSION, pattern=VERSION_PATTERN)
    s3: S3Spec = S3Spec()

    @model_validator(mode="after")
    def _scheme(self) -> ModelSource:
        if not self.uri.startswith(SUPPORTED_SCHEMES):
            raise ValueError(
                f"spec.model.uri {self.uri!r} must start with one of {', '.join(SUPPORTED_SCHEMES)}"
            )
        if self.uri.startswith("s3://") and not re.match(S3_OBJECT, self.uri):
            raise ValueError(
                f"spec.model.uri {self.uri!r} must be s3://BUCKET/KEY naming the model file: a "
                "bucket alone or a folder (ending in /) is not a file"
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
        if self.profile and self.count == 0:
            raise ValueError(
                "spec.accelerator.count (GPUs per replica) is required when "
                "spec.accelerator.profile is set (at least 1); without it the model would run "
                "on CPU"
            )
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
    # Left out, maxReplicas follows minReplicas (the CRD has no default for it: a structural
    # default cannot depend on another field), so minReplicas 3 alone serves 3 replicas.
    max_replicas: int = Field(1, ge=1, le=1000)
    autoscaler: Literal["hpa", "keda", "none"] = "hpa"
    target_cpu_utilization: int = Field(70, ge=1, le=100, alias="targetCPUUtilization")
    target_inflight_requests: int = Field(8, ge=1, le=100000)
    demand: DemandSpec | None = None
    # The router in front holds requests while no replica is ready; their count wakes it.
    hold_requests: bool = False

    @model_validator(mode="before")
    @classmethod
    def _max_from_min(cls, data: Any) -> Any:
        if isinstance(data, dict) and not {"maxReplicas", "max_replicas"} & data.keys():
            low = data.get("minReplicas", data.get("min_replicas", 1))
            if isinstance(low, int) and not isinstance(low, bool):
                return {**data, "maxReplicas": max(low, 1)}
        return data

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                "spec.scaling.minReplicas must not be greater than spec.scaling.maxReplicas "
                f"({self.min_replicas} > {self.max_replicas})"
            )
        if self.hold_requests and self.autoscaler != "keda":
            raise ValueError(HOLD_NEEDS_KEDA)
        return self


HOLD_NEEDS_KEDA = (
    "spec.scaling.holdRequests needs autoscaler keda: the count of held requests is the "
    "KEDA trigger that wakes the model"
)


SCALE_TO_ZERO_NEEDS = (
    "spec.scaling.minReplicas 0 (scale to zero) needs autoscaler keda and a demand signal "
    "that exists while no replica runs: spec.scaling.holdRequests (the requests the router "
    "holds), spec.async.enabled (the queue's length), or spec.scaling.demand.prometheusQuery "
    "(the ingress controller's request rate for the route, for example); at zero replicas "
    "the runtime's own in-flight metric does not exist"
)
DURATION = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"


def duration_seconds(text: str) -> int:
    """Seconds of a duration such as 90s, 5m or 1h30m (the CRD's pattern checked it)."""
    match = re.fullmatch(DURATION, text)
    if not match or not text:
        raise ValueError(f"{text!r} is not a duration such as 90s, 5m or 1h30m")
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(part[:-1]) * units[part[-1]] for part in match.groups() if part)


class SecretKeyRef(_Spec):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class AsyncRedisSpec(_Spec):
    url: str = Field(pattern=r"^rediss?://[^@]+$", max_length=512)
    password_secret: SecretKeyRef | None = None


class GatewaySpec(_Spec):
    replicas: int = Field(1, ge=1, le=20)
    resources: ResourcesSpec = ResourcesSpec(
        requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"}
    )


class AsyncSpec(_Spec):
    """Asynchronous inference through a Redis Stream (see the runtime's asyncinfer)."""

    enabled: bool = False
    backend: Literal["redis"] = "redis"
    redis: AsyncRedisSpec | None = None
    max_attempts: int = Field(3, ge=1, le=100)
    result_ttl: str = Field("1h", pattern=DURATION, min_length=2, alias="resultTTL")
    claim_after: str = Field("5m", pattern=DURATION, min_length=2)
    max_queued: int = Field(100000, ge=1, le=10_000_000)
    max_entry_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    max_result_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    dead_letter_max_length: int = Field(1000, ge=1, le=1_000_000)
    max_queued_bytes: int = Field(1024**3, ge=1024, le=1024**4)
    dead_letter_max_bytes: int = Field(256 * 1024**2, ge=1024, le=1024**4)
    target_queue_length: int = Field(16, ge=1, le=100000)
    callback_hosts: list[str] = []
    gateway: GatewaySpec = GatewaySpec()

    @model_validator(mode="after")
    def _store(self) -> AsyncSpec:
        if self.enabled and self.redis is None:
            raise ValueError("spec.async.redis.url is required when spec.async.enabled is true")
        return self


class ImageInputSpec(_Spec):
    size: list[int] = Field(min_length=2, max_length=2)
    resize: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    mean: list[float] = Field([0.0, 0.0, 0.0], min_length=3, max_length=3)
    std: list[float] = Field([1.0, 1.0, 1.0], min_length=3, max_length=3)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(1 / 255, gt=0)
    input: str | None = None
    max_pixels: int = Field(40_000_000, ge=1, le=1_000_000_000)

    @model_validator(mode="after")
    def _values(self) -> ImageInputSpec:
        if any(not 1 <= d <= 8192 for d in self.size):
            raise ValueError("spec.processing.input.image.size must be [height, width] in 1..8192")
        if any(s == 0 for s in self.std):
            raise ValueError("spec.processing.input.image.std must not contain 0")
        return self


class ProcessingInputSpec(_Spec):
    image: ImageInputSpec


class ClassificationSpec(_Spec):
    labels_config_map: SecretKeyRef | None = None
    top_k: int = Field(5, ge=1, le=1000)
    softmax: bool = False
    output: str | None = None


class DetectionSpec(_Spec):
    boxes: str = "boxes"
    scores: str = "scores"
    box_format: Literal["xyxy", "cxcywh"] = "xyxy"
    normalized: bool = False
    score_threshold: float = Field(0.25, ge=0, le=1)
    iou_threshold: float = Field(0.45, gt=0, le=1)
    max_detections: int = Field(100, ge=1, le=10000)
    labels_config_map: SecretKeyRef | None = None


class ProcessingOutputSpec(_Spec):
    classification: ClassificationSpec | None = None
    detection: DetectionSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> ProcessingOutputSpec:
        if self.classification is not None and self.detection is not None:
            raise ValueError("spec.processing.output takes classification or detection, not both")
        return self

    @property
    def labels(self) -> SecretKeyRef | None:
        """The ConfigMap key holding the labels, whichever kind of output names it."""
        kind = self.detection or self.classification
        return kind.labels_config_map if kind is not None else None


class ProcessingSpec(_Spec):
    """Image endpoints: /predict and /predict/batch decode, preprocess and classify."""

    input: ProcessingInputSpec
    output: ProcessingOutputSpec = ProcessingOutputSpec()


# Segments of the characters every ingress controller takes literally: ingress-nginx's
# strict path validation allows no more for pathType Prefix. No '.', '%', whitespace,
# ';', '{}', '$', regex metacharacters, and no empty segment ('//').
ROUTE_PATH = r"^/$|^(/[A-Za-z0-9_-]+)+/?$"
ROUTE_PATH_MAX = 256
ROUTE_PATH_RULE = (
    "spec.ingress.path must be '/' or segments of letters, digits, '_' and '-' "
    f"(at most {ROUTE_PATH_MAX} characters): no '.', '//', '%', whitespace or characters "
    "an ingress controller reads specially (; { } $ ^ * + ? ( ) [ ] | \\ ~ and such)"
)
SHARED_PREFIX = "/models"


def check_route(path: str | None, namespace: str) -> None:
    """Refuse a path with characters an ingress controller reads specially, or one on the
    shared pattern (/models/NAMESPACE/...) that names another namespace, or the pattern's
    root: on a shared host it would take that traffic, API keys included. The pattern is
    compared ignoring case, as a controller in regex mode matches. Raises RouteRefused."""
    if path is None:
        return
    if len(path) > ROUTE_PATH_MAX or not re.fullmatch(ROUTE_PATH, path):
        raise RouteRefused(f"{ROUTE_PATH_RULE}; got {path!r}")
    own = f"{SHARED_PREFIX}/{namespace}"
    lowered = path.lower()
    if lowered.rstrip("/") != SHARED_PREFIX and not lowered.startswith(SHARED_PREFIX + "/"):
        return
    if path.rstrip("/") != own and not path.startswith(own + "/"):
        raise RouteRefused(
            f"spec.ingress.path {path!r}: paths under {SHARED_PREFIX}/ belong to the "
            f"namespace they name; a model in namespace {namespace} may use {own} or "
            f"{own}/... only"
        )


# A Gateway's name and namespace (DNS labels/subdomains) and a listener's sectionName, as
# the Gateway API's own schema takes them.
GATEWAY_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
NAMESPACE_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
SECTION_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
MAX_PARENT_REFS = 8


class GatewayParentRef(_Spec):
    """A Gateway (gateway.networking.k8s.io) the model's HTTPRoute attaches to."""

    name: str = Field(pattern=GATEWAY_NAME, max_length=253)
    namespace: str | None = Field(None, pattern=NAMESPACE_NAME, max_length=63)
    section_name: str | None = Field(None, pattern=SECTION_NAME, max_length=253)


class GatewayRouteSpec(_Spec):
    """An HTTPRoute (Gateway API) for the model's route path, beside or instead of the
    Ingress: weighted between the versions, pinned by header and path, mirrored where the
    Gateway's class supports it."""

    parent_refs: list[GatewayParentRef] = Field(min_length=1, max_length=MAX_PARENT_REFS)

    @model_validator(mode="after")
    def _unique(self) -> GatewayRouteSpec:
        refs = [(r.name, r.namespace, r.section_name) for r in self.parent_refs]
        if len(set(refs)) != len(refs):
            raise ValueError(
                "spec.ingress.gateway.parentRefs must not name the same Gateway (and "
                "sectionName) twice"
            )
        return self


class IngressSpec(_Spec):
    enabled: bool = False
    host: str | None = None
    path: str | None = None
    class_name: str | None = None
    tls_secret: str | None = None
    gateway: GatewayRouteSpec | None = None

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


class CandidateSource(_Spec):
    """A candidate version's model file: spec.model without the version."""

    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    s3: S3Spec = S3Spec()

    @model_validator(mode="after")
    def _scheme(self) -> CandidateSource:
        ModelSource(uri=self.uri)  # the same rules as spec.model.uri
        return self


CANDIDATE_HOLD = (
    "spec.traffic.candidates[].scaling.holdRequests is not taken: set spec.scaling.holdRequests "
    "(the router holds the requests of every version)"
)


class CandidateSpec(_Spec):
    """A version served beside the stable one (spec.model), in a Deployment of its own."""

    version: str = Field(pattern=VERSION_PATTERN)
    model: CandidateSource
    weight: int = Field(0, ge=0, le=100)
    mirror_percent: int = Field(0, ge=0, le=100)
    runtime: RuntimeSpec | None = None
    resources: ResourcesSpec | None = None
    scaling: ScalingSpec | None = None

    @model_validator(mode="after")
    def _scale_to_zero(self) -> CandidateSpec:
        scaling = self.scaling
        if scaling is not None and scaling.hold_requests:
            raise ValueError(CANDIDATE_HOLD)
        woken = scaling is not None and scaling.autoscaler == "keda" and scaling.demand is not None
        if scaling is not None and scaling.min_replicas == 0 and not woken:
            raise ValueError(
                "spec.traffic.candidates[].scaling.minReplicas 0 needs autoscaler keda and "
                "spec.traffic.candidates[].scaling.demand (a candidate consumes no queue)"
            )
        return self


class PauseSpec(_Spec):
    duration: str | None = Field(None, pattern=DURATION, min_length=2)


class RolloutStep(_Spec):
    weight: int | None = Field(None, ge=1, le=100)
    pause: PauseSpec | None = None

    @model_validator(mode="after")
    def _one(self) -> RolloutStep:
        if (self.weight is None) == (self.pause is None):
            raise ValueError("spec.traffic.rollout.steps[] takes exactly one of weight or pause")
        return self


DECIMAL = r"^[0-9]+(\.[0-9]+)?$"


class AnalysisSpec(_Spec):
    interval: str = Field("1m", pattern=DURATION, min_length=2)
    min_requests: int = Field(50, ge=0, le=1_000_000_000)
    max_error_rate: str = Field("0.01", pattern=DECIMAL)
    max_latency_ratio: str = Field("1.5", pattern=DECIMAL)
    failure_limit: int = Field(2, ge=1, le=100)


class RolloutSpec(_Spec):
    steps: list[RolloutStep] = Field(min_length=1, max_length=20)
    analysis: AnalysisSpec = AnalysisSpec()
    auto_promote: bool = False


HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
MAX_CANDIDATES = 3


class TrafficSpec(_Spec):
    """Candidate versions beside the stable one, and how requests are split between them."""

    candidates: list[CandidateSpec] = Field([], max_length=MAX_CANDIDATES)
    sticky: bool = False
    pin_header: str = Field("X-Model-Version", pattern=HEADER_NAME, max_length=256)
    rollout: RolloutSpec | None = None

    @model_validator(mode="after")
    def _combinations(self) -> TrafficSpec:
        versions = [c.version for c in self.candidates]
        if len(set(versions)) != len(versions):
            raise ValueError(
                f"spec.traffic.candidates[].version must be unique (got {', '.join(versions)})"
            )
        if sum(c.weight for c in self.candidates) > 100:
            raise ValueError("spec.traffic.candidates[].weight must not sum to more than 100")
        if self.rollout is not None:
            if len(self.candidates) != 1:
                raise ValueError("spec.traffic.rollout needs exactly one candidate")
            if self.candidates[0].weight:
                raise ValueError(
                    "spec.traffic.candidates[].weight must be 0 (unset) with "
                    "spec.traffic.rollout: the rollout's steps set it"
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
    async_: AsyncSpec = Field(AsyncSpec(), alias="async")
    processing: ProcessingSpec | None = None
    traffic: TrafficSpec = TrafficSpec()

    @model_validator(mode="after")
    def _stable_not_candidate(self) -> InferenceModelSpec:
        for candidate in self.traffic.candidates:
            if candidate.version == self.model.version:
                raise ValueError(
                    f"spec.traffic.candidates[].version {candidate.version!r} must differ "
                    "from spec.model.version (the stable version)"
                )
        return self

    @model_validator(mode="after")
    def _scale_to_zero(self) -> InferenceModelSpec:
        scaling = self.scaling
        woken = scaling.demand is not None or self.async_.enabled or scaling.hold_requests
        if scaling.min_replicas == 0 and (scaling.autoscaler != "keda" or not woken):
            raise ValueError(SCALE_TO_ZERO_NEEDS)
        return self

    @property
    def mode(self) -> str:
        """What `kubectl get im` shows in MODE: the ways the model is served."""
        modes = [m for m, on in (("async", self.async_.enabled), ("image", self.processing)) if on]
        return ",".join(modes) or "sync"


class InvalidSpec(ValueError):
    """The spec cannot be served as written; the message names the field."""


class RouteRefused(InvalidSpec):
    """spec.ingress.path could take traffic that is not the model's: no Ingress for it."""


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = re.sub(r"^Value error, ", "", err["msg"])
        problems.append(f"{_where(loc)}: {msg}" if loc and not msg.startswith("spec.") else msg)
    return "; ".join(problems)


def check_name(name: str) -> None:
    """Refuse a metadata.name the children cannot carry (the CRD refuses it too)."""
    if len(name) > NAME_MAX or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidSpec(
            f"metadata.name {name!r} must be at most {NAME_MAX} characters of a-z, 0-9 and "
            "'-', starting with a letter: it names the model's Service and labels"
        )


Parsed = TypeVar("Parsed", bound=BaseModel)


def _drop(raw: Any, loc: tuple[int | str, ...]) -> None:
    for step in loc[:-1]:
        raw = raw[step]
    raw.pop(loc[-1], None)


def _where(loc: tuple[int | str, ...]) -> str:
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


class NotUnderstood(InvalidSpec):
    """A field unknown to this operator in a section it must understand."""


# Sections of a spec in which a newer CRD's field may restrict something (who reaches a
# model, what a tenant may use): there an unknown field is refused, not ignored, since
# ignoring it would serve the object more openly than its author asked (fail-open).
MODEL_MUST_UNDERSTAND = ("ingress",)
POLICY_MUST_UNDERSTAND = ("tenants", "defaultTenant", "tokens")


def validate_tolerant(
    cls: type[Parsed], raw: dict[str, Any], must_understand: tuple[str, ...] = ()
) -> tuple[Parsed, list[str]]:
    """Validate `raw` as `cls`, ignoring fields `cls` does not know, and name them.

    An object read from the cluster may carry fields a newer CRD added (the documented
    upgrade applies the CRDs before the operator; a rollback keeps them): they are
    ignored, not a reason to stop serving, except under the top-level sections named in
    `must_understand` (NotUnderstood). Anything else wrong raises ValidationError."""
    try:
        return cls.model_validate(raw), []
    except ValidationError as exc:
        unknown = [tuple(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
    refused = sorted(_where(loc) for loc in unknown if loc[0] in must_understand)
    if refused:
        raise NotUnderstood(
            f"{', '.join(refused)}: unknown to this operator in a section where it must"
            " understand every field (a newer CRD's restriction would not be applied);"
            " upgrade the operator"
        )
    pruned = copy.deepcopy(raw)
    for loc in unknown:
        _drop(pruned, loc)
    return cls.model_validate(pruned), sorted(_where(loc) for loc in unknown)


def parse_spec(raw: dict[str, Any] | None) -> InferenceModelSpec:
    """Parse an InferenceModel's spec strictly (`kubeonnx render`), or raise InvalidSpec
    naming every bad field."""
    try:
        return InferenceModelSpec.model_validate(raw or {})
    except ValidationError as exc:
        raise InvalidSpec(_describe(exc)) from None


def read_spec(raw: dict[str, Any] | None) -> tuple[InferenceModelSpec, list[str]]:
    """Parse a spec read from the cluster: fields unknown to this operator (a newer CRD's)
    are ignored and returned by name; anything else wrong raises InvalidSpec."""
    try:
        return validate_tolerant(InferenceModelSpec, raw or {}, MODEL_MUST_UNDERSTAND)
    except NotUnderstood as exc:
        raise RouteRefused(str(exc)) from None  # spec.ingress: no Ingress until understood
    except ValidationError as exc:
        raise InvalidSpec(_describe(exc)) from None
