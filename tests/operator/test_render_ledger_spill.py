"""The usage ledger's spill directory: every pod that charges a ledger (the model's and its
gateway's) mounts a volume there, the model's own `ledger-spill` volume when it names one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubeonnx_operator.cli import render_documents
from kubeonnx_operator.config import OperatorConfig
from kubeonnx_operator.render.deployment import LEDGER_SPILL_DIR

EXAMPLE = Path(__file__).parents[2] / "examples" / "quota-policy.yaml"


def deployments(volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    for doc in docs:
        if doc["kind"] == "InferenceModel":
            doc["spec"]["async"] = {"enabled": True, "redis": {"url": "redis://redis:6379/0"}}
            doc["spec"]["pod"] = {"volumes": volumes}
    children, problems = render_documents([("x", d) for d in docs], OperatorConfig())
    assert not problems
    return [c for c in children if c["kind"] == "Deployment"]


def spill_volume(deployment: dict[str, Any]) -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEONNX_LEDGER_SPILL_DIR"] == LEDGER_SPILL_DIR
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == LEDGER_SPILL_DIR]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_the_model_and_its_gateway_mount_the_spill_directory() -> None:
    rendered = deployments([])
    assert len(rendered) == 2  # the model's and the gateway's
    for deployment in rendered:
        assert "emptyDir" in spill_volume(deployment)


def test_a_models_own_ledger_spill_volume_replaces_the_empty_dir() -> None:
    claim = {"name": "ledger-spill", "persistentVolumeClaim": {"claimName": "usage-spill"}}
    rendered = deployments([claim])
    assert len(rendered) == 2  # the model's and the gateway's
    for deployment in rendered:
        assert spill_volume(deployment) == claim
