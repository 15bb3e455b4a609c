"""QuotaPolicy: its spec, and the runtime's quota configuration rendered from it.

The runtime's file (`KUBEONNX_QUOTA_CONFIG`) names, for each tenant, the file its API keys are
mounted at: the kubelet mounts the tenants' Secrets into the model's pods, so the operator
never reads a key (it asks only whether each Secret exists, see `presence`). The file's
format is the runtime's contract (`kubeonnx_runtime.quota.QuotaConfig`); a contract test
holds the two packages together, since neither may import the other.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .spec import POLICY_MUST_UNDERSTAND, InvalidSpec, validate_tolerant

if TYPE_CHECKING:
    from .status import ModelReason

# The runtime reads the Redis password from this variable (the Deployment sets it from the
# policy's passwordSecret).
REDIS_PASSWORD_ENV = "KUBEONNX_QUOTA_REDIS_PASSWORD"
# ... and the usage ledger's PostgreSQL connection string from this one.
LEDGER_DSN_ENV = "KUBEONNX_LEDGER_DSN"
# The tenants' Secrets are mounted beside the runtime's quota file, each key at
# keys/<Secret name>/<key>; the file names them relative to its own directory.
KEYS_DIR = "keys"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKey(_Spec):
    name: str
    key: str


class Limit(_Spec):
    unit: Literal["requests", "rows", "tokens"]
    limit: int = Field(ge=0)
    window: Literal["1s", "1m", "1h", "1d"]


# The runtime's identity for requests without a known key (spec.defaultTenant): no tenant
# may take the name, or it would share their limits, counters and asynchronous results.
DEFAULT_TENANT = "default"


class Tenant(_Spec):
    name: str
    api_key_secret: SecretKey
    limits: list[Limit] = []

    @field_validator("name")
    @classmethod
    def _not_default(cls, name: str) -> str:
        if name == DEFAULT_TENANT:
            raise ValueError(
                f"spec.tenants[].name {DEFAULT_TENANT!r} is reserved for requests without a "
                "known key (spec.defaultTenant)"
            )
        return name


class DefaultTenant(_Spec):
    limits: list[Limit] = []


class RedisSpec(_Spec):
    url: str
    password_secret: SecretKey | None = None


class Backend(_Spec):
    redis: RedisSpec | None = None


class PostgresLedger(_Spec):
    dsn_secret: SecretKey


class LedgerSpec(_Spec):
    postgres: PostgresLedger


class TokensSpec(_Spec):
    """What a request's tokens are: the elements of one integer input of the models, every
    one (`elements`) or the non-zero ones (`nonzero`: an attention mask without padding)."""

    input: str = Field(min_length=1, max_length=256)
    count: Literal["elements", "nonzero"]


class QuotaPolicySpec(_Spec):
    tenant_header: str = "X-Api-Key"
    tenants: list[Tenant] = []
    default_tenant: DefaultTenant | None = None
    failure_mode: Literal["Closed", "Open", "Local"] = "Closed"
    shadow: bool = False
    backend: Backend = Backend()
    ledger: LedgerSpec | None = None
    decision_budget_ms: int = Field(25, ge=1, le=10000)
    tokens: TokensSpec | None = None

    @model_validator(mode="after")
    def _tokens_counted(self) -> QuotaPolicySpec:
        if self.tokens is not None:
            return self
        limits = [(f"spec.tenants[{t.name}]", t.limits) for t in self.tenants]
        if self.default_tenant is not None:
            limits.append(("spec.defaultTenant", self.default_tenant.limits))
        for where, those in limits:
            if any(lim.unit == "tokens" for lim in those):
                raise ValueError(
                    f"{where}.limits: a limit of unit tokens needs spec.tokens (the input "
                    "whose elements are counted)"
                )
        return self

    def tokens_message(self) -> str:
        """How tokens are counted, as the policy's status says it ("" without tokens)."""
        if self.tokens is None:
            return ""
        what = "non-zero elements" if self.tokens.count == "nonzero" else "elements"
        return f"tokens: the {what} of input {self.tokens.input}"


def read_policy(raw: dict[str, Any] | None) -> tuple[QuotaPolicySpec, list[str]]:
    """A QuotaPolicy's spec as read from the cluster, and the fields a newer CRD added that
    this operator ignores (see `spec.validate_tolerant`)."""
    try:
        return validate_tolerant(QuotaPolicySpec, raw or {}, POLICY_MUST_UNDERSTAND)
    except ValidationError as exc:
        raise InvalidSpec(str(exc)) from None


def parse_policy(raw: dict[str, Any] | None, *, strict: bool = False) -> QuotaPolicySpec:
    """A QuotaPolicy's spec; `strict` (`kubeonnx render`) also refuses unknown fields."""
    if not strict:
        return read_policy(raw)[0]
    try:
        return QuotaPolicySpec.model_validate(raw or {})
    except ValidationError as exc:
        raise InvalidSpec(str(exc)) from None


@dataclass(frozen=True)
class ResolvedQuota:
    """A model's QuotaPolicy as the runtime takes it: its configuration file (limits, and
    where each tenant's keys are mounted), the tenants' Secrets to mount (name and keys), and
    the Secrets holding the Redis password and the ledger's DSN, if any."""

    config: dict[str, Any]
    key_secrets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    redis_password: tuple[str, str] | None = None  # (Secret name, key)
    ledger_dsn: tuple[str, str] | None = None  # (Secret name, key)


class QuotaProblem(Exception):
    """Why a model's QuotaPolicy cannot be rendered: a status reason and its message."""

    def __init__(self, reason: ModelReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def secret_names(policy: dict[str, Any] | None) -> list[str]:
    """The Secrets a QuotaPolicy's tenants name (none when the policy does not parse)."""
    try:
        spec = parse_policy((policy or {}).get("spec"))
    except InvalidSpec:
        return []
    return list(dict.fromkeys(t.api_key_secret.name for t in spec.tenants))


def key_file(ref: SecretKey) -> str:
    """Where a tenant's keys are in the runtime's pods, from the quota file's directory."""
    return f"{KEYS_DIR}/{ref.name}/{ref.key}"


def resolve_quota(
    policy_name: str,
    namespace: str,
    policy: dict[str, Any] | None,
    replicas: int,
    missing_secrets: Collection[str] = (),
) -> ResolvedQuota:
    """The runtime's quota file for a model that names `policy_name`, from the policy's body;
    raises QuotaProblem saying what is missing (the policy, or a tenant's Secret among
    `missing_secrets`) or wrong."""
    if policy is None:
        raise QuotaProblem(
            "QuotaPolicyNotFound",
            f"QuotaPolicy {policy_name!r} does not exist in namespace {namespace}; the model "
            "is not served without the budgets it names",
        )
    try:
        spec = parse_policy(policy.get("spec"))
    except InvalidSpec as exc:
        raise QuotaProblem("QuotaPolicyInvalid", f"QuotaPolicy {policy_name!r}: {exc}") from None
    for tenant in spec.tenants:
        ref = tenant.api_key_secret
        if ref.name in missing_secrets:
            raise QuotaProblem(
                "QuotaSecretNotFound",
                f"QuotaPolicy {policy_name!r}, tenant {tenant.name!r}: Secret {ref.name!r} "
                f"(its API keys, under key {ref.key!r}) does not exist",
            )
    keys: dict[str, list[str]] = {}
    for tenant in spec.tenants:
        ref = tenant.api_key_secret
        keys.setdefault(ref.name, [])
        if ref.key not in keys[ref.name]:
            keys[ref.name].append(ref.key)
    redis = spec.backend.redis
    password = redis.password_secret if redis is not None else None
    dsn = spec.ledger.postgres.dsn_secret if spec.ledger is not None else None
    return ResolvedQuota(
        runtime_config(policy_name, namespace, spec, replicas),
        tuple((name, tuple(sorted(names))) for name, names in sorted(keys.items())),
        (password.name, password.key) if password is not None else None,
        (dsn.name, dsn.key) if dsn is not None else None,
    )


def runtime_config(
    policy_name: str,
    namespace: str,
    spec: QuotaPolicySpec,
    replicas: int,
) -> dict[str, Any]:
    """The runtime's quota file for one model: where each tenant's keys are mounted, never
    the keys."""
    config: dict[str, Any] = {
        "policy": policy_name,
        "namespace": namespace,
        "decisionBudgetMs": spec.decision_budget_ms,
        "tenantHeader": spec.tenant_header,
        "tenants": [
            {
                "name": t.name,
                "keyFile": key_file(t.api_key_secret),
                "limits": [lim.model_dump() for lim in t.limits],
            }
            for t in spec.tenants
        ],
        "failureMode": spec.failure_mode,
        "shadow": spec.shadow,
        "replicas": replicas,
    }
    if spec.default_tenant is not None:
        config["defaultTenant"] = {
            "limits": [lim.model_dump() for lim in spec.default_tenant.limits]
        }
    if spec.backend.redis is not None:
        config["redis"] = {"url": spec.backend.redis.url}
        if spec.backend.redis.password_secret is not None:
            config["redis"]["passwordEnv"] = REDIS_PASSWORD_ENV
    if spec.ledger is not None:
        config["ledger"] = {"dsnEnv": LEDGER_DSN_ENV}
    if spec.tokens is not None:
        config["tokens"] = spec.tokens.model_dump()
    return config
