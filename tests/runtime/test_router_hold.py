"""The router holds a request that no ready version may take (a model scaled to zero), with
real processes: `kubeonnx serve --role router` in front of a port where no runtime runs yet,
then a real `kubeonnx serve` started there."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from e2e.cluster import free_port
from tests.runtime.conftest import Served, start_server
from tests.runtime.test_router import BODY, SECRET, metric

WAIT_S = 120  # a loaded machine: conditions are waited for, never timed


def start_holding_router(tmp: Path, port: int, **config: Any) -> Served:
    """A router for version "1" of model mlp at `port`; it is not ready until a runtime
    answers there, so it is started without waiting for its readiness."""
    path = tmp / f"router-{free_port()}.json"
    versions = [{"name": "1", "url": f"http://127.0.0.1:{port}", "weight": 100}]
    path.write_text(
        json.dumps({"model": "mlp", "versions": versions, "probe_interval_s": 0.3, **config})
    )
    router = start_server(
        tmp,
        "--role",
        "router",
        env={"KUBEONNX_ROUTER_CONFIG": str(path), "KUBEONNX_MIRROR_SECRET": SECRET},
        wait_ready=False,
    )
    until(lambda: _live(router), "the router answering")
    return router


def _live(router: Served) -> bool:
    assert router.proc.poll() is None, router.logs()
    try:
        return httpx.get(f"{router.url}/v2/health/live", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not in {WAIT_S} s: {what}"
        time.sleep(0.05)


def held(router: Served) -> float:
    return metric(router.url, "kubeonnx_router_held_requests", model="mlp")


def post_in_thread(url: str) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, timeout=600))

    thread = threading.Thread(target=post)
    thread.start()
    return thread, answers


def test_a_request_held_at_zero_is_answered_once_a_runtime_is_ready(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    port = free_port()
    router = start_holding_router(tmp_path, port, max_hold_s=600)
    runtime: Served | None = None
    try:
        assert httpx.get(f"{router.url}/v2/health/ready").status_code == 503  # nothing ready
        thread, answers = post_in_thread(router.url)
        until(lambda: held(router) == 1, "the request held")
        assert answers == []
        runtime = start_server(
            tmp_path,
            "--model-uri",
            f"file://{models['mlp']}",
            "--model-name",
            "mlp",
            env={"KUBEONNX_MODEL_VERSION": "1", "KUBEONNX_PORT": str(port)},
            wait_ready=False,  # its own port: the router's probe finds it ready
        )
        thread.join(WAIT_S)
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        direct = httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=BODY)
        assert answer.json()["outputs"] == direct.json()["outputs"]
        assert answer.json()["model_version"] == "1"
        assert held(router) == 0
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="forwarded") == 1
        assert metric(router.url, "kubeonnx_router_requests_total", version="1", code="200") == 1
    finally:
        if runtime is not None:
            runtime.stop(signal.SIGKILL)
        router.stop()


def test_over_the_count_is_refused_at_once_and_a_client_leaving_is_dropped(
    tmp_path: Path,
) -> None:
    router = start_holding_router(tmp_path, free_port(), max_held_requests=1, max_hold_s=600)
    try:
        # One request held, on a connection of our own (closed below).
        body = json.dumps(BODY).encode()
        client = socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])))
        client.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: router\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        until(lambda: held(router) == 1, "the request held")

        # The hold is full: the next one is refused without being held.
        refused = httpx.post(f"{router.url}/v2/models/mlp/infer", json=BODY, timeout=600)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "1 requests are held already (max_held_requests)" in refused.json()["error"]
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="full") == 1

        # The held client leaves: it is no longer counted as held, nor as demand.
        client.close()
        until(lambda: held(router) == 0, "the held count back to 0")
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="gone") == 1
        assert metric(router.url, "kubeonnx_router_requests_total", code="499") == 1
    finally:
        router.stop()


def test_a_request_held_max_hold_s_is_refused(tmp_path: Path) -> None:
    router = start_holding_router(tmp_path, free_port(), max_hold_s=1)
    try:
        refused = httpx.post(f"{router.url}/v2/models/mlp/infer", json=BODY, timeout=600)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == (
            "no version of the model is ready: the request was held 1 s (max_hold_s)"
        )
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="timeout") == 1
        assert held(router) == 0
    finally:
        router.stop()


def test_holding_can_be_turned_off(tmp_path: Path) -> None:
    router = start_holding_router(tmp_path, free_port(), max_held_requests=0)
    try:
        refused = httpx.post(f"{router.url}/v2/models/mlp/infer", json=BODY, timeout=600)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "no version of the model is ready"
        outcomes = ("forwarded", "full", "timeout", "gone")
        counted = [metric(router.url, "kubeonnx_router_holds_total", outcome=o) for o in outcomes]
        assert counted == [0, 0, 0, 0]
    finally:
        router.stop()
