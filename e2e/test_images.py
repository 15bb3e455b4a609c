"""The two images, built from the Dockerfiles (e2e/build-images.sh: podman on a Debian base
made locally with mmdebstrap) and run as a pod would run them, without a container runtime
(e2e/containers.py): the operator image renders the examples exactly as the checkout does,
and the runtime image, started with the command, arguments, environment, user and emptyDirs
of the Deployment the operator image rendered, serves a model from the S3 stand-in and
answers as onnxruntime does. Needs root, podman and mmdebstrap (.ci/run installs them)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from e2e.cluster import free_port
from e2e.containers import Built, Container, build_images, export_rootfs, remove_rootfs
from e2e.generate_models import generate
from e2e.s3 import CREDENTIALS, LocalS3
from e2e.serving import wait_serving

# A cold build (the base, then both images' pip installs) takes minutes on a loaded machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
NONROOT = "65532:65532"


@pytest.fixture(scope="module")
def built() -> Built:
    return build_images()


@pytest.fixture(scope="module")
def rootfs(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    base = tmp_path_factory.mktemp("rootfs")
    paths = {
        "operator": export_rootfs(built, built.operator, base / "operator"),
        "runtime": export_rootfs(built, built.runtime, base / "runtime"),
    }
    yield paths
    for path in paths.values():
        remove_rootfs(path)


def container(built: Built, rootfs: dict[str, Path], which: str, **kwargs: Any) -> Container:
    image = built.operator if which == "operator" else built.runtime
    return Container(rootfs[which], built.inspect(image), **kwargs)


def render_in_operator_image(built: Built, rootfs: dict[str, Path], manifests: str) -> str:
    """`kubeonnx render -f -` run by the operator image's ENTRYPOINT, the manifests on stdin."""
    proc = container(built, rootfs, "operator", args=["render", "-f", "-"]).run(
        input=manifests.encode()
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_both_images_run_as_the_non_root_user(built: Built, rootfs: dict[str, Path]) -> None:
    for which, image in (("operator", built.operator), ("runtime", built.runtime)):
        assert built.inspect(image)["User"] == NONROOT, which
        probe = "import os; print(f'{os.getuid()}:{os.getgid()}')"
        proc = container(built, rootfs, which, command=["python3", "-c", probe]).run()
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == NONROOT, which


def test_the_operator_image_has_no_onnxruntime_and_the_runtime_image_no_kopf(
    built: Built, rootfs: dict[str, Path]
) -> None:
    probe = (
        "import importlib.util as u; "
        "print(*(u.find_spec(m) is not None for m in ('kopf', 'onnxruntime', 'kubeonnx_runtime')))"
    )
    found = {
        which: container(built, rootfs, which, command=["python3", "-c", probe])
        .run()
        .stdout.decode()
        .split()
        for which in ("operator", "runtime")
    }
    # Both carry the whole kubeonnx package; each only its own dependencies.
    assert found == {"operator": ["True", "False", "True"], "runtime": ["False", "True", "True"]}


def test_the_operator_image_renders_the_examples_as_the_checkout_does(
    built: Built, rootfs: dict[str, Path]
) -> None:
    manifests = "\n---\n".join(example.read_text() for example in EXAMPLES)
    rendered = render_in_operator_image(built, rootfs, manifests)
    checkout = subprocess.run(
        [str(Path(sys.executable).parent / "kubeonnx"), "render", "-f", "-"],
        input=manifests,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert "Deployment" in kinds and "Service" in kinds
    assert rendered == checkout


def pod_env(container_spec: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet gives it: values, and secretKeyRefs taken
    from `secrets` (an optional key that is missing is left out, as Kubernetes does)."""
    env = {}
    for var in container_spec.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["key"] in secrets:
            env[var["name"]] = secrets[ref["key"]]
        else:
            assert ref.get("optional"), f"{var['name']}: {ref['key']} missing from the Secret"
    return env


def test_the_runtime_image_serves_the_deployment_the_operator_image_renders(
    built: Built, rootfs: dict[str, Path], tmp_path: Path
) -> None:
    model = generate(tmp_path / "models", ["mlp"])["mlp"]
    s3 = LocalS3().start()
    try:
        s3.put_models({"mlp": model}, keys={"mlp": "mlp/v1/model.onnx"})
        example = yaml.safe_load((ROOT / "examples" / "cpu-hpa.yaml").read_text())
        example["spec"]["model"]["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
        example["spec"]["model"]["s3"]["endpoint"] = s3.endpoint
        docs = yaml.safe_load_all(render_in_operator_image(built, rootfs, yaml.safe_dump(example)))
        deployment = next(d for d in docs if d and d["kind"] == "Deployment")
        serve_rendered(built, rootfs, deployment, tmp_path, model)
    finally:
        s3.stop()


def serve_rendered(
    built: Built, rootfs: dict[str, Path], deployment: dict[str, Any], tmp: Path, model: Path
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    assert spec["securityContext"]["readOnlyRootFilesystem"]  # as Container runs every image
    volumes = {v["name"]: v for v in pod["volumes"]}
    empty_dirs = [m["mountPath"] for m in spec["volumeMounts"] if "emptyDir" in volumes[m["name"]]]
    env = pod_env(spec, secrets=CREDENTIALS)
    # The pod's network namespace would be its own; here it is the host's.
    port, metrics_port = free_port(), free_port()
    env |= {"KUBEONNX_PORT": str(port), "KUBEONNX_METRICS_PORT": str(metrics_port)}
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert user == NONROOT
    runtime = container(
        built,
        rootfs,
        "runtime",
        command=spec.get("command"),
        args=spec.get("args"),
        env=env,
        empty_dirs=empty_dirs,
        user=user,
    )
    log_path = tmp / "runtime.log"
    with log_path.open("wb") as log:
        proc = runtime.popen(stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        probe = spec["readinessProbe"]["httpGet"]["path"]
        wait_serving(
            f"{url}{probe}",
            proc,
            300,
            what="the runtime image",
            logs=lambda: log_path.read_text(errors="replace"),
            ok=lambda status: status == 200,
        )
        x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
        body = {
            "inputs": [
                {"name": "input", "shape": [3, 4], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        name = env["KUBEONNX_MODEL_NAME"]
        answer = httpx.post(
            f"{url}{env['KUBEONNX_ROUTE_PREFIX']}/v2/models/{name}/infer", json=body, timeout=60
        )
        assert answer.status_code == 200, answer.text
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        want = session.run(None, {"input": x})[0]
        got = answer.json()["outputs"][0]
        assert got["shape"] == list(want.shape)
        np.testing.assert_allclose(got["data"], want.ravel(), rtol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
