"""Operator configuration: runtime images, accelerator profiles, ingress and KEDA defaults.

Read from a YAML file (`--config` or KUBEONNX_OPERATOR_CONFIG, camelCase keys) and
`KUBEONNX_OPERATOR_*` environment variables (snake_case after the prefix); the variables
win. Only prefixed variables count: a stray `NAMESPACES` in the pod changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel, to_snake
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_IMAGE = "ghcr.io/kubeonnx/runtime:0.1.0"
DEFAULT_GPU_IMAGE = "ghcr.io/kubeonnx/runtime:0.1.0-cuda"


class AcceleratorProfile(BaseModel):
    """How to ask for one kind of accelerator: the extended resource and where it lives."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    resource_name: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    runtime_class_name: str | None = None  # e.g. "nvidia" where the GPU runtime is not default


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KUBEONNX_OPERATOR_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    runtime_image: str = DEFAULT_IMAGE
    runtime_gpu_image: str = DEFAULT_GPU_IMAGE
    image_pull_policy: str = "IfNotPresent"
    profiles: dict[str, AcceleratorProfile] = {
        "h100": AcceleratorProfile(
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        ),
        "nvidia": AcceleratorProfile(node_selector={"nvidia.com/gpu.present": "true"}),
    }
    ingress_class: str | None = None
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    # Every ScaledObject's pollingInterval and cooldownPeriod (how long a model with no
    # demand stays up before KEDA scales it to zero).
    keda_polling_seconds: int = Field(15, ge=1)
    keda_cooldown_seconds: int = Field(300, ge=0)
    cluster_domain: str = "cluster.local"
    namespaces: list[str] = Field(default_factory=list, description="empty: every namespace")
    pod_monitor: bool = True  # render a PodMonitor where its CRD is installed
    resync_seconds: float = 60.0
    # Each watch asks the API server to end it after 1-2x this, then resumes: a watch whose
    # connection silently died is noticed within 2x this plus 30 s.
    watch_timeout_seconds: int = Field(300, ge=5, le=3600)
    health_port: int = 8081
    max_concurrent_reconciles: int = Field(8, ge=1, le=256)
    leader_election: bool = True
    lease_name: str = "kubeonnx-operator"
    lease_namespace: str = ""  # default: the pod's namespace

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def load_config(path: str | Path | None = None) -> OperatorConfig:
    """The file's settings (if any) under the environment's."""
    path = path or os.environ.get("KUBEONNX_OPERATOR_CONFIG")
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"operator config {path} must be a YAML mapping")
        data = loaded or {}
    # The file speaks camelCase (as the chart's values do); the settings are snake_case.
    # (An alias generator would do this too, but pydantic-settings then also reads the
    # unprefixed alias from the environment.)
    return OperatorConfig(**{to_snake(k): v for k, v in data.items()})
