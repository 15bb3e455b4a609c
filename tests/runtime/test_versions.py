"""The model's Open Inference Protocol version on the real server: every per-model path
answers under /versions/V (with and without the route prefix), another version is a 404
naming the one served, metadata and answers report it, and every metric series carries it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from e2e.generate_images import generate as generate_images
from e2e.redis_server import LocalRedis
from tests.runtime.conftest import Served, start_server
from tests.runtime.test_images import LABELS, PROCESSING

VERSION = "2024-06.b_1"
PREFIX = "/models/ns/mlp"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = LocalRedis().start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def mlp(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], redis_url: str
) -> Iterator[Served]:
    served = start_server(
        tmp_path_factory.mktemp("versioned"),
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        env={
            "KUBEONNX_MODEL_VERSION": VERSION,
            "KUBEONNX_ROUTE_PREFIX": PREFIX,
            "KUBEONNX_ASYNC_REDIS_URL": redis_url,
            "KUBEONNX_ASYNC_PREFIX": "kubeonnx:{versions-test}",
        },
    )
    yield served
    served.stop()


@pytest.fixture(scope="module")
def classifier(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("versioned-classifier")
    (tmp / "labels.txt").write_text("\n".join(LABELS) + "\n")
    served = start_server(
        tmp,
        "--model-uri",
        f"file://{models['convnet']}",
        "--model-name",
        "classifier",
        env={
            "KUBEONNX_MODEL_VERSION": VERSION,
            "KUBEONNX_PROCESSING": json.dumps(PROCESSING),
            "KUBEONNX_LABELS_FILE": str(tmp / "labels.txt"),
        },
    )
    yield served
    served.stop()


def infer_body(rows: int = 2) -> dict:  # type: ignore[type-arg]
    values = np.arange(rows * 4, dtype=np.float32).tolist()
    return {"inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": values}]}


def test_tritonclient_with_model_version_infers_and_reads_metadata(
    mlp: Served, models: dict[str, Path]
) -> None:
    client = triton.InferenceServerClient(mlp.url.removeprefix("http://"))
    assert client.is_model_ready("mlp", VERSION)
    meta = client.get_model_metadata("mlp", VERSION)
    assert meta["versions"] == [VERSION]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for binary in (False, True):
        inp = triton.InferInput("input", [3, 4], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("mlp", [inp], model_version=VERSION)
        expected = ort.InferenceSession(str(models["mlp"])).run(None, {"input": x})[0]
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
        assert result.get_response()["model_version"] == VERSION
    # Another version is refused by name, as Triton clients expect.
    with pytest.raises(InferenceServerException, match=f"the served version is '{VERSION}'"):
        client.infer("mlp", [inp], model_version="1")
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("mlp", "1")


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_every_per_model_path_answers_its_version_and_refuses_another(
    mlp: Served, prefix: str
) -> None:
    base = f"{mlp.url}{prefix}/v2/models/mlp"
    with httpx.Client(timeout=30) as http:
        meta = http.get(f"{base}/versions/{VERSION}")
        assert meta.status_code == 200 and meta.json()["versions"] == [VERSION]
        assert http.get(base).json()["versions"] == [VERSION]
        ready = http.get(f"{base}/versions/{VERSION}/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        answer = http.post(f"{base}/versions/{VERSION}/infer", json=infer_body())
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == VERSION
        # The unversioned path serves the same version.
        assert http.post(f"{base}/infer", json=infer_body()).json()["model_version"] == VERSION

        # An asynchronous request submitted under the version is queued and answered.
        submitted = http.post(f"{base}/versions/{VERSION}/async-infer", json=infer_body())
        assert submitted.status_code == 202, submitted.text
        location = submitted.headers["location"]
        assert location.startswith(f"{prefix}/v2/models/mlp/requests/")
        request_id = location.rsplit("/", 1)[1]
        for url in (f"{mlp.url}{location}", f"{base}/versions/{VERSION}/requests/{request_id}"):
            assert http.get(url).status_code in (200, 202)

        for method, path in [
            ("GET", "/versions/7"),
            ("GET", "/versions/7/ready"),
            ("POST", "/versions/7/infer"),
            ("POST", "/versions/7/async-infer"),
            ("GET", f"/versions/7/requests/{request_id}"),
            ("POST", "/versions/7/predict"),
            ("POST", "/versions/7/predict/batch"),
        ]:
            r = http.request(method, f"{base}{path}", json=infer_body())
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert r.json()["error"] == (
                f"model 'mlp' has no version '7'; the served version is '{VERSION}'"
            ), path


def test_image_endpoints_take_the_version_path(classifier: Served, tmp_path: Path) -> None:
    photo = generate_images(tmp_path)["photo.jpg"].read_bytes()
    base = f"{classifier.url}/v2/models/classifier/versions/{VERSION}"
    with httpx.Client(timeout=60) as http:
        one = http.post(f"{base}/predict", content=photo)
        assert one.status_code == 200, one.text
        assert one.json()["predictions"][0]["label"] in LABELS
        batch = http.post(f"{base}/predict/batch", files=[("files", photo), ("files", photo)])
        assert batch.status_code == 200, batch.text
        assert [r["image"] for r in batch.json()["results"]] == [0, 1]
        wrong = http.post(
            f"{classifier.url}/v2/models/classifier/versions/1/predict", content=photo
        )
        assert wrong.status_code == 404 and f"the served version is '{VERSION}'" in wrong.text


def test_every_metric_series_carries_the_version(mlp: Served) -> None:
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{mlp.url}/v2/models/mlp/infer", json=infer_body()).status_code == 200
        text = http.get(f"{mlp.url}/metrics").text
    series = [
        sample
        for family in text_string_to_metric_families(text)
        if family.name.startswith("kubeonnx_")
        for sample in family.samples
    ]
    names = {s.name for s in series}
    # The ones KEDA, the dashboards and the docs read are among them.
    assert {"kubeonnx_inflight_requests", "kubeonnx_requests_total"} <= names
    assert "kubeonnx_request_duration_seconds_bucket" in names
    unlabelled = [s for s in series if s.labels.get("version") != VERSION]
    assert not unlabelled
    assert all(s.labels.get("model") == "mlp" for s in series)


@pytest.mark.parametrize("bad", ["a/b", "-1", "v 2", "x" * 64, "..", "é"])
def test_a_version_that_cannot_be_a_path_segment_or_label_refuses_to_start(
    tmp_path: Path, bad: str
) -> None:
    served = start_server(
        tmp_path,
        "--model-uri",
        "file:///none.onnx",
        env={"KUBEONNX_MODEL_VERSION": bad},
        wait_ready=False,
    )
    assert served.proc.wait(60) == 2
    assert "--model-version (KUBEONNX_MODEL_VERSION)" in served.termination_log.read_text()
