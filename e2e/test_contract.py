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
from e2e.generate_images import generate as generate_images
from e2e.generate_models import generate
from e2e.operator_process import OperatorProcess
from e2e.redis_server import LocalRedis
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


@pytest.fixture(scope="module")
def queue() -> Iterator[LocalRedis]:
    server = LocalRedis().start()
    yield server
    server.stop()


def test_the_async_gateway_and_the_image_model_run_as_the_operator_wrote_them(
    cluster: Cluster,
    operator: OperatorProcess,
    queue: LocalRedis,
    namespace: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One model with both: the gateway takes a request while the model is not running, the
    model's replica answers it, and its /predict classifies an image."""
    models = generate(tmp_path_factory.mktemp("convnet"), ["convnet"])
    images = generate_images(tmp_path / "images")
    labels = [f"class-{i}" for i in range(10)]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "labels"},
        "data": {"labels.txt": "\n".join(labels) + "\n"},
    }
    assert cluster.apply(config_map, namespace).returncode == 0
    doc = {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "both"},
        "spec": {
            "model": {"uri": f"file://{models['convnet']}"},
            "runtime": {"maxBatchSize": 8},
            "scaling": {"autoscaler": "keda", "minReplicas": 0, "maxReplicas": 2},
            "async": {
                "enabled": True,
                "redis": {"url": queue.url},
                "claimAfter": "5s",
            },
            "processing": {
                "input": {"image": {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}},
                "output": {
                    "classification": {
                        "labelsConfigMap": {"name": "labels", "key": "labels.txt"},
                        "topK": 2,
                    }
                },
            },
        },
    }
    assert cluster.apply(doc, namespace).returncode == 0
    deployments = eventually(
        lambda: (
            (g := cluster.get("deployment", "both-gateway", "-n", namespace))
            and (m := cluster.get("deployment", "both", "-n", namespace))
            and (g, m)
        ),
        30,
        what="the Deployments",
    )
    gateway_deployment, model_deployment = deployments
    config_maps = {"labels": config_map}
    gateway = run_container(gateway_deployment, {}, tmp_path / "gateway", config_maps=config_maps)
    try:
        gateway.probe("readinessProbe")
        env = {e["name"]: e.get("value") for e in gateway.container["env"]}
        prefix = env["KUBEONNX_ROUTE_PREFIX"]  # the path the Ingress routes to the gateway
        x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        submitted = httpx.post(f"{gateway.url}{prefix}/v2/models/both/async-infer", json=body)
        assert submitted.status_code == 202, submitted.text
        location = submitted.headers["location"]
        assert location.startswith(f"{prefix}/v2/models/both/requests/")
        assert httpx.get(f"{gateway.url}{location}").status_code == 202  # no replica yet

        model = run_container(model_deployment, {}, tmp_path / "model", config_maps=config_maps)
        try:
            model.probe("startupProbe")
            model.probe("readinessProbe")
            answer = eventually(
                lambda: (r := httpx.get(f"{gateway.url}{location}")).status_code == 200 and r,
                60,
                what="the queued request's answer",
            )
            expected = ort.InferenceSession(str(models["convnet"])).run(None, {"input": x})[0]
            got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(got, expected.ravel(), rtol=1e-5, atol=1e-6)

            predicted = httpx.post(
                f"{model.url}/v2/models/both/predict",
                content=images["photo.jpg"].read_bytes(),
                timeout=30,
            )
            assert predicted.status_code == 200, predicted.text
            top = predicted.json()["predictions"]
            assert len(top) == 2 and all(p["label"] == labels[p["index"]] for p in top)
        finally:
            assert model.stop() == 0
    finally:
        assert gateway.stop() == 0
