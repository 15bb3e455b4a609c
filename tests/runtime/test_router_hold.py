"""The router holds a request that no ready version may take (a model scaled to zero), with
real processes: `kubeonnx serve --role router` in front of a port where no runtime runs yet,
then a real `kubeonnx serve` started there."""

from __future__ import annotations

import contextlib
import json
import re
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


def start_holding_router(
    tmp: Path,
    port: int,
    env: dict[str, str] | None = None,
    versions: list[dict[str, Any]] | None = None,
    **config: Any,
) -> Served:
    """A router for version "1" of model mlp at `port` (or for `versions`); it is not ready
    until a runtime answers there, so it is started without waiting for its readiness."""
    path = tmp / f"router-{free_port()}.json"
    versions = versions or [{"name": "1", "url": f"http://127.0.0.1:{port}", "weight": 100}]
    path.write_text(
        json.dumps({"model": "mlp", "versions": versions, "probe_interval_s": 0.3, **config})
    )
    router = start_server(
        tmp,
        "--role",
        "router",
        env={
            "KUBEONNX_ROUTER_CONFIG": str(path),
            "KUBEONNX_MIRROR_SECRET": SECRET,
            **(env or {}),
        },
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


def _runtime_on(tmp_path: Path, models: dict[str, Path], port: int) -> Served:
    """Version 1 of the mlp model on the router's upstream port, not waited for: the
    router's probe finds it ready."""
    return start_server(
        tmp_path,
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        env={"KUBEONNX_MODEL_VERSION": "1", "KUBEONNX_PORT": str(port)},
        wait_ready=False,
    )


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
        runtime = _runtime_on(tmp_path, models, port)
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


def _held_connection(router: Served) -> socket.socket:
    """One inference request on a connection of our own (the caller closes it)."""
    body = json.dumps(BODY).encode()
    client = socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])))
    client.sendall(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: router\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return client


def test_over_the_count_is_refused_at_once_and_a_client_leaving_is_dropped(
    tmp_path: Path,
) -> None:
    router = start_holding_router(tmp_path, free_port(), max_held_requests=1, max_hold_s=600)
    try:
        # One request held, on a connection of our own (closed below).
        client = _held_connection(router)
        until(lambda: held(router) == 1, "the request held")

        # The hold is full: the next one is refused without being held.
        refused = httpx.post(f"{router.url}/v2/models/mlp/infer", json=BODY, timeout=600)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"  # not 1: no retry storm
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
        sent = time.monotonic()
        refused = httpx.post(f"{router.url}/v2/models/mlp/infer", json=BODY, timeout=600)
        # How long it was held, measured here: the message below is built from the config.
        # A lower bound: a loaded machine only makes it longer.
        assert time.monotonic() - sent >= 1
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "5"  # not 1: no retry storm
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


def _send_raw(router: Served, head: bytes, body: bytes) -> socket.socket:
    """A request on a connection of our own, sent by a thread: a large body's rest is not
    read while the request is held, so sending it blocks."""
    client = socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])))

    def send() -> None:
        with contextlib.suppress(OSError):
            client.sendall(head + body)

    threading.Thread(target=send, daemon=True).start()
    return client


def _read_answer(client: socket.socket) -> bytes:
    """The router's answer: its whole body, or all until it closes the connection."""
    client.settimeout(120)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := client.recv(65536):
            data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: *(\d+)", head.lower())
            if (length and len(rest) >= int(length[1])) or rest.endswith(b"\r\n0\r\n\r\n"):
                break
    return data


def test_a_held_request_with_a_large_body_outlives_the_read_timeout(tmp_path: Path) -> None:
    """Its body's rest is not read while held: the read timeout (1 s here) must not cut it
    (a 408, counted as gone); it is held its whole max_hold_s, then 503 with Retry-After."""
    router = start_holding_router(
        tmp_path, free_port(), env={"KUBEONNX_READ_TIMEOUT_S": "1"}, max_hold_s=4
    )
    try:
        size = 1_000_000
        sent = time.monotonic()
        client = _send_raw(
            router,
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: router\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % size,
            b"a" * size,
        )
        answer = _read_answer(client)
        # Held its whole 4 s, four times the read timeout (measured: the message below is
        # built from the config); a lower bound, which a loaded machine cannot break.
        assert time.monotonic() - sent >= 4
        client.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert b"retry-after: 5" in answer.lower()
        assert b"the request was held 4 s (max_hold_s)" in answer
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="timeout") == 1
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="gone") == 0
    finally:
        router.stop()


def test_only_requests_to_run_the_model_are_held(tmp_path: Path) -> None:
    """Nothing ready: a stray path is a 404 and the model's readiness or metadata a 503 at
    once, neither held nor counted as demand; an inference request is held."""
    router = start_holding_router(tmp_path, free_port(), max_hold_s=600)
    try:
        for method, path, status in [
            ("GET", "/wp-login.php", 404),
            ("POST", "/wp-login.php", 404),
            ("GET", "/v2", 503),
            ("GET", "/v2/models/mlp", 503),
            ("GET", "/v2/models/mlp/ready", 503),
            ("POST", "/v2/models/other/infer", 503),  # another model's: not this one's demand
        ]:
            answer = httpx.request(method, f"{router.url}{path}", timeout=60)
            assert answer.status_code == status, (path, answer.text)
        outcomes = ("forwarded", "full", "timeout", "gone", "shutdown")
        counted = [metric(router.url, "kubeonnx_router_holds_total", outcome=o) for o in outcomes]
        assert counted == [0, 0, 0, 0, 0]
        thread, answers = post_in_thread(router.url)  # the model's own infer: held
        until(lambda: held(router) == 1, "the request held")
        router.proc.send_signal(signal.SIGTERM)
        thread.join(WAIT_S)
        assert answers[0].status_code == 503
    finally:
        router.stop()


def test_a_router_stopping_answers_its_held_requests_at_once(tmp_path: Path) -> None:
    """SIGTERM: each held request is answered 503 with Retry-After at once (its client
    tries another replica), not after the graceful shutdown's 30 s with a 500."""
    router = start_holding_router(tmp_path, free_port(), max_hold_s=600)
    try:
        thread, answers = post_in_thread(router.url)
        size = 1_000_000  # and one whose body's rest is unread: its answer arrives whole
        client = _send_raw(
            router,
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: router\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % size,
            b"a" * size,
        )
        until(lambda: held(router) == 2, "the requests held")
        router.proc.send_signal(signal.SIGTERM)
        thread.join(WAIT_S)
        (answer,) = answers
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        error = "no version of the model is ready, and the router is shutting down"
        assert answer.json()["error"] == error
        raw = _read_answer(client)
        client.close()
        assert raw.startswith(b"HTTP/1.1 503 "), raw[:300]
        assert error.encode() in raw
        assert router.proc.wait(WAIT_S) == 0
        assert "graceful shutdown exceeded" not in router.logs()
    finally:
        router.stop()


def test_a_request_pinned_to_a_version_not_held_for_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """A candidate (`hold: false`) is not woken by held requests: one pinned to it while it
    is not ready gets 503 at once, and is not counted as the stable's demand."""
    versions = [
        {"name": "1", "url": f"http://127.0.0.1:{free_port()}", "weight": 100},
        {"name": "2", "url": f"http://127.0.0.1:{free_port()}", "weight": 0, "hold": False},
    ]
    router = start_holding_router(tmp_path, 0, versions=versions, max_hold_s=600)
    try:
        refused = httpx.post(
            f"{router.url}/v2/models/mlp/infer",
            json=BODY,
            headers={"X-Model-Version": "2"},
            timeout=60,
        )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "model version '2' is not ready"
        assert held(router) == 0
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="timeout") == 0
    finally:
        router.stop()


def test_a_held_client_that_half_closes_its_connection_is_taken_as_gone(tmp_path: Path) -> None:
    """As nginx takes it: a client that shuts its sending side after its request is no
    longer held, nor counted as demand that would wake the model."""
    router = start_holding_router(tmp_path, free_port(), max_hold_s=600)
    try:
        client = _held_connection(router)
        until(lambda: held(router) == 1, "the request held")
        client.shutdown(socket.SHUT_WR)
        until(lambda: held(router) == 0, "the half-closed client no longer held")
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="gone") == 1
        client.close()
    finally:
        router.stop()


def test_after_a_hold_the_rest_of_a_large_body_has_the_whole_read_timeout(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """The read timeout (5 s here) starts again when the hold ends: a request whose body
    arrives over longer than the timeout, most of it after a hold that outlasted it, is
    forwarded and answered, not cut with a 408 once the hold ends."""
    port = free_port()
    router = start_holding_router(
        tmp_path, port, env={"KUBEONNX_READ_TIMEOUT_S": "5"}, max_hold_s=600
    )
    runtime: Served | None = None
    try:
        body = json.dumps(BODY).encode() + b" " * 1_000_000  # its rest unread while held
        client = _send_raw(
            router,
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: router\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body),
            body,
        )
        until(lambda: held(router) == 1, "the request held")
        # The request's first byte came before it was held: past this, its own read
        # timeout is over (a lower bound, which a loaded machine only lengthens). After the
        # hold, 5 s for the body's rest (1 MB on loopback): ample on a loaded machine.
        time.sleep(5)
        runtime = _runtime_on(tmp_path, models, port)
        answer = _read_answer(client)
        client.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        direct = httpx.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=BODY)
        outputs = json.loads(answer.partition(b"\r\n\r\n")[2])["outputs"]
        assert outputs == direct.json()["outputs"]
        assert metric(router.url, "kubeonnx_router_holds_total", outcome="forwarded") == 1
        assert metric(router.url, "kubeonnx_router_requests_total", version="1", code="200") == 1
    finally:
        if runtime is not None:
            runtime.stop(signal.SIGKILL)
        router.stop()
