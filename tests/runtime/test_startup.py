"""Start-up against a real S3 API: verified downloads, the cache, and every fatal case."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e.cluster import free_port
from tests.runtime.conftest import Served, start_server

ZERO_SHA = "0" * 64
# What the server makes after its imports and before it serves, FastAPI's app above all
# (its routes and their models): about 5,500 objects with the mlp model, of which a freeze
# before the app is built (or before the model is loaded) would count under 700.
FROZEN_BY_START_UP = 2_500


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


def test_a_cached_model_changed_on_disk_is_fetched_again(
    serve, s3, s3_endpoint: str, models: dict[str, Path], tmp_path: Path
) -> None:
    """The cache is trusted for its bytes, not for the digest file written beside them."""
    args = ("--model-uri", "s3://models/mlp/model.onnx", "--s3-endpoint", s3_endpoint)
    serve(*args, "--model-sha256", sha256(models["mlp"])).stop()
    (cached,) = (tmp_path / "cache").glob("*.onnx")
    tampered = bytearray(cached.read_bytes())
    tampered[-8:] = b"tampered"
    cached.write_bytes(bytes(tampered))
    for extra in (("--model-sha256", sha256(models["mlp"])), ()):  # with and without sha256
        again = serve(*args, *extra)
        assert metric(again, "kubeonnx_model_download_bytes_total") == cached.stat().st_size
        assert sha256(cached) == sha256(models["mlp"])
        again.stop()
        cached.write_bytes(bytes(tampered))


def test_an_object_overwritten_during_download_is_never_mixed(
    s3, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts come from the version HEAD saw; when it changes, the download starts over."""
    from kubeonnx_runtime import fetch

    v1, v2 = os.urandom(64 * 1024), os.urandom(64 * 1024)
    s3.put_object(Bucket="models", Key="changing/model.onnx", Body=v1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(fetch, "PART_SIZE", 8 * 1024)
    monkeypatch.setattr(fetch, "PARALLEL_PARTS", 1)
    real_client = fetch._s3_client
    calls = {"get": 0}

    class OverwriteAfterFirstPart:
        def __init__(self, client: object) -> None:
            self._client = client

        def __getattr__(self, name: str) -> object:
            return getattr(self._client, name)

        def get_object(self, **kwargs: object) -> object:
            calls["get"] += 1
            if calls["get"] == 2:
                s3.put_object(Bucket="models", Key="changing/model.onnx", Body=v2)
            return self._client.get_object(**kwargs)  # type: ignore[attr-defined]

    monkeypatch.setattr(fetch, "_s3_client", lambda o: OverwriteAfterFirstPart(real_client(o)))
    fetched = fetch.fetch_model(
        "s3://models/changing/model.onnx",
        tmp_path / "cache",
        s3=fetch.S3Options(endpoint=s3_endpoint, region="us-east-1"),
    )
    assert fetched.path.read_bytes() == v2
    assert fetched.sha256 == hashlib.sha256(v2).hexdigest()


def test_an_s3_model_is_fetched_in_concurrent_ranged_parts(
    s3, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download is parallel: the first PARALLEL_PARTS ranged GETs are all in flight at
    once (each waits at a barrier until the others have arrived, so a serial download
    breaks the barrier), and the parts cover the object once each, in PART_SIZE ranges."""
    from kubeonnx_runtime import fetch

    part = 8 * 1024
    parts = 2 * fetch.PARALLEL_PARTS + 3  # more than one window of workers
    body = os.urandom(parts * part - 100)  # the last part is short
    s3.put_object(Bucket="models", Key="parallel/model.onnx", Body=body)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(fetch, "PART_SIZE", part)
    # Generous: it only waits for threads already started, however loaded the machine is.
    together = threading.Barrier(fetch.PARALLEL_PARTS, timeout=60)
    lock = threading.Lock()
    ranges: list[str] = []
    in_flight = {"now": 0, "most": 0}
    real_client = fetch._s3_client

    class CountingClient:
        def __init__(self, client: object) -> None:
            self._client = client

        def __getattr__(self, name: str) -> object:
            return getattr(self._client, name)

        def get_object(self, **kwargs: object) -> object:
            with lock:
                first_wave = len(ranges) < fetch.PARALLEL_PARTS
                ranges.append(str(kwargs["Range"]))
                in_flight["now"] += 1
                in_flight["most"] = max(in_flight["most"], in_flight["now"])
            try:
                if first_wave:
                    together.wait()
                return self._client.get_object(**kwargs)  # type: ignore[attr-defined]
            finally:
                with lock:
                    in_flight["now"] -= 1

    monkeypatch.setattr(fetch, "_s3_client", lambda o: CountingClient(real_client(o)))
    fetched = fetch.fetch_model(
        "s3://models/parallel/model.onnx",
        tmp_path / "cache",
        sha256=hashlib.sha256(body).hexdigest(),
        s3=fetch.S3Options(endpoint=s3_endpoint, region="us-east-1"),
    )
    assert fetched.path.read_bytes() == body and fetched.downloaded_bytes == len(body)
    assert in_flight["most"] == fetch.PARALLEL_PARTS > 1
    spans = []
    for r in ranges:
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", r)
        assert match, r
        spans.append((int(match[1]), int(match[2])))
    spans.sort()
    assert spans == [(o, min(o + part, len(body)) - 1) for o in range(0, len(body), part)]


def test_a_model_that_cannot_run_on_ones_is_served_unwarmed_or_warmed_larger(
    serve, models: dict[str, Path]
) -> None:
    """valid is a 3x3 convolution without padding over dynamic H and W: 1x1 cannot run."""
    served = serve("--model-uri", f"file://{models['valid']}", "--model-name", "valid")
    body = {
        "inputs": [{"name": "input", "shape": [1, 1, 3, 3], "datatype": "FP32", "data": [9] * 9}]
    }
    r = httpx.post(f"{served.url}/v2/models/valid/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == pytest.approx([9.0])
    small = {
        "inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1] * 4}]
    }
    r = httpx.post(f"{served.url}/v2/models/valid/infer", json=small)
    assert r.status_code == 400 and "Conv" in r.json()["error"], r.text


def test_a_port_in_use_fails_at_once_with_a_termination_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = run_to_failure(
            tmp_path,
            "--model-uri",
            "s3://never-fetched/model.onnx",
            env={"KUBEONNX_PORT": str(port)},
        )
    message = served.termination_log.read_text()
    assert f"cannot listen on 127.0.0.1:{port}" in message and "in use" in message, served.logs()


def test_an_unusable_cache_directory_fails_with_a_termination_message(
    s3, s3_endpoint: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    served = run_to_failure(
        tmp_path,
        "--model-uri",
        "s3://models/mlp/model.onnx",
        "--s3-endpoint",
        s3_endpoint,
        env={"KUBEONNX_CACHE_DIR": str(blocker / "cache")},
    )
    message = served.termination_log.read_text()
    assert f"cannot use the model cache {blocker / 'cache'}" in message, served.logs()


def test_a_full_disk_fails_with_a_termination_message(s3, s3_endpoint: str, tmp_path: Path) -> None:
    """A file size limit stands in for a full disk: the write fails the same way (OSError)."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    served = start_server(
        tmp_path,
        "--model-uri",
        "s3://models/wide/model.onnx",
        "--s3-endpoint",
        s3_endpoint,
        wait_ready=False,
        preexec_fn=small_files,
    )
    assert served.proc.wait(60) != 0
    message = served.termination_log.read_text()
    assert "cannot write s3://models/wide/model.onnx" in message, served.logs()
    assert "to the model cache" in message
    assert not list((tmp_path / "cache").glob("*.part"))


def test_a_bad_log_level_is_refused_with_the_flag_named(tmp_path: Path) -> None:
    served = run_to_failure(tmp_path, "--model-uri", "file:///x.onnx", "--log-level", "loud")
    assert "--log-level" in served.termination_log.read_text()


def test_credentials_never_reach_the_termination_message_or_the_log(tmp_path: Path) -> None:
    """An endpoint URL carrying credentials (refused as a flag, so given as its variable, as
    a Secret-backed environment would) never shows them in the termination message or log."""
    port = free_port()  # nothing listens there
    served = run_to_failure(
        tmp_path,
        "--model-uri",
        "s3://models/mlp/model.onnx",
        "--log-level",
        "debug",
        env={
            "AWS_MAX_ATTEMPTS": "1",
            "KUBEONNX_S3_ENDPOINT": f"http://reader:hunter2secret@127.0.0.1:{port}",
        },
    )
    message = served.termination_log.read_text()
    assert "reader:***@" in message and "unreachable" in message, message
    assert "hunter2secret" not in message
    assert "hunter2secret" not in served.logs()


def test_debug_logging_keeps_s3_request_headers_out_of_the_log(serve, s3, s3_endpoint: str) -> None:
    served = serve(
        "--model-uri",
        "s3://models/mlp/model.onnx",
        "--s3-endpoint",
        s3_endpoint,
        "--log-level",
        "debug",
    )
    logs = served.logs()
    assert '"level": "debug"' in logs  # debug logging is on
    assert "Authorization" not in logs and "AWS4-HMAC-SHA256" not in logs


def test_a_warm_cache_is_not_served_under_a_different_model_sha256(
    serve, s3, s3_endpoint: str, models: dict[str, Path], tmp_path: Path
) -> None:
    """The cache holds the object verified under one sha256; a start with another does not
    take the cached bytes: it fetches again and refuses the mismatch by its message."""
    args = ("--model-uri", "s3://models/mlp/model.onnx", "--s3-endpoint", s3_endpoint)
    serve(*args, "--model-sha256", sha256(models["mlp"])).stop()
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1  # warm
    served = run_to_failure(tmp_path, *args, "--model-sha256", ZERO_SHA)
    message = served.termination_log.read_text()
    assert "checksum mismatch" in message and ZERO_SHA in message, served.logs()
    assert "model cache hit" not in served.logs()


def test_the_start_up_heap_is_frozen_before_serving(serve, models: dict[str, Path]) -> None:
    """A full collection walks every object the process holds with the GIL held; what
    start-up made (modules, the model's session, the app) is left out of it, so it no longer
    stalls the requests in flight (docs/performance.md, the tail)."""
    served = serve("--model-uri", f"file://{models['mlp']}", "--model-name", "mlp")
    lines = [json.loads(x) for x in served.logs().splitlines() if x.startswith("{")]
    serving = next(x for x in lines if x["msg"] == "serving")
    # The imports alone are tens of thousands of objects: what a freeze right after them
    # would count is measured in a process of its own. Frozen once the model is loaded and
    # the app built (just before serving), the server counts clearly more than that.
    imports_only = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc, kubeonnx_runtime.server; gc.collect(); gc.freeze(); "
            "print(gc.get_freeze_count())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = int(imports_only.stdout)
    frozen = serving["frozen_objects"]
    assert frozen > baseline + FROZEN_BY_START_UP, (baseline, frozen)
