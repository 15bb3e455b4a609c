"""QuotaPolicy: its spec, and the runtime's quota configuration rendered from it.

The runtime's file (`KUBEONNX_QUOTA_CONFIG`) holds only the sha256 of each API key; the keys
themselves stay in their Secrets, which the operator reads to hash them. The file's format is
the runtime's contract (`kubeonnx_runtime.quota.QuotaConfig`); a contract test holds the two
packages together, since neither may import the other.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from .spec import InvalidSpec

if TYPE_CHECKING:
    from .status import ModelReason

WINDOW_SECONDS = {"1s": 1, "1m": 60, "1h": 3600, "1d": 86400}


def counter_key(
    namespace: str, policy: str, tenant: str, unit: str, window: str, now: float
) -> str:
    """The runtime's Redis key for a tenant's count in the window under way at `now`
    (`kubeonnx_runtime.quota.counter_key`; a contract test holds the two together)."""
    bucket = int(now // WINDOW_SECONDS[window])
    return f"kubeonnx:{{{namespace}/{policy}/{tenant}}}:{unit}-{window}:{bucket}"


def reset_at(window: str, now: float) -> float:
    seconds = WINDOW_SECONDS[window]
    return float((int(now // seconds) + 1) * seconds)


# The runtime reads the Redis password from this variable (the Deployment sets it from the
# policy's passwordSecret).
REDIS_PASSWORD_ENV = "KUBEONNX_QUOTA_REDIS_PASSWORD"
# ... and the usage ledger's PostgreSQL connection string from this one.
LEDGER_DSN_ENV = "KUBEONNX_LEDGER_DSN"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKey(_Spec):
    name: str
    key: str


class Limit(_Spec):
    unit: Literal["requests", "rows"]
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


class QuotaPolicySpec(_Spec):
    tenant_header: str = "X-Api-Key"
    tenants: list[Tenant] = []
    default_tenant: DefaultTenant | None = None
    failure_mode: Literal["Closed", "Open", "Local"] = "Closed"
    shadow: bool = False
    backend: Backend = Backend()
    ledger: LedgerSpec | None = None
    decision_budget_ms: int = Field(25, ge=1, le=10000)


def parse_policy(raw: dict[str, Any] | None) -> QuotaPolicySpec:
    try:
        return QuotaPolicySpec.model_validate(raw or {})
    except ValidationError as exc:
        raise InvalidSpec(str(exc)) from None


def secret_keys(secret: dict[str, Any], key: str) -> list[str] | None:
    """The API keys in a Secret's `key` (data, or stringData in a manifest not yet applied):
    one a line, several during a rotation; None when the key is missing."""
    raw = (secret.get("data") or {}).get(key)
    if raw is not None:
        text = base64.b64decode(raw).decode("utf-8", "replace")
    elif (secret.get("stringData") or {}).get(key) is not None:
        text = secret["stringData"][key]
    else:
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class ResolvedQuota:
    """A model's QuotaPolicy as the runtime takes it: its configuration file (key hashes,
    limits) and the Secret holding the Redis password, if any."""

    config: dict[str, Any]
    redis_password: tuple[str, str] | None = None  # (Secret name, key)
    ledger_dsn: tuple[str, str] | None = None  # (Secret name, key)


class QuotaProblem(Exception):
    """Why a model's QuotaPolicy cannot be rendered: a status reason and its message."""

    def __init__(self, reason: ModelReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def secret_names(policy: dict[str, Any] | None) -> set[str]:
    """The Secrets a QuotaPolicy's tenants name (none when the policy does not parse)."""
    try:
        spec = parse_policy((policy or {}).get("spec"))
    except InvalidSpec:
        return set()
    return {t.api_key_secret.name for t in spec.tenants}


def tenant_keys(
    spec: QuotaPolicySpec, secrets: Mapping[str, dict[str, Any] | None]
) -> tuple[dict[str, list[str]], list[Tenant]]:
    """Each tenant's API keys from its Secret (given by name), and the tenants whose Secret
    or key is missing or empty."""
    keys: dict[str, list[str]] = {}
    missing: list[Tenant] = []
    for tenant in spec.tenants:
        ref = tenant.api_key_secret
        secret = secrets.get(ref.name)
        found = secret_keys(secret, ref.key) if secret is not None else None
        if found:
            keys[tenant.name] = found
        else:
            missing.append(tenant)
    return keys, missing


def resolve_quota(
    policy_name: str,
    namespace: str,
    policy: dict[str, Any] | None,
    secrets: Mapping[str, dict[str, Any] | None],
    replicas: int,
) -> ResolvedQuota:
    """The runtime's quota file for a model that names `policy_name`, from the policy's body
    and its tenants' Secrets (by name); raises QuotaProblem saying what is missing."""
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
    keys, missing = tenant_keys(spec, secrets)
    if missing:
        ref = missing[0].api_key_secret
        raise QuotaProblem(
            "QuotaSecretNotFound",
            f"QuotaPolicy {policy_name!r}, tenant {missing[0].name!r}: no API key in Secret "
            f"{ref.name!r} under key {ref.key!r}",
        )
    redis = spec.backend.redis
    password = redis.password_secret if redis is not None else None
    dsn = spec.ledger.postgres.dsn_secret if spec.ledger is not None else None
    return ResolvedQuota(
        runtime_config(policy_name, namespace, spec, keys, replicas),
        (password.name, password.key) if password is not None else None,
        (dsn.name, dsn.key) if dsn is not None else None,
    )


def runtime_config(
    policy_name: str,
    namespace: str,
    spec: QuotaPolicySpec,
    keys: dict[str, list[str]],
    replicas: int,
) -> dict[str, Any]:
    """The runtime's quota file for one model: key hashes, never keys."""
    config: dict[str, Any] = {
        "policy": policy_name,
        "namespace": namespace,
        "decisionBudgetMs": spec.decision_budget_ms,
        "tenantHeader": spec.tenant_header,
        "tenants": [
            {
                "name": t.name,
                "keySha256": sorted(hashlib.sha256(k.encode()).hexdigest() for k in keys[t.name]),
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
    return config
