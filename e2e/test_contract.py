"""The operator-runtime contract: the Deployment the operator writes runs, as written, as a
working runtime (see e2e/contract.py for what a kubelet would translate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
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
EXAMPLE = ROOT / "examples" / "cpu-hpa.yaml"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("models"), ["mlp"])["mlp"]


@pytest.fixture(scope="module")
def s3(model_path: Path) -> Iterator[LocalS3]:
    s3 = LocalS3().start()
    s3.put_models({"mlp": model_path}, keys={"mlp": "mlp/v1/model.onnx"})
    yield s3
    s3.stop()


def test_the_operators_deployment_runs_as_a_working_runtime(
    cluster: Cluster,
    operator: OperatorProcess,
    s3: LocalS3,
    model_path: Path,
    namespace: str,
    tmp_path: Path,
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["model"]["s3"]["endpoint"] = s3.endpoint  # where "the store" is in this test
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
        runtime.probe("livenessProbe")
        client = triton.InferenceServerClient(runtime.url.removeprefix("http://"))
        meta = client.get_model_metadata(name)
        assert meta["inputs"][0]["shape"] == [-1, 4]
        x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
        inp = triton.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer(name, [inp]).as_numpy("output")
        # The answer is the model's own: the model the S3 stand-in holds, run directly.
        expected = ort.InferenceSession(str(model_path)).run(None, {"input": x})[0]
        assert out is not None
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        # The Ingress path reaches the same API without a rewrite.
        im = cluster.get("inferencemodel", name, "-n", namespace)
        assert im and im["status"]["url"].endswith(f"/v2/models/{name}")
        env = {e["name"]: e.get("value") for e in runtime.container["env"]}
        prefixed = httpx.get(f"{runtime.url}{env['KUBEONNX_ROUTE_PREFIX']}/v2/models/{name}")
        assert prefixed.status_code == 200
    finally:
        assert runtime.stop() == 0
