"""The router role with real processes: `kubeonnx serve` runtimes serving the same model as
versions 1, 2 and 3 (each answer names its version), and `kubeonnx serve --role router` in
front of them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import free_port
from tests.runtime.conftest import Served, start_server

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
SECRET = "router-test-secret"


def serve_version(tmp: Path, model: Path, version: str, **kw: Any) -> Served:
    return start_server(
        tmp,
        "--model-uri",
        f"file://{model}",
        "--model-name",
        "mlp",
        env={"KUBEONNX_MODEL_VERSION": version, "KUBEONNX_MIRROR_SECRET": SECRET},
        **kw,
    )


def start_router(tmp: Path, versions: list[dict[str, Any]], **config: Any) -> Served:
    path = tmp / f"router-{free_port()}.json"
    # Generous probe timeouts: a loaded machine must not make a ready version flap.
    path.write_text(
        json.dumps({"versions": versions, "probe_interval_s": 0.3, "probe_timeout_s": 10, **config})
    )
    return start_server(
        tmp,
        "--role",
        "router",
        env={"KUBEONNX_ROUTER_CONFIG": str(path), "KUBEONNX_MIRROR_SECRET": SECRET},
    )


def version_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def versions(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Iterator[dict[str, Served]]:
    tmp = tmp_path_factory.mktemp("router-versions")
    served: dict[str, Served] = {}
    try:
        for v in ("1", "2", "3"):
            served[v] = serve_version(tmp, models["mlp"], v)
        yield served
    finally:
        for s in served.values():
            s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def split(
    tmp_path_factory: pytest.TempPathFactory, versions: dict[str, Served]
) -> Iterator[Served]:
    router = start_router(
        tmp_path_factory.mktemp("router"),
        [
            {"name": "1", "url": versions["1"].url, "weight": 90},
            {"name": "2", "url": versions["2"].url, "weight": 10},
        ],
    )
    # The router is ready once one version is; wait until both are, or weights shift.
    deadline = time.monotonic() + 60
    while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
        assert time.monotonic() < deadline, router.logs()
        time.sleep(0.1)
    yield router
    router.stop()


def test_weights_are_exact(split: Served) -> None:
    """Smooth weighted round-robin is exact while the ready set holds: over any 10
    consecutive requests version 2 gets exactly 1, so 2,000 requests give it 200. The
    tolerance (2) covers only requests of an earlier test landing mid-cycle."""
    n = 2000
    with httpx.Client(base_url=split.url, timeout=30) as http:
        seen = Counter(version_of(http.post("/v2/models/mlp/infer", json=BODY)) for _ in range(n))
    assert abs(seen["2"] - n // 10) <= 2, seen
    assert seen["1"] + seen["2"] == n
    assert metric(split.url, "kubeonnx_router_requests_total", version="2", code="200") >= 198


def test_pinned_requests_reach_their_version(split: Served) -> None:
    with httpx.Client(base_url=split.url, timeout=30) as http:
        for _ in range(50):
            r = http.post("/v2/models/mlp/infer", json=BODY, headers={"X-Model-Version": "2"})
            assert version_of(r) == "2"
            assert version_of(http.post("/v2/models/mlp/versions/1/infer", json=BODY)) == "1"
        meta = http.get("/v2/models/mlp/versions/2")
        assert meta.status_code == 200 and meta.json()["versions"] == ["2"]
        r = http.post("/v2/models/mlp/versions/9/infer", json=BODY)
        assert r.status_code == 404
        assert "'9'" in r.json()["error"] and "versions: 1, 2" in r.json()["error"]
        r = http.get("/v2/models/mlp", headers={"X-Model-Version": "nope"})
        assert r.status_code == 404, r.text


def test_sticky_key_always_reaches_one_version(tmp_path: Path, versions: dict[str, Served]) -> None:
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": versions["1"].url, "weight": 50},
            {"name": "2", "url": versions["2"].url, "weight": 50},
        ],
        sticky=True,
    )
    try:
        deadline = time.monotonic() + 60
        while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.1)
        per_key: dict[str, set[str]] = {}
        with httpx.Client(base_url=router.url, timeout=30) as http:
            for i in range(20):
                key = f"Bearer key-{i}"
                per_key[key] = {
                    version_of(
                        http.post("/v2/models/mlp/infer", json=BODY, headers={"Authorization": key})
                    )
                    for _ in range(10)
                }
        assert all(len(seen) == 1 for seen in per_key.values()), per_key
        # The keys spread over both versions (the hash lands in the weights).
        assert set().union(*per_key.values()) == {"1", "2"}
    finally:
        router.stop()


def test_frozen_mirror_never_fails_the_client(tmp_path: Path, versions: dict[str, Served]) -> None:
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": versions["1"].url, "weight": 100},
            {"name": "3", "url": versions["3"].url, "mirror_percent": 100},
        ],
        max_mirrors_in_flight=4,
        timeout_s=600,
    )
    frozen = versions["3"]
    try:
        deadline = time.monotonic() + 60
        while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.1)
        with httpx.Client(base_url=router.url, timeout=30) as http:
            for _ in range(20):  # mirrored while the mirror is alive
                assert version_of(http.post("/v2/models/mlp/infer", json=BODY)) == "1"
            # Every copy ends sent, or dropped when 4 were in flight or a probe timed out on
            # a starved machine; waiting for 20 sent failed under load, a flake.
            outcomes = ("sent", "dropped", "failed")
            deadline = time.monotonic() + 60
            while (
                sum(
                    metric(router.url, "kubeonnx_router_mirrors_total", outcome=o) for o in outcomes
                )
                < 20
            ):
                assert time.monotonic() < deadline, router.logs()
                time.sleep(0.1)
            assert metric(router.url, "kubeonnx_router_mirrors_total", outcome="sent") >= 1
            frozen.proc.send_signal(signal.SIGSTOP)
            codes = Counter(
                http.post("/v2/models/mlp/infer", json=BODY).status_code for _ in range(200)
            )
        assert codes == {200: 200}
        # At most 4 copies wait on the frozen version; the rest were dropped, not queued.
        dropped = metric(router.url, "kubeonnx_router_mirrors_total", outcome="dropped")
        assert dropped >= 196, router.logs()
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        router.stop()


def test_mirrors_are_never_charged_and_clients_cannot_pass_for_one(
    tmp_path: Path, models: dict[str, Path], versions: dict[str, Served]
) -> None:
    """Version 5 charges quota and knows the mirror secret: the router's copies to it are
    not charged; a client's request bearing the marker (even with the right secret) is
    stripped by the router and charged once."""
    from kubeonnx_runtime.quota import key_hash

    policy = tmp_path / "quota.json"
    policy.write_text(
        json.dumps(
            {
                "policy": "router-test",
                "namespace": "default",
                "tenants": [
                    {
                        "name": "acme",
                        "keySha256": [key_hash("acme-key")],
                        "limits": [{"unit": "requests", "limit": 1000, "window": "1d"}],
                    }
                ],
            }
        )
    )
    charged = start_server(
        tmp_path,
        "--model-uri",
        f"file://{models['mlp']}",
        "--model-name",
        "mlp",
        env={
            "KUBEONNX_MODEL_VERSION": "5",
            "KUBEONNX_MIRROR_SECRET": SECRET,
            "KUBEONNX_QUOTA_CONFIG": str(policy),
        },
    )
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": versions["1"].url, "weight": 1},
            {"name": "5", "url": charged.url, "mirror_percent": 100},
        ],
    )
    key = {"X-Api-Key": "acme-key"}

    def used() -> int:
        r = httpx.get(f"{charged.url}/v2/quota", headers=key)
        return int(r.json()["limits"][0]["used"])

    try:
        deadline = time.monotonic() + 60
        while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.1)
        with httpx.Client(base_url=router.url, timeout=30) as http:
            for _ in range(10):
                assert version_of(http.post("/v2/models/mlp/infer", json=BODY, headers=key)) == "1"
            deadline = time.monotonic() + 60
            while metric(router.url, "kubeonnx_router_mirrors_total", outcome="sent") < 10:
                assert time.monotonic() < deadline, router.logs()
                time.sleep(0.1)
            assert used() == 0  # ten copies answered, none charged
            forged = {**key, "X-Kubeonnx-Mirror": SECRET, "X-Model-Version": "5"}
            r = http.post("/v2/models/mlp/infer", json=BODY, headers=forged)
            assert version_of(r) == "5"
            assert "ratelimit" in r.headers  # the upstream's quota headers pass through
        assert used() == 1  # the client's own request, charged once
    finally:
        router.stop()
        charged.stop()


def test_candidate_starting_then_killed(
    tmp_path: Path, models: dict[str, Path], versions: dict[str, Served]
) -> None:
    """A candidate gets no traffic (and causes no 503) until it is ready; killed mid-run it
    costs no 5xx beyond the requests in flight on it."""
    port = free_port()
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": versions["1"].url, "weight": 50},
            {"name": "4", "url": f"http://127.0.0.1:{port}", "weight": 50},
        ],
    )
    candidate: Served | None = None
    codes: Counter[int] = Counter()
    seen: Counter[str] = Counter()
    stop = threading.Event()
    workers = 4

    def load() -> None:
        with httpx.Client(base_url=router.url, timeout=60) as http:
            while not stop.is_set():
                r = http.post("/v2/models/mlp/infer", json=BODY)
                codes[r.status_code] += 1
                if r.status_code == 200:
                    seen[str(r.json()["model_version"])] += 1

    threads = [threading.Thread(target=load) for _ in range(workers)]
    try:
        for t in threads:
            t.start()
        candidate = start_server(
            tmp_path,
            "--model-uri",
            f"file://{models['mlp']}",
            "--model-name",
            "mlp",
            env={"KUBEONNX_MODEL_VERSION": "4", "KUBEONNX_PORT": str(port)},
            wait_ready=False,  # its own port: the router's probe finds it ready
        )
        deadline = time.monotonic() + 60
        while seen["4"] < 50:
            assert time.monotonic() < deadline, (codes, seen)
            time.sleep(0.05)
        assert set(codes) == {200}, codes  # no 503 while it started
        candidate.stop(signal.SIGKILL)
        before = seen["1"]
        deadline = time.monotonic() + 60
        while seen["1"] < before + 200:
            assert time.monotonic() < deadline, (codes, seen)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if candidate is not None:
            candidate.stop(signal.SIGKILL)
        router.stop()
    failed = sum(n for code, n in codes.items() if code >= 500)
    assert failed <= workers, codes


class FakeUpstream:
    """An HTTP/1.1 upstream (h11, a thread per connection) that misbehaves on demand.

    `/v2/health/ready` is always answered 200 (the router's probes). Any other request is
    answered `{"method", "bytes", "sha256", "nth", "headers"}` (its body's size and hash, its
    number on its connection, the names of its headers), except: `/big` answers `BIG` bytes,
    chunked; with `close_after`, the connection is closed once the answer is sent; with
    `drop_reused`, a request that is not the first on its connection (a probe counts) is
    read and its connection closed unanswered (a keep-alive connection closed by the
    upstream just as the router reused it); with `drop_next`, the next one is read and its
    connection closed unanswered (once); with `stall` set, it is read and never answered;
    with `early`, its head is answered 413 and then, the body unread: "reset", the connection
    reset (SO_LINGER 0: the router's next write of the body fails), or "half", its sending
    side closed and the rest of the body read and dropped until the router closes; with
    `junk_head`, its answer's head has that many bytes more, in headers of 16,000 bytes."""

    BIG = 3 * 1024 * 1024 + 17

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.close_after = False
        self.drop_reused = False
        self.drop_next = False
        self.stall = threading.Event()  # set: a request other than a probe is never answered
        self.early = ""  # "reset" or "half": answer 413 to a request's head, body unread
        self.junk_head = 0  # bytes of extra headers in an answer (not a probe's)
        self.dropped: list[str] = []  # "METHOD path" of each request dropped
        self.answered: list[str] = []
        self.closed = threading.Semaphore(0)  # released as close_after closes a connection
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        # The router may give up on an answer (a head over its limit), as it should.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            self._serve_on(sock)

    def _serve_on(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        nth = served = 0  # requests answered on this connection: not probes, and all
        with sock:
            while True:
                request, body = self._read(conn, sock)
                if request is None:
                    return
                path = request.target.decode()
                probe = path == "/v2/health/ready"
                nth += 0 if probe else 1
                what = f"{request.method.decode()} {path}"
                if not probe and self.stall.is_set():
                    self.stall.wait()
                    sock.recv(1)  # until the router gives up and closes the connection
                    return
                if not probe and (self.drop_next or (self.drop_reused and served)):
                    self.drop_next = False
                    self.dropped.append(what)
                    return
                served += 1
                if path == "/big":
                    head = [(b"content-type", b"application/octet-stream")]
                    chunks = [bytes([i % 251]) * 65536 for i in range(self.BIG // 65536)]
                    chunks.append(b"x" * (self.BIG % 65536))
                else:
                    answer = {
                        "method": request.method.decode(),
                        "bytes": len(body),
                        "sha256": hashlib.sha256(body).hexdigest(),
                        "nth": nth,
                        "headers": sorted(k.decode() for k, _ in request.headers),
                    }
                    chunks = [json.dumps(answer).encode()]
                    head = [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(chunks[0])).encode()),
                    ]
                    if not probe:
                        head += [(b"x-junk", b"j" * 16_000)] * (self.junk_head // 16_000)
                sock.sendall(conn.send(h11.Response(status_code=200, headers=head)) or b"")
                if request.method != b"HEAD":
                    for chunk in chunks:
                        sock.sendall(conn.send(h11.Data(data=chunk)) or b"")
                sock.sendall(conn.send(h11.EndOfMessage()) or b"")
                if not probe:
                    self.answered.append(what)
                if self.close_after and not probe:
                    sock.shutdown(socket.SHUT_RDWR)
                    self.closed.release()
                    return
                conn.start_next_cycle()

    def _answer_early(self, conn: h11.Connection, sock: socket.socket) -> None:
        answer = b'{"error":"too large"}'
        head = [(b"content-type", b"application/json"), (b"content-length", b"21")]
        sock.sendall(
            (conn.send(h11.Response(status_code=413, headers=head)) or b"")
            + (conn.send(h11.Data(data=answer)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        if self.early == "reset":  # closed at once with a RST, whatever is in flight
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):  # the rest of the body, dropped
                pass
        except OSError:
            pass

    def _read(self, conn: h11.Connection, sock: socket.socket) -> tuple[Any, bytes]:
        request, body = None, bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # the router cut a request short
                return None, b""
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(sock.recv(65536))
                except OSError:
                    return None, b""
            elif isinstance(event, h11.Request):
                request = event
                if self.early and event.target != b"/v2/health/ready":
                    self._answer_early(conn, sock)
                    return None, b""  # closed with the body unread
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed
                return None, b""

    def stop(self) -> None:
        self.server.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeUpstream, Served]]:
    upstream = FakeUpstream()
    # Probed at start, and at once after a failed connection, not every 0.3 s: a periodic
    # probe holding the kept-alive connection would send a test's request on a fresh one.
    router = start_router(
        tmp_path, [{"name": "1", "url": upstream.url, "weight": 1}], probe_interval_s=60
    )
    yield upstream, router
    router.stop()
    upstream.stop()


def raw_exchange(url: str, data: bytes, answers: int) -> list[bytes]:
    """Send raw bytes on one connection; read `answers` whole answers (content-length)."""
    host, port = url.removeprefix("http://").split(":")
    got: list[bytes] = []
    buffer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        while len(got) < answers:
            while b"\r\n\r\n" not in buffer:
                buffer += sock.recv(65536)
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])  # type: ignore[index]
            while len(buffer) < length:
                buffer += sock.recv(65536)
            got.append(buffer[:length])
            buffer = buffer[length:]
    return got


def test_large_bodies_stream_both_ways(fake: tuple[FakeUpstream, Served]) -> None:
    """A body of known length over 64 KiB, a chunked one (no length) and a chunked answer
    of megabytes pass through whole; a HEAD answer ends at its head."""
    _, router = fake
    big = bytes(range(256)) * 8192  # 2 MiB
    with httpx.Client(base_url=router.url, timeout=60) as http:
        r = http.post("/v2/models/m/infer", content=big)
        assert r.json()["bytes"] == len(big)
        assert r.json()["sha256"] == hashlib.sha256(big).hexdigest()

        def parts() -> Iterator[bytes]:
            for i in range(0, len(big), 100_000):
                yield big[i : i + 100_000]

        r = http.post("/v2/models/m/infer", content=parts())  # transfer-encoding: chunked
        assert r.json()["sha256"] == hashlib.sha256(big).hexdigest(), r.text
        r = http.get("/big")
        assert len(r.content) == FakeUpstream.BIG
        assert r.content[65536 * 5] == 5 and r.content.endswith(b"x" * 17)
        r = http.head("/v2/models/m")
        assert r.status_code == 200 and r.content == b""
        assert int(r.headers["content-length"]) > 0  # the GET's length, as HEAD promises


def test_pipelined_requests_are_answered_in_order(fake: tuple[FakeUpstream, Served]) -> None:
    _, router = fake
    requests = b"".join(
        b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
        % (len(body), body)
        for body in (b"a", b"bb", b"ccc")
    )
    answers = [json.loads(a) for a in raw_exchange(router.url, requests, 3)]
    assert [a["bytes"] for a in answers] == [1, 2, 3]


def test_client_leaving_mid_body_is_not_the_upstreams_failure(
    fake: tuple[FakeUpstream, Served],
) -> None:
    """The client promises 1 MiB, sends 200 KiB and leaves: counted as 499, the upstream
    stays ready (no 502), and the next requests are answered."""
    _, router = fake
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 1048576\r\n\r\n"
            + b"z" * 200_000
        )
    deadline = time.monotonic() + 60
    while metric(router.url, "kubeonnx_router_requests_total", code="499") < 1:
        assert time.monotonic() < deadline, router.logs()
        time.sleep(0.05)
    assert metric(router.url, "kubeonnx_router_requests_total", code="502") == 0
    assert metric(router.url, "kubeonnx_router_upstream_ready") == 1
    with httpx.Client(base_url=router.url, timeout=30) as http:
        assert http.post("/v2/models/m/infer", content=b"ok").json()["bytes"] == 2


def test_upstream_closing_kept_alive_connections(fake: tuple[FakeUpstream, Served]) -> None:
    """An upstream that closes its connection after each answer: the router notices and
    opens a fresh one (any method). One that closes a reused connection on receiving the
    request: a GET is sent again on a fresh connection; a POST is not (it may have been
    acted on), it is a 502."""
    upstream, router = fake
    upstream.close_after = True
    with httpx.Client(base_url=router.url, timeout=30) as http:
        for i in range(5):
            r = http.post("/v2/models/m/infer", content=b"x" * i)
            assert r.status_code == 200 and r.json()["nth"] == 1, r.text
            assert upstream.closed.acquire(timeout=30)  # closed before the next is sent
        upstream.close_after = False
        http.get("/v2/models/m")  # leaves a kept-alive connection in the router's pool
        upstream.drop_reused = True
        r = http.get("/v2/models/m")
        assert r.status_code == 200 and r.json()["nth"] == 1, r.text
        assert upstream.dropped == ["GET /v2/models/m"]
        r = http.post("/v2/models/m/infer", content=b"once")
        assert r.status_code == 502, r.text
        assert upstream.dropped == ["GET /v2/models/m", "POST /v2/models/m/infer"]
    assert upstream.answered.count("POST /v2/models/m/infer") == 5  # the dropped one: never


def test_upstream_that_does_not_answer_is_a_504(tmp_path: Path) -> None:
    upstream = FakeUpstream()
    router = start_router(tmp_path, [{"name": "1", "url": upstream.url, "weight": 1}], timeout_s=1)
    try:
        upstream.stall.set()
        with httpx.Client(base_url=router.url, timeout=60) as http:
            r = http.post("/v2/models/m/infer", content=b"x")
            assert r.status_code == 504, r.text
            assert r.json()["error"] == "model version '1' did not answer in time"
            upstream.stall.clear()
            assert http.post("/v2/models/m/infer", content=b"x").json()["bytes"] == 1
        assert metric(router.url, "kubeonnx_router_requests_total", code="504") == 1
    finally:
        router.stop()
        upstream.stop()


@pytest.mark.parametrize("early", ["reset", "half"])
def test_upstream_answering_before_the_whole_body_is_relayed(
    fake: tuple[FakeUpstream, Served], early: str
) -> None:
    """An upstream that refuses a large body from its head (413): its answer reaches the
    client, and the version stays ready (it did not fail). Whether the upstream then resets
    the connection (the router's next write of the body fails, maybe before the answer it
    already holds is read) or closes its side and drops the rest of the body, the answer
    passes: 20 times, as the order of the answer and the failed write is the machine's."""
    upstream, router = fake
    upstream.early = early
    with httpx.Client(base_url=router.url, timeout=60) as http:
        for _ in range(20):
            r = http.post("/v2/models/m/infer", content=b"z" * (4 * 1024 * 1024))
            assert r.status_code == 413, r.text
            assert r.json() == {"error": "too large"}
    assert metric(router.url, "kubeonnx_router_requests_total", code="502") == 0
    assert metric(router.url, "kubeonnx_router_upstream_ready") == 1


def test_an_upstream_answer_head_over_64_kib_is_a_502(fake: tuple[FakeUpstream, Served]) -> None:
    """The answer's status line and headers are bounded as a client's are (64 KiB): over
    it, a 502 and the connection closed, not megabytes of headers held and relayed. Just
    under it, the answer passes."""
    upstream, router = fake
    with httpx.Client(base_url=router.url, timeout=60) as http:
        upstream.junk_head = 60_000
        r = http.post("/v2/models/m/infer", content=b"under")
        assert r.status_code == 200 and len(r.headers.get_list("x-junk")) == 3, r.text
        upstream.junk_head = 400_000
        r = http.post("/v2/models/m/infer", content=b"over")
        assert r.status_code == 502, r.text
        assert r.json()["error"] == (
            "model version '1' failed: the answer's head is over 65536 bytes"
        )


def test_one_dropped_connection_does_not_shift_the_weights(tmp_path: Path) -> None:
    """A version is a Service over many pods: one connection it drops (a 502) is one pod
    failing, not the version gone. With weights 99:1 the canary still gets exactly its 1 in
    100 after the drop (it got every request until the stable version's next probe: 60 s
    here, so the test does not depend on the machine's speed)."""
    stable, canary = FakeUpstream(), FakeUpstream()
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": stable.url, "weight": 99},
            {"name": "2", "url": canary.url, "weight": 1},
        ],
        probe_interval_s=60,
    )
    try:
        deadline = time.monotonic() + 60
        while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.1)
        stable.drop_next = True
        with httpx.Client(base_url=router.url, timeout=60) as http:
            r = http.post("/v2/models/m/infer", content=b"x")  # the first pick: version 1
            assert r.status_code == 502, r.text
            codes = Counter(
                http.post("/v2/models/m/infer", content=b"x").status_code for _ in range(199)
            )
        assert codes == {200: 199}
        assert stable.dropped == ["POST /v2/models/m/infer"]
        deadline = time.monotonic() + 60
        while len(stable.answered) + len(canary.answered) < 199:  # their threads' last appends
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (len(stable.answered), len(canary.answered)) == (197, 2)  # 200 picks at 99:1
        assert metric(router.url, "kubeonnx_router_upstream_ready", version="1") == 1
    finally:
        router.stop()
        stable.stop()
        canary.stop()


def test_trailer_fields_neither_route_nor_go_upstream(tmp_path: Path) -> None:
    """A chunked request's trailer fields are not headers (RFC 9110 6.5.1): a trailer naming
    a version, an API key and credentials neither pins the request nor reaches the upstream."""
    stable, other = FakeUpstream(), FakeUpstream()
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": stable.url, "weight": 1},
            {"name": "2", "url": other.url, "weight": 0},  # reached only when pinned
        ],
        sticky=True,
        tenant_header="X-Api-Key",
    )
    try:
        deadline = time.monotonic() + 60
        while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.1)
        request = (
            b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            b"content-type: application/json\r\n\r\n"
            b"2\r\n{}\r\n0\r\n"
            b"X-Model-Version: 2\r\nX-Api-Key: victim\r\nAuthorization: Bearer forged\r\n\r\n"
        )
        host, port = router.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(request)  # one write: the trailer is parsed before the request is routed
            reader = h11.Connection(h11.CLIENT)
            reader.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            reader.send(h11.EndOfMessage())
            answer, data = None, b""
            while True:
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    answer = event
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        assert answer is not None and answer.status_code == 200, data
        got = json.loads(data)
        assert got["bytes"] == 2
        assert not {"x-model-version", "x-api-key", "authorization"} & set(got["headers"]), got
        # The stand-in records an answer after sending it: wait for the record, not a race.
        deadline = time.monotonic() + 30
        while not stable.answered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stable.answered) == 1 and other.answered == []
    finally:
        router.stop()
        stable.stop()
        other.stop()


def test_a_mirrored_version_that_answered_gets_no_copy(tmp_path: Path) -> None:
    """A request pinned to the mirrored version is answered by it: copying it there as well
    would run it twice on that version. The copy is skipped (counted so)."""
    stable, mirror = FakeUpstream(), FakeUpstream()
    router = start_router(
        tmp_path,
        [
            {"name": "1", "url": stable.url, "weight": 1},
            {"name": "2", "url": mirror.url, "mirror_percent": 100},
        ],
    )
    try:
        deadline = time.monotonic() + 60
        while metric(router.url, "kubeonnx_router_upstream_ready") < 2:
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.1)
        with httpx.Client(base_url=router.url, timeout=60) as http:
            pinned = http.post("/v2/models/m/infer", content=b"p", headers={"X-Model-Version": "2"})
            assert pinned.status_code == 200, pinned.text
            assert http.post("/v2/models/m/infer", content=b"w").status_code == 200  # copied
        outcomes = ("sent", "skipped", "dropped", "failed")
        deadline = time.monotonic() + 60
        while (
            sum(metric(router.url, "kubeonnx_router_mirrors_total", outcome=o) for o in outcomes)
            < 2
        ):
            assert time.monotonic() < deadline, router.logs()
            time.sleep(0.05)
        seen = {o: metric(router.url, "kubeonnx_router_mirrors_total", outcome=o) for o in outcomes}
        assert seen == {"sent": 1, "skipped": 1, "dropped": 0, "failed": 0}, seen
        assert stable.answered == ["POST /v2/models/m/infer"]
    finally:
        router.stop()
        stable.stop()
        mirror.stop()


def test_a_transfer_coding_other_than_chunked_is_a_501(fake: tuple[FakeUpstream, Served]) -> None:
    """`Transfer-Encoding: gzip, chunked` would go upstream as `chunked` alone, the gzip
    coding lost: the router refuses it (501) rather than change the body's meaning."""
    upstream, router = fake
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\n"
            b"transfer-encoding: gzip, chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            assert more, answer
            answer += more
    assert answer.startswith(b"HTTP/1.1 501 "), answer
    assert upstream.answered == []
    with httpx.Client(base_url=router.url, timeout=60) as http:
        r = http.post("/v2/models/m/infer", content=iter([b"ok"]))  # chunked alone: passed on
        assert r.json()["bytes"] == 2
