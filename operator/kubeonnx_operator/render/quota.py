"""The Secret holding the runtime's quota configuration (key hashes and limits)."""

from __future__ import annotations

import base64
import json
from typing import Any

from .model import Model

QUOTA_DIR = "/etc/kubeonnx/quota"
QUOTA_FILE = "config.json"


def render_quota_secret(model: Model) -> dict[str, Any]:
    assert model.quota is not None
    content = json.dumps(model.quota.config, sort_keys=True, indent=1).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {**model.metadata(), "name": model.quota_secret_name},
        "type": "Opaque",
        "data": {QUOTA_FILE: base64.b64encode(content).decode()},
    }
