"""CRD/operator skew on the real API server: the CRD a newer release might ship (a field
added at the top of the spec and one in spec.runtime) is applied, as the documented upgrade
applies CRDs before the operator, and this operator, started with it in place, serves a model
that sets both: Ready, with a FieldsIgnored condition naming them. The module's CRDs are put
back afterwards."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import model, ready

pytestmark = pytest.mark.e2e
CRD = Path(__file__).resolve().parent.parent / "crds" / "inferencemodels.kubeonnx.io.yaml"
FUTURE = {"futureField": "on", "runtime": {"futureKnob": 3}}


def newer_crd() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["futureField"] = {"type": "string", "description": "A newer field."}
    runtime = spec["properties"]["runtime"]["properties"]
    runtime["futureKnob"] = {"type": "integer", "description": "A newer knob."}
    return dict(crd)


@pytest.fixture
def newer_crds(cluster: Cluster, operator: OperatorProcess, namespace: str) -> Iterator[None]:
    crd = yaml.safe_dump(newer_crd())
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crd)
    probe = yaml.safe_dump(model("probe", **copy.deepcopy(FUTURE)))

    def kept() -> bool:
        """The API server keeps both fields: it prunes them until the new schema is in force."""
        sent = cluster.kubectl(
            "apply",
            "--dry-run=server",
            "-o",
            "json",
            "-n",
            namespace,
            "-f",
            "-",
            input=probe,
            check=False,
        )
        if sent.returncode != 0:
            return False
        spec = json.loads(sent.stdout)["spec"]
        return "futureField" in spec and "futureKnob" in spec["runtime"]

    try:
        eventually(kept, 60, what="the newer CRD's schema in force")
        # A watch opened before the CRD changed may go on serving objects pruned by the old
        # schema until it is re-established; an operator started now (a rollback, or the
        # old operator's pod restarted during the upgrade) reads them whole.
        operator.stop()
        operator.start()
        yield
    finally:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))


def test_a_model_with_a_newer_crds_fields_is_served_and_names_them(
    cluster: Cluster, namespace: str, newer_crds: None
) -> None:
    obj = model("newer", **copy.deepcopy(FUTURE))
    obj["spec"]["runtime"]["maxBatchSize"] = 4
    applied = cluster.apply(obj, namespace)
    assert applied.returncode == 0, applied.stderr
    stored = cluster.get("inferencemodel", "newer", "-n", namespace) or {}
    assert stored["spec"]["futureField"] == "on"  # the API server kept it: the CRD knows it
    im = ready(cluster, namespace, "newer", timeout=90)
    conditions = {c["type"]: c for c in im["status"]["conditions"]}
    ignored = conditions["FieldsIgnored"]
    assert ignored["status"] == "True" and ignored["reason"] == "UnknownFields"
    assert ignored["message"].endswith("spec.futureField, spec.runtime.futureKnob")
    # What the operator knows of the spec is still served as written.
    deployment = cluster.get("deployment", "newer", "-n", namespace) or {}
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBEONNX_MAX_BATCH_SIZE"] == "4"
