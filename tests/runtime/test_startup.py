"""Start-up against a real S3 API: verified downloads, the cache, and every fatal case."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.cluster import free_port
from tests.runtime.conftest import Served, start_server

ZERO_SHA = "0" * 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metric(served: Served, name: str) -> float:
    for line in httpx.get(f"{served.url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exported")


def test_s3_model_is_downloaded_verified_and_then_reused_from_cache(
    serve, s3, s3_endpoint: str, models: dict[str, Path], tmp_path: Path
) -> None:
    # wide is larger than one part, so it is fetched in parallel ranged parts.
    args = (
        "--model-uri",
        "s3://models/wide/model.onnx",
        "--s3-endpoint",
        s3_endpoint,
        "--model-sha256",
        sha256(models["wide"]),
    )
    first = serve(*args)
    size = models["wide"].stat().st_size
    assert metric(first, "kubeonnx_model_download_bytes_total") == size
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1 and sha256(cached[0]) == sha256(models["wide"])
    assert not list((tmp_path / "cache").glob("*.part"))
    first.stop()

    second = serve(*args)
    assert metric(second, "kubeonnx_model_download_bytes_total") == 0


def run_to_failure(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Served:
    """Start a server that must fail: it exits non-zero and never answers ready."""
    served = start_server(tmp_path, *args, env=env, wait_ready=False)
    proc = served.proc
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{served.url}/v2/health/ready", timeout=0.5)
            raise AssertionError(f"a failing server answered ready: {ready.status_code}")
        except httpx.HTTPError:
            time.sleep(0.1)
    assert proc.poll() is not None, "the server did not exit"
    assert proc.returncode != 0
    return served


@pytest.mark.parametrize(
    ("uri", "extra", "expected"),
    [
        ("s3://no-such-bucket/model.onnx", (), "no such bucket"),
        ("s3://models/missing/model.onnx", (), "no such key"),
        ("s3://models/mlp/model.onnx", ("--model-sha256", ZERO_SHA), "checksum mismatch"),
        ("s3://models/junk/model.onnx", (), "is not a loadable ONNX model"),
        ("ftp://models/mlp/model.onnx", (), "unsupported model uri scheme 'ftp'"),
        ("s3://models/mlp/model.onnx", ("--device", "cuda"), "no CUDA execution provider"),
    ],
)
def test_fatal_startup_errors_write_one_line_and_exit(
    s3, s3_endpoint: str, tmp_path: Path, uri: str, extra: tuple[str, ...], expected: str
) -> None:
    served = run_to_failure(tmp_path, "--model-uri", uri, "--s3-endpoint", s3_endpoint, *extra)
    message = served.termination_log.read_text()
    assert expected in message, served.logs()
    assert message.count("\n") == 1
    # A mismatched or broken download never stays in the cache.
    cache = tmp_path / "cache"
    if expected == "checksum mismatch":
        assert not list(cache.glob("*.onnx")) and not list(cache.glob("*.part"))


@pytest.fixture(scope="module")
def s3_with_auth() -> Iterator[str]:
    """A second S3 API that checks credentials (moto's IAM auth on)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    proc.kill()
    proc.wait()


def test_wrong_credentials_are_access_denied(s3_with_auth: str, tmp_path: Path) -> None:
    served = run_to_failure(
        tmp_path, "--model-uri", "s3://models/mlp/model.onnx", "--s3-endpoint", s3_with_auth
    )
    assert "access denied" in served.termination_log.read_text(), served.logs()


def test_invalid_settings_are_refused_with_the_flag_named(tmp_path: Path) -> None:
    served = run_to_failure(tmp_path, "--model-uri", "file:///x.onnx", "--model-sha256", "abc")
    assert "--model-sha256" in served.termination_log.read_text()
