"""spec.model.version through the real API server: its default (and `kubectl explain`), CEL
refusing a version that cannot be a path segment or label value, and the Deployment the
operator writes serving the version as the runtime's contract says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml

from e2e.conftest import Cluster, eventually
from e2e.contract import run_container
from e2e.generate_models import generate
from e2e.operator_process import OperatorProcess
from e2e.s3 import CREDENTIALS, LocalS3

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
VERSION_RULE = "spec.model.version must be letters, digits, '.', '_' and '-'"


def model(name: str, **source: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": f"s3://models/{name}/model.onnx", **source}},
    }


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("a/b", VERSION_RULE),
        ("-1", VERSION_RULE),
        ("v 2", VERSION_RULE),
        ("", VERSION_RULE),
        ("x" * 64, "spec.model.version: Too long"),
    ],
)
def test_a_bad_version_is_refused_by_the_api_server_naming_the_field(
    cluster: Cluster, operator: OperatorProcess, namespace: str, version: str, message: str
) -> None:
    refused = cluster.apply(model("badversion", version=version), namespace)
    assert refused.returncode != 0
    assert message in refused.stderr
    assert cluster.get("inferencemodel", "badversion", "-n", namespace) is None


def test_the_version_defaults_to_1_and_kubectl_explain_says_so(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(model("defaultversion"), namespace).returncode == 0
    im = cluster.get("inferencemodel", "defaultversion", "-n", namespace)
    assert im and im["spec"]["model"]["version"] == "1"
    explained = cluster.kubectl("explain", "inferencemodels.spec.model.version")
    assert 'default "1"' in " ".join(explained.stdout.split())
    status = eventually(
        lambda: (cluster.get("inferencemodel", "defaultversion", "-n", namespace) or {}).get(
            "status", {}
        ),
        60,
        what="the operator's status",
    )
    assert status["version"] == "1"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    mlp = generate(tmp_path_factory.mktemp("models"), ["mlp"])["mlp"]
    s3 = LocalS3().start()
    s3.put_models({"mlp": mlp}, keys={"mlp": "mlp/v1/model.onnx"})
    yield s3
    s3.stop()


def test_the_operators_deployment_serves_the_version(
    cluster: Cluster, operator: OperatorProcess, s3: LocalS3, namespace: str, tmp_path: Path
) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "cpu-hpa.yaml").read_text())
    doc["spec"]["model"]["s3"]["endpoint"] = s3.endpoint
    doc["spec"]["model"]["version"] = "2024-06.rc1"
    cluster.create_secret("s3-credentials", namespace, CREDENTIALS)
    assert cluster.apply(doc, namespace).returncode == 0
    name = doc["metadata"]["name"]
    deployment = eventually(
        lambda: cluster.get("deployment", name, "-n", namespace), 30, what="the Deployment"
    )
    secret = cluster.get("secret", "s3-credentials", "-n", namespace)
    assert secret
    runtime = run_container(deployment, {"s3-credentials": secret}, tmp_path)
    try:
        runtime.probe("startupProbe")
        runtime.probe("readinessProbe")
        client = triton.InferenceServerClient(runtime.url.removeprefix("http://"))
        assert client.get_model_metadata(name, "2024-06.rc1")["versions"] == ["2024-06.rc1"]
        inp = triton.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4), np.float32))
        answer = client.infer(name, [inp], model_version="2024-06.rc1")
        assert answer.get_response()["model_version"] == "2024-06.rc1"
        other = httpx.get(f"{runtime.url}/v2/models/{name}/versions/1")
        assert other.status_code == 404 and "2024-06.rc1" in other.json()["error"]
        metrics = httpx.get(runtime.metrics_url).text
        assert 'version="2024-06.rc1"' in metrics
    finally:
        assert runtime.stop() == 0
    status = eventually(
        lambda: (
            (cluster.get("inferencemodel", name, "-n", namespace) or {})
            .get("status", {})
            .get("version")
        ),
        60,
        what="status.version",
    )
    assert status == "2024-06.rc1"
