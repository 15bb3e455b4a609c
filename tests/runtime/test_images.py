"""Image endpoints on the real server: answers equal the declared preprocessing plus
onnxruntime run directly; hostile images get a 400 that names the problem."""

from __future__ import annotations

import concurrent.futures
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from kubeonnx_runtime.datatypes import TensorSpec
from kubeonnx_runtime.errors import FatalStartupError, InvalidRequest
from kubeonnx_runtime.images import ImagePipeline, load_processing, parse_multipart
from kubeonnx_runtime.quota import key_hash
from PIL import ExifTags, Image, ImageOps

from e2e.generate_images import generate as generate_images
from tests.runtime.conftest import Served, start_server

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
PROCESSING = {
    "input": {"image": {"size": [32, 32], "mean": MEAN, "std": STD, "maxPixels": 1_000_000}},
    "output": {"classification": {"topK": 3, "softmax": True}},
}
GOOD = ["photo.jpg", "wide.png", "small.webp", "gray.jpg", "alpha.png", "palette.png", "tiny.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def classifier(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[Served]:
    yield from image_server(tmp_path_factory, models["convnet"], "classifier", PROCESSING, LABELS)


def image_server(
    factory: pytest.TempPathFactory,
    model: Path,
    name: str,
    processing: dict,  # type: ignore[type-arg]
    labels: list[str],
) -> Iterator[Served]:
    """The real server with image endpoints, its labels in a file, batches of up to 16."""
    tmp = factory.mktemp(name)
    labels_file = tmp / "labels.txt"
    labels_file.write_text("\n".join(labels) + "\n")
    served = start_server(
        tmp,
        "--model-uri",
        f"file://{model}",
        "--model-name",
        name,
        "--max-batch-size",
        "16",
        env={
            "KUBEONNX_PROCESSING": json.dumps(processing),
            "KUBEONNX_LABELS_FILE": str(labels_file),
        },
    )
    yield served
    served.stop()


def reference(model: Path, path: Path | io.BytesIO) -> list[tuple[str, float]]:
    """The declared preprocessing written out plainly, and onnxruntime run directly."""
    img = Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) / 255 - np.array(MEAN, np.float32)) / np.array(
        STD, np.float32
    )
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0][0].astype(np.float64)
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    top = np.argsort(-scores)[:3]
    return [(LABELS[i], float(scores[i])) for i in top]


def assert_matches(predictions: list[dict], expected: list[tuple[str, float]]) -> None:  # type: ignore[type-arg]
    assert [p["label"] for p in predictions] == [label for label, _ in expected]
    np.testing.assert_allclose(
        [p["score"] for p in predictions], [s for _, s in expected], rtol=1e-4, atol=1e-6
    )
    assert all(LABELS[p["index"]] == p["label"] for p in predictions)


def test_predict_equals_preprocessing_and_onnxruntime_run_directly(
    classifier: Served, images: dict[str, Path], models: dict[str, Path]
) -> None:
    with httpx.Client(base_url=classifier.url, timeout=30) as http:
        for name in GOOD:
            data = images[name].read_bytes()
            expected = reference(models["convnet"], images[name])
            raw = http.post("/v2/models/classifier/predict", content=data)
            assert raw.status_code == 200, (name, raw.text)
            assert raw.json()["model"] == "classifier"
            assert_matches(raw.json()["predictions"], expected)
            form = http.post("/v2/models/classifier/predict", files={"file": (name, data)})
            assert form.status_code == 200, (name, form.text)
            assert_matches(form.json()["predictions"], expected)


def test_predict_batch_answers_each_image_in_order(
    classifier: Served, images: dict[str, Path], models: dict[str, Path]
) -> None:
    files = [("files", (name, images[name].read_bytes())) for name in GOOD]
    with httpx.Client(base_url=classifier.url, timeout=30) as http:
        answer = http.post("/v2/models/classifier/predict/batch", files=files)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["image"] for r in results] == list(range(len(GOOD)))
    for name, result in zip(GOOD, results, strict=True):
        assert_matches(result["predictions"], reference(models["convnet"], images[name]))


def test_concurrent_images_are_batched_and_never_mixed_up(
    classifier: Served, images: dict[str, Path], models: dict[str, Path]
) -> None:
    expected = {name: reference(models["convnet"], images[name]) for name in GOOD}
    with httpx.Client(base_url=classifier.url, timeout=30) as http:

        def one(i: int) -> tuple[str, list[dict]]:  # type: ignore[type-arg]
            name = GOOD[i % len(GOOD)]
            answer = http.post("/v2/models/classifier/predict", content=images[name].read_bytes())
            assert answer.status_code == 200, answer.text
            return name, answer.json()["predictions"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for name, predictions in pool.map(one, range(112)):
                assert_matches(predictions, expected[name])
        metrics = http.get("/metrics").text
    # Runs of more than one image happened: the histogram's 1-row bucket is not all of them.
    count = _metric(metrics, 'kubeonnx_batch_size_count{model="classifier",version="1"}')
    ones = _metric(metrics, 'kubeonnx_batch_size_bucket{le="1.0",model="classifier",version="1"}')
    assert ones < count


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("not-an-image.jpg", "the image is not a JPEG, PNG or WebP image"),
        ("animation.gif", "the image is not a JPEG, PNG or WebP image"),
        ("truncated.jpg", "the image is a corrupt or truncated image"),
        ("bomb.png", "the image is over the limit of 1000000 pixels"),
        ("photo.jpg", None),  # 640x480: within the limit
    ],
)
def test_a_bad_image_is_a_400_that_names_the_problem(
    classifier: Served, images: dict[str, Path], name: str, problem: str | None
) -> None:
    answer = httpx.post(
        f"{classifier.url}/v2/models/classifier/predict",
        content=images[name].read_bytes(),
        timeout=30,
    )
    if problem is None:
        assert answer.status_code == 200
        return
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"].startswith(problem), answer.json()["error"]


def test_bad_requests_to_the_image_endpoints(classifier: Served, images: dict[str, Path]) -> None:
    photo = images["photo.jpg"].read_bytes()
    url = f"{classifier.url}/v2/models/classifier"
    with httpx.Client(timeout=30) as http:
        cases = [
            (http.post(f"{url}/predict", content=b""), "the image is empty"),
            (
                http.post(f"{url}/predict", files={"image": ("a.jpg", photo)}),
                "the multipart body has no field 'file'",
            ),
            (
                http.post(f"{url}/predict", files=[("file", photo), ("file", photo)]),
                "/predict takes one image; send several to /predict/batch",
            ),
            (
                http.post(f"{url}/predict/batch", content=photo),
                "/predict/batch takes multipart/form-data",
            ),
            (
                http.post(
                    f"{url}/predict/batch",
                    files=[("files", ("ok.jpg", photo)), ("files", ("bad.jpg", b"junk"))],
                ),
                "files[1] ('bad.jpg') is not a JPEG, PNG or WebP image",
            ),
            (
                http.post(
                    f"{url}/predict",
                    content=b"--x\r\nno headers",
                    headers={"content-type": "multipart/form-data; boundary=x"},
                ),
                "malformed multipart/form-data body",
            ),
            (
                http.post(
                    f"{url}/predict",
                    content=b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
                    headers={"content-type": "multipart/form-data; boundary=x"},
                ),
                "the multipart body has no field 'file'",  # cut off before its end
            ),
        ]
        for answer, problem in cases:
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"].startswith(problem), answer.json()["error"]
        missing = http.post(f"{classifier.url}/v2/models/other/predict", content=photo)
        assert missing.status_code == 404


def test_too_many_images_in_one_batch(classifier: Served, images: dict[str, Path]) -> None:
    tiny = images["tiny.png"].read_bytes()
    answer = httpx.post(
        f"{classifier.url}/v2/models/classifier/predict/batch",
        files=[("files", ("t.png", tiny))] * 65,
        timeout=30,
    )
    assert answer.status_code == 400
    assert "65 images in one request; at most 64" in answer.json()["error"]


def test_a_model_without_processing_has_no_image_endpoints(mlp_server: Served) -> None:
    answer = httpx.post(f"{mlp_server.url}/v2/models/mlp/predict", content=b"x")
    assert answer.status_code == 404
    assert "spec.processing is not set" in answer.json()["error"]


def test_quota_counts_each_image(
    serve, models: dict[str, Path], images: dict[str, Path], tmp_path: Path
) -> None:
    policy = {
        "policy": "images",
        "namespace": "tests",
        "tenants": [
            {
                "name": "acme",
                "keySha256": [key_hash("acme-key")],
                "limits": [{"unit": "rows", "limit": 3, "window": "1m"}],
            }
        ],
    }
    path = tmp_path / "quota.json"
    path.write_text(json.dumps(policy))
    served = serve(
        "--model-uri",
        f"file://{models['convnet']}",
        "--model-name",
        "classifier",
        env={"KUBEONNX_PROCESSING": json.dumps(PROCESSING), "KUBEONNX_QUOTA_CONFIG": str(path)},
    )
    tiny = images["tiny.png"].read_bytes()
    url = f"{served.url}/v2/models/classifier/predict/batch"
    key = {"X-Api-Key": "acme-key"}
    with httpx.Client(timeout=30) as http:
        assert http.post(url, files=[("files", tiny)] * 2).status_code == 401
        assert http.post(url, files=[("files", tiny)] * 2, headers=key).status_code == 200
        refused = http.post(url, files=[("files", tiny)] * 2, headers=key)
        assert refused.status_code == 429  # 2 + 2 images over a budget of 3
        assert http.post(url, files=[("files", tiny)], headers=key).status_code == 200


@pytest.mark.parametrize(
    ("processing", "labels", "problem"),
    [
        (
            {"input": {"image": {"size": [64, 64]}}},
            None,
            "model input 'input' has shape [-1, 3, 32, 32], which does not take an image of "
            "NCHW [3, 64, 64]",
        ),
        (
            {"input": {"image": {"size": [32, 32], "layout": "NHWC"}}},
            None,
            "which does not take an image of NHWC [32, 32, 3]",
        ),
        (
            {"input": {"image": {"size": [32, 32], "input": "pixels"}}},
            None,
            "spec.processing.input.image.input 'pixels' is not a model input",
        ),
        (
            {"input": {"image": {"size": [32, 32]}}},
            ["cat", "dog"],
            "the labels file has 2 labels and model output 'output' has 10 classes",
        ),
    ],
)
def test_processing_that_does_not_fit_the_model_refuses_to_start(
    processing: dict,
    labels: list[str] | None,
    problem: str,  # type: ignore[type-arg]
) -> None:
    inputs = [TensorSpec("input", "FP32", (-1, 3, 32, 32))]
    outputs = [TensorSpec("output", "FP32", (-1, 10))]
    with pytest.raises(FatalStartupError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        ImagePipeline(load_processing(json.dumps(processing)), inputs, outputs, labels)


def test_the_start_up_failure_reaches_the_termination_log(serve, models: dict[str, Path]) -> None:
    served = serve(
        "--model-uri",
        f"file://{models['convnet']}",
        env={"KUBEONNX_PROCESSING": json.dumps({"input": {"image": {"size": [64, 64]}}})},
        wait_ready=False,
    )
    assert served.proc.wait(60) == 1
    assert "does not take an image of NCHW [3, 64, 64]" in served.termination_log.read_text()


def test_nhwc_bgr_preprocessing(images: dict[str, Path]) -> None:
    processing = load_processing(
        json.dumps(
            {
                "input": {
                    "image": {
                        "size": [8, 6],
                        "layout": "NHWC",
                        "channels": "BGR",
                        "scale": 1,
                        "mean": [1, 2, 3],
                        "std": [2, 2, 2],
                        "resize": "nearest",
                    }
                }
            }
        )
    )
    pipeline = ImagePipeline(
        processing,
        [TensorSpec("x", "FP32", (-1, 8, 6, 3))],
        [TensorSpec("y", "FP32", (-1, 4))],
    )
    data = images["wide.png"].read_bytes()
    got, size = pipeline.preprocess(data, "the image")
    assert size == (300, 120)
    img = Image.open(images["wide.png"]).convert("RGB").resize((6, 8), Image.Resampling.NEAREST)
    want = (np.asarray(img, np.float32)[..., ::-1] - np.array([1, 2, 3], np.float32)) / 2
    assert got.shape == (1, 8, 6, 3)
    np.testing.assert_allclose(got[0], want, rtol=1e-6)
    top = pipeline.classify(np.array([0.1, 3.0, -1.0, 2.0]))
    assert [(p.label, p.index) for p in top] == [("1", 1), ("3", 3), ("0", 0), ("2", 2)]


def test_multipart_parts_are_bounded() -> None:
    body = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n' for _ in range(5)
    )
    with pytest.raises(InvalidRequest, match="more than 3 parts"):
        parse_multipart(body + b"--b--\r\n", "multipart/form-data; boundary=b", 3)
    parts = parse_multipart(body + b"--b--\r\n", "multipart/form-data; boundary=b", 5)
    assert [(p.name, p.data) for p in parts] == [("f", b"x")] * 5


DETECTION = {
    "input": {"image": {"size": [32, 32]}},
    "output": {"detection": {"scoreThreshold": 0.5, "iouThreshold": 0.3, "maxDetections": 5}},
}
CLASSES = ["person", "bicycle", "car"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Served]:
    yield from image_server(tmp_path_factory, models["detector"], "detector", DETECTION, CLASSES)


def plain_detections(model: Path, path: Path) -> tuple[list[tuple[str, float, list[float]]], int]:
    """The detection post-processing written out plainly, with loops; also how many boxes
    passed the score threshold (so a test can tell that suppression happened)."""
    img = Image.open(path)
    width, height = img.size
    x = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    x = (x / 255).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    boxes, scores = session.run(["boxes", "scores"], {"input": x})
    candidates = []
    for box, row in zip(boxes[0].tolist(), scores[0].tolist(), strict=True):
        cls = max(range(len(row)), key=lambda c: row[c])
        if row[cls] >= 0.5:
            candidates.append((row[cls], cls, box))
    candidates.sort(key=lambda c: -c[0])

    def overlap(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union if union > 0 else 0.0

    kept: list[tuple[float, int, list[float]]] = []
    for score, cls, box in candidates:
        if all(c != cls or overlap(box, b) <= 0.3 for _, c, b in kept):
            kept.append((score, cls, box))
    sx, sy = width / 32, height / 32
    answer = [
        (
            CLASSES[cls],
            score,
            [
                min(max(box[0] * sx, 0), width),
                min(max(box[1] * sy, 0), height),
                min(max(box[2] * sx, 0), width),
                min(max(box[3] * sy, 0), height),
            ],
        )
        for score, cls, box in kept[:5]
    ]
    return answer, len(candidates)


def test_detection_equals_plain_post_processing_of_onnxruntimes_outputs(
    detector: Served, images: dict[str, Path], models: dict[str, Path]
) -> None:
    suppressed = 0
    with httpx.Client(base_url=detector.url, timeout=30) as http:
        for name in GOOD:
            expected, candidates = plain_detections(models["detector"], images[name])
            answer = http.post("/v2/models/detector/predict", content=images[name].read_bytes())
            assert answer.status_code == 200, answer.text
            found = answer.json()["detections"]
            assert [d["label"] for d in found] == [label for label, _, _ in expected], name
            for got, (_, score, box) in zip(found, expected, strict=True):
                assert got["score"] == pytest.approx(score, rel=1e-5)
                corners = [got["box"][k] for k in ("x1", "y1", "x2", "y2")]
                np.testing.assert_allclose(corners, box, rtol=1e-4, atol=1e-3)
            suppressed += candidates - len(expected)
        batch = http.post(
            "/v2/models/detector/predict/batch",
            files=[("files", (n, images[n].read_bytes())) for n in GOOD[:3]],
        )
        assert batch.status_code == 200
        assert [r["image"] for r in batch.json()["results"]] == [0, 1, 2]
        assert all("detections" in r for r in batch.json()["results"])
    assert suppressed > 0  # the images exercised non-maximum suppression, not only the threshold


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        ({"detection": {"boxes": "nope"}}, "spec.processing.output.detection.boxes 'nope'"),
        (
            {"detection": {}, "classification": {}},
            "takes classification or detection, not both",
        ),
        ({"detection": {"boxes": "scores"}}, "detection boxes are \\[batch, boxes, 4\\]"),
    ],
)
def test_detection_that_does_not_fit_the_model_refuses_to_start(
    output: dict,
    problem: str,  # type: ignore[type-arg]
) -> None:
    processing = {"input": {"image": {"size": [32, 32]}}, "output": output}
    inputs = [TensorSpec("input", "FP32", (-1, 3, 32, 32))]
    outputs = [TensorSpec("boxes", "FP32", (-1, 16, 4)), TensorSpec("scores", "FP32", (-1, 16, 3))]
    with pytest.raises(FatalStartupError, match=problem):
        ImagePipeline(load_processing(json.dumps(processing)), inputs, outputs)


def test_detect_converts_centre_size_and_normalised_boxes_and_suppresses_per_class() -> None:
    processing = {
        "input": {"image": {"size": [100, 200]}},  # height 100, width 200
        "output": {
            "detection": {
                "boxFormat": "cxcywh",
                "normalized": True,
                "scoreThreshold": 0.3,
                "iouThreshold": 0.5,
            }
        },
    }
    pipeline = ImagePipeline(
        load_processing(json.dumps(processing)),
        [TensorSpec("input", "FP32", (-1, 3, 100, 200))],
        [TensorSpec("boxes", "FP32", (-1, -1, 4)), TensorSpec("scores", "FP32", (-1, -1, 2))],
        ["cat", "dog"],
    )
    boxes = np.array(
        [
            [0.5, 0.5, 0.5, 0.5],  # cat, best
            [0.52, 0.5, 0.5, 0.5],  # cat, overlaps the first: suppressed
            [0.5, 0.5, 0.5, 0.5],  # dog, same place: another class, kept
            [0.95, 0.95, 0.2, 0.2],  # cat, runs off the image: clipped
            [0.1, 0.1, 0.1, 0.1],  # under the threshold
        ]
    )
    scores = np.array([[0.9, 0.1], [0.8, 0.1], [0.2, 0.7], [0.6, 0.0], [0.2, 0.1]])
    found = pipeline.detect(boxes, scores, (400, 100))  # uploaded at 400x100
    assert [(f.label, f.score) for f in found] == [("cat", 0.9), ("dog", 0.7), ("cat", 0.6)]
    # Normalised centre 0.5, size 0.5 of 200x100 -> x 50..150, y 25..75, then x2 to 400 wide.
    assert found[0].box == pytest.approx((100.0, 25.0, 300.0, 75.0))
    assert found[2].box == pytest.approx((340.0, 85.0, 400.0, 100.0))


def stored_sideways(seen: Image.Image, fmt: str) -> bytes:
    """The picture `seen` as a camera held sideways stores it: pixels rotated, and EXIF
    orientation 6, which ImageOps.exif_transpose turns back into `seen`."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    out = io.BytesIO()
    seen.transpose(Image.Transpose.ROTATE_90).save(out, fmt, exif=exif)
    return out.getvalue()


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied(
    classifier: Served, images: dict[str, Path], models: dict[str, Path], fmt: str
) -> None:
    seen = Image.open(images["photo.jpg"]).convert("RGB")  # 640x480, not square
    stored = stored_sideways(seen, fmt)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(stored)))
    assert upright.size == seen.size
    expected = reference(models["convnet"], io.BytesIO(png(upright)))
    answer = httpx.post(f"{classifier.url}/v2/models/classifier/predict", content=stored)
    assert answer.status_code == 200, answer.text
    assert_matches(answer.json()["predictions"], expected)
    if fmt == "PNG":  # lossless: the same answer as the upright picture itself
        assert expected == reference(models["convnet"], io.BytesIO(png(seen)))


def test_detection_boxes_are_in_the_frame_the_user_sees(
    detector: Served, images: dict[str, Path], models: dict[str, Path], tmp_path: Path
) -> None:
    seen = Image.open(images["photo.jpg"]).convert("RGB")
    (tmp_path / "seen.png").write_bytes(png(seen))
    expected, _ = plain_detections(models["detector"], tmp_path / "seen.png")
    assert expected
    answer = httpx.post(
        f"{detector.url}/v2/models/detector/predict", content=stored_sideways(seen, "PNG")
    )
    assert answer.status_code == 200, answer.text
    found = answer.json()["detections"]
    assert [d["label"] for d in found] == [label for label, _, _ in expected]
    for got, (_, score, box) in zip(found, expected, strict=True):
        assert got["score"] == pytest.approx(score, rel=1e-5)
        corners = [got["box"][k] for k in ("x1", "y1", "x2", "y2")]
        np.testing.assert_allclose(corners, box, rtol=1e-4, atol=1e-3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(
    classifier: Served, models: dict[str, Path]
) -> None:
    """A 16-bit PNG answers as the same picture in 8 bits does (value / 257, rounded)."""
    y, x = np.mgrid[0:48, 0:64]
    grey = (x * 1000 + y * 300) % 65536
    wide = Image.fromarray(grey.astype(np.uint16))
    assert wide.mode == "I;16"
    narrow = Image.fromarray(np.round(grey / 257).astype(np.uint8), "L")
    expected = reference(models["convnet"], io.BytesIO(png(narrow)))
    white = reference(models["convnet"], io.BytesIO(png(Image.new("L", (64, 48), 255))))
    assert expected != white
    answer = httpx.post(f"{classifier.url}/v2/models/classifier/predict", content=png(wide))
    assert answer.status_code == 200, answer.text
    assert_matches(answer.json()["predictions"], expected)


@pytest.mark.parametrize("length", [200, 300])
def test_a_long_multipart_boundary_is_served_or_named(
    classifier: Served, images: dict[str, Path], length: int
) -> None:
    boundary = "b" * length
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.png"\r\n\r\n'
        ).encode()
        + images["tiny.png"].read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    answer = httpx.post(
        f"{classifier.url}/v2/models/classifier/predict",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    if length <= 256:
        assert answer.status_code == 200, answer.text
    else:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "the multipart boundary is 300 characters; at most 256"
