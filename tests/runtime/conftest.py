"""Fixtures for runtime tests: generated models, a real S3 API (moto server on loopback),
and the real `kubeonnx serve` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.cluster import free_port
from e2e.generate_models import generate
from e2e.redis_server import LocalRedis
from e2e.s3 import LocalS3
from e2e.serving import wait_serving

KUBEONNX = str(Path(sys.executable).parent / "kubeonnx")
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    server = LocalS3().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(local_s3: LocalS3) -> str:
    return local_s3.endpoint


@pytest.fixture(scope="session")
def s3(local_s3: LocalS3, models: dict[str, Path]):  # type: ignore[no-untyped-def]
    """A bucket 'models' holding every generated model at <name>/model.onnx, and junk."""
    local_s3.put_models(models)
    client = local_s3.client()
    client.put_object(Bucket="models", Key="junk/model.onnx", Body=b"this is not a model" * 100)
    return client


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    termination_log: Path
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60,
    preexec_fn: Callable[[], None] | None = None,
) -> Served:
    port = free_port()
    term = tmp / "termination-log"
    log_path = tmp / f"serve-{port}.log"
    full_env = {
        **os.environ,
        **S3_ENV,
        "KUBEONNX_PORT": str(port),
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_CACHE_DIR": str(tmp / "cache"),
        "KUBEONNX_TERMINATION_LOG": str(term),
        "KUBEONNX_DRAIN_SECONDS": "0",
        **(env or {}),
    }
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            [KUBEONNX, "serve", *args],
            env=full_env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", term, log_path)
    if wait_ready:
        try:
            wait_serving(
                f"{served.url}/v2/health/ready",
                proc,
                timeout,
                what="kubeonnx serve",
                logs=served.logs,
                ok=lambda status: status == 200,
            )
        except RuntimeError:
            served.stop(signal.SIGKILL)
            raise
    return served


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Start `kubeonnx serve` with the given flags; every server is stopped afterwards."""
    started: list[Served] = []

    def _start(*args: str, **kwargs) -> Served:  # type: ignore[no-untyped-def]
        served = start_server(tmp_path, *args, **kwargs)
        started.append(served)
        return served

    yield _start
    for served in started:
        served.stop(signal.SIGKILL, timeout=10)


def _module_server(
    factory: pytest.TempPathFactory, models: dict[str, Path], name: str
) -> Iterator[Served]:
    served = start_server(
        factory.mktemp(name), "--model-uri", f"file://{models[name]}", "--model-name", name
    )
    yield served
    served.stop(signal.SIGKILL, timeout=10)


@pytest.fixture(scope="module")
def mlp_server(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[Served]:
    yield from _module_server(tmp_path_factory, models, "mlp")


@pytest.fixture(scope="module")
def mixed_server(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[Served]:
    yield from _module_server(tmp_path_factory, models, "mixed")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[LocalRedis]:
    """A real redis-server on loopback, shared by a module's quota tests."""
    server = LocalRedis().start()
    yield server
    server.stop()
