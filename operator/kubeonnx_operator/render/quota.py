"""The ConfigMap holding the runtime's quota configuration: limits, and where each tenant's
keys are mounted (never a key: those stay in the tenants' Secrets, mounted by the kubelet)."""

from __future__ import annotations

import json
from typing import Any

from .model import Model

QUOTA_DIR = "/etc/kubeonnx/quota"
QUOTA_FILE = "config.json"


def render_quota_config(model: Model) -> dict[str, Any]:
    assert model.quota is not None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**model.metadata(), "name": model.quota_config_name},
        "data": {QUOTA_FILE: json.dumps(model.quota.config, sort_keys=True, indent=1)},
    }
