"""The parent as the renderers see it: name, namespace and typed spec, plus derived names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import AcceleratorProfile, OperatorConfig
from ..quota import ResolvedQuota
from ..spec import InferenceModelSpec, InvalidSpec, check_name, check_route, parse_spec, read_spec

GROUP = "kubeonnx.io"
MODEL_LABEL = f"{GROUP}/inferencemodel"
GATEWAY_LABEL = f"{GROUP}/async-gateway"
MANAGED_BY = "kubeonnx"
FIELD_MANAGER = "kubeonnx"  # the operator's server-side apply identity
HTTP_PORT = 8080
# The runtime's /metrics (it names tenants) is served on this port alone, which no Service
# or Ingress carries: only the scraper, reaching the pod, reads it.
METRICS_PORT = 9090
SERVICE_PORT = 80
CONTAINER = "runtime"
GATEWAY_SUFFIX = "-gateway"
ROUTER_SUFFIX = "-router"
# With candidate versions the router's Deployment is NAME-router: 63 characters at most.
ROUTER_NAME_MAX = 63 - len(ROUTER_SUFFIX)
# The gateway's Service, NAME-gateway, is a DNS label: 63 characters at most.
ASYNC_NAME_MAX = 63 - len(GATEWAY_SUFFIX)


@dataclass(frozen=True)
class Model:
    name: str
    namespace: str
    spec: InferenceModelSpec
    quota: ResolvedQuota | None = None  # set by the reconciler once the policy is read
    # Fields of the spec this operator does not know (a newer CRD's), ignored: status says so.
    ignored: tuple[str, ...] = ()
    # The model's Deployments in the cluster, (name, its kubeonnx.io/version label or None):
    # a version keeps the Deployment already labelled with it (see render.versions.place).
    deployments: tuple[tuple[str, str | None], ...] = ()
    # (name, the version its selector names) of those that select by version: a
    # Deployment's selector cannot change, so it keeps the one it was made with.
    selectors: tuple[tuple[str, str], ...] = ()
    # The candidate's weight a rollout engine decided (spec.traffic.rollout); None: the spec's.
    rollout_weight: int | None = None
    # The versions with a ready replica, as the reconciler last saw them: the HTTPRoute's
    # weights follow them. None: not known (`kubeonnx render`), the desired weights.
    ready_versions: frozenset[str] | None = None
    # The router's Deployment has a ready replica: only then does Service NAME select the
    # router's pods (else the stable's, which serve meanwhile). None: not known (`kubeonnx
    # render`), the router.
    router_ready: bool | None = None
    # Every parent Gateway's class supports the mirrors the HTTPRoute needs (decided by the
    # reconciler from status.supportedFeatures): only then does it carry them.
    gateway_mirror: bool = False

    @property
    def quota_config_name(self) -> str:
        return f"{self.name}-quota"

    @property
    def async_prefix(self) -> str:
        """The Redis key prefix of the model's asynchronous queue; the braces make it the
        Redis Cluster hash tag, so the stream and records share a slot."""
        return f"kubeonnx:{{{self.namespace}/{self.name}}}"

    @property
    def admitting_replicas(self) -> int:
        """At most how many processes charge the model's quota: its replicas, and the async
        gateway's, which charges at submission. failureMode Local gives each 1/this of
        every limit, so that together they never admit more than the limit."""
        gateway = self.spec.async_.gateway.replicas if self.spec.async_.enabled else 0
        candidates = sum(
            (c.scaling or self.spec.scaling).max_replicas for c in self.spec.traffic.candidates
        )
        return self.spec.scaling.max_replicas + gateway + candidates

    @property
    def gateway_name(self) -> str:
        return f"{self.name}{GATEWAY_SUFFIX}"

    @property
    def gateway_selector(self) -> dict[str, str]:
        # Not the model's label: the model's Deployment and Service must not select these pods.
        return {GATEWAY_LABEL: self.name}

    @property
    def selector(self) -> dict[str, str]:
        return {MODEL_LABEL: self.name}

    @property
    def labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "kubeonnx-runtime",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": "inference",
            "app.kubernetes.io/part-of": "kubeonnx",
            "app.kubernetes.io/managed-by": MANAGED_BY,
            MODEL_LABEL: self.name,
        }

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "namespace": self.namespace, "labels": self.labels}

    @property
    def route_path(self) -> str:
        """The path prefix under which the Ingress routes to this model ("/": the host's
        whole space)."""
        path = self.spec.ingress.path or f"/models/{self.namespace}/{self.name}"
        return path.rstrip("/") or "/"

    def url(self, config: OperatorConfig) -> str:
        host = f"{self.name}.{self.namespace}.svc.{config.cluster_domain}"
        return f"http://{host}/v2/models/{self.name}"

    def async_url(self, config: OperatorConfig) -> str | None:
        """Where asynchronous requests are submitted in the cluster: the gateway."""
        if not self.spec.async_.enabled:
            return None
        host = f"{self.gateway_name}.{self.namespace}.svc.{config.cluster_domain}"
        return f"http://{host}/v2/models/{self.name}/async-infer"

    def external_url(self) -> str | None:
        ing = self.spec.ingress
        if not ing.enabled or not ing.host:
            return None
        scheme = "https" if ing.tls_secret else "http"
        return f"{scheme}://{ing.host}{self.route_path.rstrip('/')}"

    def demand_query(self) -> str | None:
        """spec.scaling.demand's query with ${namespace} and ${name} filled in."""
        demand = self.spec.scaling.demand
        if demand is None:
            return None
        query = demand.prometheus_query.replace("${namespace}", self.namespace)
        return query.replace("${name}", self.name)

    @property
    def holds_requests(self) -> bool:
        """spec.scaling.holdRequests: the router holds requests while nothing is ready."""
        return self.spec.scaling.hold_requests

    def held_query(self) -> str:
        """The PromQL of the requests the router holds: what wakes a model that holds them."""
        return (
            f'sum(kubeonnx_router_held_requests{{namespace="{self.namespace}",'
            f'model="{self.name}"}}) or vector(0)'
        )

    def wake_signal(self) -> str | None:
        """What wakes the model from zero replicas, as the ScaledToZero message says it."""
        signals = []
        if self.holds_requests:
            signals.append(
                f"the router {self.name}{ROUTER_SUFFIX} holds a request ({self.held_query()} > 0)"
            )
        query = self.demand_query()
        if query is not None:
            signals.append(f"{query} > 0")
        if self.spec.async_.enabled:
            signals.append(f"requests are queued in {self.async_prefix}:requests")
        return " or ".join(signals) or None

    @property
    def gpu(self) -> bool:
        return self.spec.accelerator.count > 0

    def profile(self, config: OperatorConfig) -> AcceleratorProfile | None:
        """The accelerator profile of a GPU model (see `load_model`); None on CPU."""
        profile = self.spec.accelerator.profile
        return config.profiles[profile] if self.gpu and profile is not None else None


def load_model(
    name: str,
    namespace: str,
    raw_spec: dict[str, Any] | None,
    config: OperatorConfig,
    *,
    from_cluster: bool = False,
) -> Model:
    """Parse an InferenceModel's spec and check what the CRD cannot know: that its
    accelerator profile is one of this operator's, and that its route is its namespace's.
    `from_cluster`: fields a newer CRD added are ignored (and listed), not refused.
    Raises InvalidSpec."""
    check_name(name)
    if from_cluster:
        spec, ignored = read_spec(raw_spec)
        model = Model(name, namespace, spec, ignored=tuple(ignored))
    else:
        model = Model(name, namespace, parse_spec(raw_spec))
    if model.spec.async_.enabled and len(name) > ASYNC_NAME_MAX:
        raise InvalidSpec(
            f"metadata.name must be at most {ASYNC_NAME_MAX} characters when "
            f"spec.async.enabled is true: the gateway's Service is NAME{GATEWAY_SUFFIX}, "
            "a DNS label of at most 63 characters"
        )
    if (model.spec.traffic.candidates or model.holds_requests) and len(name) > ROUTER_NAME_MAX:
        why = (
            "spec.traffic.candidates"
            if model.spec.traffic.candidates
            else "spec.scaling.holdRequests"
        )
        raise InvalidSpec(
            f"metadata.name must be at most {ROUTER_NAME_MAX} characters with "
            f"{why}: the router's Deployment is NAME{ROUTER_SUFFIX}"
        )
    check_route(model.spec.ingress.path, namespace)
    profile = model.spec.accelerator.profile
    if model.gpu and profile not in config.profiles:
        known = ", ".join(sorted(config.profiles)) or "(none configured)"
        raise InvalidSpec(
            f"spec.accelerator.profile {profile!r} is not a profile of this operator; "
            f"known: {known}"
        )
    return model
