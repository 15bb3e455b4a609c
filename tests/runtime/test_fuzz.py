"""Fuzz and hostile requests against the real server: nothing answers 5xx, every hostile
request gets the status it must, the event loop keeps answering and memory stays bounded."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from e2e.cluster import free_port
from e2e.serving import wait_serving
from tests.runtime.conftest import Served, start_server
from tests.runtime.test_image_bombs import files, scan_bomb, webp_bomb

DATATYPES = ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "X", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)
# Every field may hold any JSON value, objects and arrays included, where a string, a number
# or an object belongs.
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "features", "ids", "mask", "tag", "zzz"]) | json_values,
        "datatype": st.sampled_from(DATATYPES) | json_values,
        "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    },
    optional={
        "data": st.lists(
            st.integers(-(2**70), 2**70) | st.floats() | st.booleans() | st.text(max_size=3),
            max_size=12,
        )
        | json_values,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-5, 64) | json_values}
        )
        | json_values,
    },
)
bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, max_size=4) | json_values},
    optional={
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.text(max_size=8) | json_values},
                optional={
                    "parameters": st.fixed_dictionaries({}, optional={"binary_data": json_values})
                    | json_values
                },
            ),
            max_size=2,
        )
        | json_values,
        "parameters": json_values,
        "id": json_values,
    },
)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for every example: a new one per example loaded the CA bundle each time,
    which on a loaded machine took most of the hang detector's 300 s. A new connection per
    request still, as each example had."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=60, limits=limits) as client:
        yield client


# Hundreds of examples, each a request: on a loaded machine they take minutes, and the
# pytest-timeout that ends a hung test must outlast them (no hypothesis deadline either).
@pytest.mark.timeout(1200)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies,
    tail=st.binary(max_size=48),
    header_len=st.none() | st.integers(-3, 400),
    model=st.sampled_from(["mixed", "mixed", "other"]),
)
def test_no_request_body_gets_a_5xx(
    mixed_server: Served,
    http: httpx.Client,
    body,
    tail: bytes,  # type: ignore[no-untyped-def]
    header_len: int | None,
    model: str,
) -> None:
    raw = json.dumps(body).encode() + (tail if header_len is not None else b"")
    headers = {"Inference-Header-Content-Length": str(header_len)} if header_len is not None else {}
    r = http.post(f"{mixed_server.url}/v2/models/{model}/infer", content=raw, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text, raw[:300])
    assert r.status_code in (200, 400, 404), r.status_code
    if r.status_code != 200:
        assert r.json()["error"]


@pytest.mark.timeout(1200)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=st.binary(max_size=200),
    path=st.sampled_from(
        ["/v2/models/mixed/infer", "/v2/models/mixed/versions/1/infer", "/v2/models/%00/infer"]
    ),
)
def test_arbitrary_bytes_get_a_4xx(
    mixed_server: Served, http: httpx.Client, raw: bytes, path: str
) -> None:
    r = http.post(f"{mixed_server.url}{path}", content=raw)
    assert 400 <= r.status_code < 500


GOOD_INPUT = {"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}
WRONG_KINDS = [{"a": 1}, [1, "x"], [], 7, 1.5, True, None, "s"]
# (where in the request, how to put a value there)
FIELDS: dict[str, Callable[[object], dict]] = {  # type: ignore[type-arg]
    "inputs": lambda v: {"inputs": v},
    "inputs[0]": lambda v: {"inputs": [v]},
    "inputs[].name": lambda v: {"inputs": [{**GOOD_INPUT, "name": v}]},
    "inputs[].datatype": lambda v: {"inputs": [{**GOOD_INPUT, "datatype": v}]},
    "inputs[].shape": lambda v: {"inputs": [{**GOOD_INPUT, "shape": v}]},
    "inputs[].shape[0]": lambda v: {"inputs": [{**GOOD_INPUT, "shape": [v, 4]}]},
    "inputs[].data": lambda v: {"inputs": [{**GOOD_INPUT, "data": v}]},
    "inputs[].data[0]": lambda v: {"inputs": [{**GOOD_INPUT, "data": [v, 1, 1, 1]}]},
    "inputs[].parameters": lambda v: {"inputs": [{**GOOD_INPUT, "parameters": v}]},
    "inputs[].parameters.binary_data_size": lambda v: {
        "inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": v}}]
    },
    "outputs": lambda v: {"inputs": [GOOD_INPUT], "outputs": v},
    "outputs[0]": lambda v: {"inputs": [GOOD_INPUT], "outputs": [v]},
    "outputs[].name": lambda v: {"inputs": [GOOD_INPUT], "outputs": [{"name": v}]},
    "outputs[].parameters": lambda v: {
        "inputs": [GOOD_INPUT],
        "outputs": [{"name": "score", "parameters": v}],
    },
    "outputs[].parameters.binary_data": lambda v: {
        "inputs": [GOOD_INPUT],
        "outputs": [{"name": "score", "parameters": {"binary_data": v}}],
    },
    "parameters": lambda v: {"inputs": [GOOD_INPUT], "parameters": v},
    "parameters.binary_data_output": lambda v: {
        "inputs": [GOOD_INPUT],
        "parameters": {"binary_data_output": v},
    },
    "id": lambda v: {"inputs": [GOOD_INPUT], "id": v},
}


@pytest.mark.parametrize("field", list(FIELDS))
def test_any_json_value_in_any_field_gets_a_4xx_or_an_answer(
    mixed_server: Served, field: str
) -> None:
    """No JSON document is a 5xx: every field holding an object, an array, a number, a
    boolean, null or a string is refused with a message, or (where it may) served."""
    with httpx.Client(timeout=10) as http:
        for value in WRONG_KINDS:
            body = FIELDS[field](value)
            for headers in ({}, {"Inference-Header-Content-Length": str(len(json.dumps(body)))}):
                r = http.post(
                    f"{mixed_server.url}{INFER}", content=json.dumps(body), headers=headers
                )
                assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
                if r.status_code == 400:
                    assert r.json()["error"], (field, value)


def test_server_is_up_and_correct_after_the_fuzz(mixed_server: Served) -> None:
    assert httpx.get(f"{mixed_server.url}/v2/health/ready").status_code == 200
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
            {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [0, 0]},
            {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, True]},
            {"name": "tag", "shape": [1, 1], "datatype": "BYTES", "data": ["ok"]},
        ]
    }
    r = httpx.post(f"{mixed_server.url}/v2/models/mixed/infer", json=body)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [4.0]


# Hostile requests, one by one, each with the status it must get. While each is sent, a probe
# asks /v2/health/live every 20 ms: every answer must come within 1 s (the event loop is never
# frozen), and the server's RSS must grow by less than 64 MiB.

LIMIT = 8 * 1024 * 1024  # --max-request-bytes of the guarded server
HEAD_LIMIT = 16 * 1024
# Long enough that 200 slow connections, opened on a loaded machine, are still open when the
# first of another client's requests is answered (at 1 s, all had been timed out before).
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 300
BATCH_DELAY_MS = 200


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Served]:
    served = start_server(
        tmp_path_factory.mktemp("guarded"),
        *("--model-uri", f"file://{models['mixed']}", "--model-name", "mixed"),
        env={
            "KUBEONNX_MAX_REQUEST_BYTES": str(LIMIT),
            "KUBEONNX_MAX_HEADER_BYTES": str(HEAD_LIMIT),
            "KUBEONNX_READ_TIMEOUT_S": str(READ_TIMEOUT),
            "KUBEONNX_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "KUBEONNX_MAX_BATCH_SIZE": "8",
            "KUBEONNX_MAX_BATCH_DELAY_MS": str(BATCH_DELAY_MS),
        },
    )
    yield served
    served.stop(signal.SIGKILL, timeout=10)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


class LivenessProbe(threading.Thread):
    """Asks `url`/v2/health/live every 20 ms until stopped; records the slowest answer. The
    client's timeout is generous: a starved machine makes an answer late, not a failure."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/v2/health/live"
        self.timeout = timeout
        self.worst = 0.0
        self.failures: list[str] = []
        self.answers = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=self.timeout) as http:
            while True:
                started = time.monotonic()
                try:
                    status = http.get(self.url).status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                    self.answers += 1
                except Exception as exc:  # any failure is recorded, none ends the probe unseen
                    self.failures.append(repr(exc))
                self.worst = max(self.worst, time.monotonic() - started)
                if self._stop_event.wait(0.02):
                    return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def __str__(self) -> str:
        return f"{self.url}: {self.answers} answers, worst {self.worst:.2f}s, {self.failures[:3]}"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a trivial server in its own process (liveness_control.py) that the probe
    asks alongside the runtime: how late its answers come is how late the machine makes
    any server's answers."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("control") / "control.log"
    script = Path(__file__).with_name("liveness_control.py")
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port)], stdout=logf, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(f"{url}/v2/health/live", proc, 60, what="the control", logs=log_path.read_text)
        yield url
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def unharmed(
    served: Served, control: str, *, peak: int | None = None, probe_bound: float = 1.0
) -> Iterator[None]:
    """The probe answers all along, each time within `probe_bound` seconds more than the
    slowest answer of the control asked over the same period (the machine's own lateness,
    measured rather than assumed); RSS grows by less than 64 MiB, or with `peak`, never
    peaks (nor stays) more than that above its start."""
    if peak is not None:  # Linux resets the peak (VmHWM) on writing 5 to clear_refs
        Path(f"/proc/{served.proc.pid}/clear_refs").write_text("5")
    before = rss(served.proc.pid)
    probe, baseline = LivenessProbe(served.url), LivenessProbe(control)
    probe.start()
    baseline.start()
    try:
        yield
    finally:
        probe.stop()
        baseline.stop()
    assert not baseline.failures and baseline.answers > 0, f"the control failed: {baseline}"
    assert not probe.failures and probe.answers > 0, f"{probe}; the control {baseline}"
    assert probe.worst < probe_bound + baseline.worst, (
        f"/v2/health/live took {probe.worst:.2f}s, the control's slowest {baseline.worst:.2f}s"
    )
    assert httpx.get(f"{served.url}/v2/health/live", timeout=30).status_code == 200
    grown = rss(served.proc.pid) - before
    kept = 64 * 1024 * 1024 if peak is None else peak  # what the allocator keeps, at most
    assert grown < kept, f"RSS grew {grown / 2**20:.0f} MiB"
    if peak is not None:
        peaked = _status_kib(served.proc.pid, "VmHWM") * 1024 - before
        assert peaked < peak, f"RSS peaked {peaked >> 20} MiB above its start"


def address(served: Served) -> tuple[str, int]:
    host, port = served.url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(served: Served, data: bytes, timeout: float = 10) -> tuple[int | None, bytes]:
    """Send raw bytes, read until the server closes; (status, body), status None if the
    server reset the connection without an answer the client could read."""
    with socket.create_connection(address(served), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    response = b"".join(chunks)
    if not response:
        return None, b""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def post(path: str, body: bytes, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


INFER = "/v2/models/mixed/infer"


def tensor(name: str, datatype: str, shape: list[int], data: object) -> dict:  # type: ignore[type-arg]
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def mixed_inputs(rows: int = 1, tag: object = None) -> list[dict]:  # type: ignore[type-arg]
    return [
        tensor("features", "FP32", [rows, 4], [1.0] * 4 * rows),
        tensor("ids", "INT64", [rows, 2], [1] * 2 * rows),
        tensor("mask", "BOOL", [rows, 2], [True] * 2 * rows),
        tag or tensor("tag", "BYTES", [rows, 1], ["t"] * rows),
    ]


def json_body(inputs: list[dict], **extra: object) -> bytes:  # type: ignore[type-arg]
    return json.dumps({"inputs": inputs, **extra}).encode()


def binary_tag(raw: bytes) -> tuple[bytes, int]:
    """A request whose BYTES input 'tag' travels as binary data."""
    buf = struct.pack("<I", len(raw)) + raw
    tag = {
        "name": "tag",
        "datatype": "BYTES",
        "shape": [1, 1],
        "parameters": {"binary_data_size": len(buf)},
    }
    head = json_body(mixed_inputs(tag=tag))
    return head + buf, len(head)


def gzip_bomb() -> bytes:
    out = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    return b"".join([*(out.compress(zeros) for _ in range(64)), out.flush()])


def deflate_bomb() -> bytes:
    out = zlib.compressobj(9)
    zeros = b"\0" * (1 << 20)
    return b"".join([*(out.compress(zeros) for _ in range(64)), out.flush()])


def bool_byte_two() -> tuple[bytes, int]:
    mask = {"name": "mask", "datatype": "BOOL", "shape": [1, 2]}
    mask["parameters"] = {"binary_data_size": 2}  # type: ignore[assignment]
    inputs = [i for i in mixed_inputs() if i["name"] != "mask"] + [mask]
    head = json_body(inputs)
    return head + b"\x01\x02", len(head)


HOSTILE: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "gzip bomb (64 MiB of zeros in 64 KiB)": (
        lambda: post(INFER, gzip_bomb(), Content_Encoding="gzip"),
        413,
        "inflates to more than",
    ),
    "deflate bomb": (
        lambda: post(INFER, deflate_bomb(), Content_Encoding="deflate"),
        413,
        "inflates to more than",
    ),
    "truncated gzip": (
        lambda: post(INFER, gzip_bomb()[:1000], Content_Encoding="gzip"),
        400,
        "truncated",
    ),
    "Content-Length of 1 GB, nothing sent": (
        lambda: f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n".encode(),
        413,
        "the limit is 8388608",
    ),
    "chunked body past the limit": (
        lambda: (
            f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(b"10000\r\n" + b"\0" * 0x10000 + b"\r\n" for _ in range(160))
            + b"0\r\n\r\n"
        ),
        413,
        "over the limit of 8388608",
    ),
    "100 KB header line": (
        lambda: post(INFER, json_body(mixed_inputs()), X_Junk="a" * 100_000),
        431,
        "over the limit of 16384",
    ),
    "request line of 100 KB": (
        lambda: post("/v2/models/" + "m" * 100_000 + "/infer", b"{}"),
        431,
        "over the limit",
    ),
    "BYTES tensor of 5 MB for an FP32 input": (
        lambda: json_body(
            [tensor("features", "BYTES", [150_000, 4], ["abcd"] * 600_000), *mixed_inputs()[1:]]
        ),
        400,
        "input 'features' has datatype BYTES; the model takes FP32",
    ),
    "1.5 M numbers for a shape of 4": (
        lambda: json_body([tensor("features", "FP32", [1, 4], [0.5] * 1_500_000)]),
        400,
        "1500000 elements of data for a shape of 4",
    ),
    "70 dimensions": (
        lambda: json_body([tensor("features", "FP32", [1] * 70, [1.0])]),
        400,
        "70 dimensions",
    ),
    "shape of 2^62 rows": (
        lambda: json_body([tensor("features", "FP32", [2**62, 4], [])]),
        400,
        "0 elements of data for a shape of",
    ),
    "BYTES that are not UTF-8, binary": (
        lambda: binary_tag(b"\xff\xfe\x00ok"),
        400,
        "input 'tag': element 0 is not UTF-8",
    ),
    "BOOL byte 2": (bool_byte_two, 400, "BOOL bytes must be 0 or 1"),
    "binary_data_output 'false'": (
        lambda: json_body(mixed_inputs(), parameters={"binary_data_output": "false"}),
        400,
        "'binary_data_output' must be true or false",
    ),
    "FP32 overflow": (
        lambda: json_body([tensor("features", "FP32", [1, 4], [1e39] * 4), *mixed_inputs()[1:]]),
        400,
        "out of range for datatype FP32",
    ),
    "zero rows": (lambda: json_body(mixed_inputs(rows=0)), 200, '"shape":[0,1]'),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_gets_its_status_and_harms_nobody(
    guarded: Served, control: str, case: str
) -> None:
    make, expected, message = HOSTILE[case]
    made = make()
    if isinstance(made, tuple):  # a binary-extension body and its header length
        body, header_length = made
        raw = post(INFER, body, Inference_Header_Content_Length=str(header_length))
    elif made.startswith(b"POST "):
        raw = made
    else:
        raw = post(INFER, made)
    # A JSON body is parsed (orjson, holding the GIL) before it can be refused: 1.5 M numbers
    # take 0.1 s of CPU, which a loaded machine stretches to seconds of the probe's wait. The
    # bound adds ten times what parsing it takes here, now, as for the bounded server's bombs.
    parsing = 0.0 if isinstance(made, tuple) or made.startswith(b"POST ") else parse_seconds(made)
    with unharmed(guarded, control, probe_bound=1.0 + 10 * parsing):
        status, answer = exchange(guarded, raw)
    assert status == expected, (status, answer[:300])
    assert message.encode() in answer, answer[:300]
    if status >= 400:
        assert json.loads(answer)["error"]


def parse_seconds(body: bytes) -> float:
    """What parsing the JSON `body` holds the interpreter lock for, measured here."""
    started = time.monotonic()
    orjson.loads(body)
    return time.monotonic() - started


def sent_until_cut_off(served: Served, data: bytes) -> tuple[int, int | None]:
    """Send `data` a MiB at a time until it is all sent or the server cuts the connection
    off; (the bytes the client got sent, the answer's status or None)."""
    sent = 0
    with socket.create_connection(address(served), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < len(data):
                sent += sock.send(data[sent : sent + (1 << 20)])
        with contextlib.suppress(ConnectionResetError):
            answer = sock.recv(65536)
            return sent, int(answer.split()[1]) if answer else None
    return sent, None


def test_a_huge_header_is_cut_off_without_reading_it(guarded: Served, control: str) -> None:
    """httptools gathers a header by concatenation: 50 MB took seconds of the event loop.
    The server closes the connection at the head limit: the client cannot send more than
    what the sockets' buffers between them hold (a few MiB) past it."""
    raw = post(INFER, b"{}", X_Junk="a" * 50_000_000)
    with unharmed(guarded, control):
        sent, status = sent_until_cut_off(guarded, raw)
    assert status in (431, None)  # the answer may be lost to the reset of the unread rest
    assert sent < len(raw) // 2, f"the server read {sent >> 20} MiB of a 50 MB header"


def open_slowly(served: Served, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(address(served), timeout=5)
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: t\r\n".encode())
        socks.append(s)
    return socks


def answered_or_closed(sock: socket.socket) -> bool:
    """Whether the server has answered or closed the connection: it is readable at once."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def test_slow_clients_are_timed_out_and_do_not_hold_others_back(
    guarded: Served, control: str
) -> None:
    """200 slowloris connections, one header byte each per 0.2 s: each is answered 408 and
    closed after the read timeout, while a well-behaved client is served all along: every
    request of its is answered 200, and (however slowly the machine opened the 200) some
    before the slow connections still waiting have been answered."""
    with unharmed(guarded, control):
        socks = open_slowly(guarded, 200)
        try:
            beside = 0  # answers that came while slow connections were still waiting
            deadline = time.monotonic() + READ_TIMEOUT + 60
            with httpx.Client(timeout=30) as http:
                while (waiting := [s for s in socks if not answered_or_closed(s)]) and (
                    time.monotonic() < deadline
                ):
                    for s in waiting:
                        with contextlib.suppress(OSError):
                            s.send(b"X")
                    r = http.post(f"{guarded.url}{INFER}", content=json_body(mixed_inputs()))
                    assert r.status_code == 200, r.text
                    beside += any(not answered_or_closed(s) for s in waiting)
                    time.sleep(0.2)
            assert not waiting, f"{len(waiting)} slow connections still open after the deadline"
            assert beside > 0, "no request was answered while slow connections were open"
            closed = 0
            for s in socks:
                try:
                    data = s.recv(4096)
                except ConnectionResetError:  # closed with a header byte unread
                    data = b""
                closed += data.startswith(b"HTTP/1.1 408") or data == b""
            assert closed == len(socks), f"{len(socks) - closed} slow connections not answered 408"
        finally:
            for s in socks:
                s.close()


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Served]:
    """The guarded server's connection cap and batching, with a read timeout no test here
    outlasts: a slow connection stays open until the test closes it, however long the
    machine takes to open the others."""
    served = start_server(
        tmp_path_factory.mktemp("patient"),
        *("--model-uri", f"file://{models['mixed']}", "--model-name", "mixed"),
        env={
            "KUBEONNX_READ_TIMEOUT_S": "600",
            "KUBEONNX_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "KUBEONNX_MAX_BATCH_SIZE": "8",
            "KUBEONNX_MAX_BATCH_DELAY_MS": str(BATCH_DELAY_MS),
        },
    )
    yield served
    served.stop(signal.SIGKILL, timeout=10)


def answered_until(served: Served, expected: int, within: float = 60) -> None:
    """Send a request until it is answered `expected`: the server counts a connection once
    it has accepted it (or seen it closed), some time after the client's side is done."""
    deadline = time.monotonic() + within
    seen: list[int] = []
    with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        while time.monotonic() < deadline:
            status = http.post(f"{served.url}{INFER}", content=json_body(mixed_inputs()))
            if status.status_code == expected:
                return
            seen.append(status.status_code)
            time.sleep(0.05)
    raise AssertionError(f"never answered {expected} in {within:g}s: {seen[-5:]}")


def test_the_connection_cap_refuses_beyond_it(patient: Served) -> None:
    """A request is answered 503 once the open connections, its own included, reach
    MAX_CONNECTIONS, and served once they are one fewer: with MAX_CONNECTIONS - 1 slow
    connections open the server comes to refuse, with one of them closed it comes to serve.
    A server without the cap, or with another, never does both."""
    socks = open_slowly(patient, MAX_CONNECTIONS - 1)
    try:
        answered_until(patient, 503)
        socks.pop().close()
        answered_until(patient, 200)
    finally:
        for s in socks:
            s.close()


def test_a_stalled_upload_does_not_make_the_batcher_wait(patient: Served) -> None:
    """The batcher waits for company only for requests whose bodies are complete; one that
    never finishes its upload must not add the batch delay to everyone else's requests.
    Held for company, a request takes the delay at least, however fast the machine; served
    at once, it comes back sooner, but on a starved machine not each time: up to 50 are
    sent, while the upload stays stalled, until one does."""
    body = json_body(mixed_inputs())
    with socket.create_connection(address(patient), timeout=30) as stalled:
        stalled.sendall(post(INFER, body)[:-10])  # all but the last 10 bytes
        latencies = []
        with httpx.Client(timeout=30) as http:
            http.post(f"{patient.url}{INFER}", content=body)
            for _ in range(50):
                started = time.monotonic()
                assert http.post(f"{patient.url}{INFER}", content=body).status_code == 200
                latencies.append(time.monotonic() - started)
                if latencies[-1] < BATCH_DELAY_MS / 1000:
                    break
        stalled.sendall(post(INFER, body)[-10:])  # the upload was pending all along
        answer = stalled.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert min(latencies) < BATCH_DELAY_MS / 1000, latencies


# The same checks against a server with the default body limit (64 MiB) and image endpoints,
# for hostile bodies within that limit: JSON that inflates to tens of MB, JPEGs of hundreds
# of scans, WebPs of a few KB that decode to hundreds of MB. Memory is bounded by the
# configured limits: the JSON limit times what JSON costs as Python objects, or the decode
# budget, plus the process's own slack.

JSON_LIMIT = 2 * 1024 * 1024  # KUBEONNX_MAX_JSON_BYTES of the bounded server
DECODE_BUDGET = 256 * 1024 * 1024  # KUBEONNX_MAX_DECODE_BYTES
OBJECTS_PER_JSON_BYTE = 25  # "[]," is 3 bytes of JSON and 64 of Python list and pointer
# One decode's objects, and as much again of the one before that the allocator may keep
# (fragmented), plus the process's slack.
SLACK = 64 * 1024 * 1024
JSON_PEAK = 2 * OBJECTS_PER_JSON_BYTE * JSON_LIMIT + SLACK
CLASSIFY = "/v2/models/classifier/predict"


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Served]:
    processing = {"input": {"image": {"size": [32, 32]}}}
    served = start_server(
        tmp_path_factory.mktemp("bounded"),
        *("--model-uri", f"file://{models['convnet']}", "--model-name", "classifier"),
        env={
            "KUBEONNX_MAX_JSON_BYTES": str(JSON_LIMIT),
            "KUBEONNX_MAX_DECODE_BYTES": str(DECODE_BUDGET),
            "KUBEONNX_PROCESSING": json.dumps(processing),
        },
    )
    yield served
    served.stop(signal.SIGKILL, timeout=10)


def zeros_json(values: int) -> bytes:
    """A convnet request of `values` zeros: 2 bytes of JSON each."""
    rows = values // (3 * 32 * 32)
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[%d,3,32,32],"data":[' % rows
    return head + b"0," * (rows * 3 * 32 * 32 - 1) + b"0]}]}"


def json_decode_seconds(body: bytes) -> float:
    """What decoding `body` holds the interpreter lock for, measured here: orjson, then numpy."""
    started = time.monotonic()
    np.asarray(orjson.loads(body)["inputs"][0]["data"], dtype=np.float32)
    return time.monotonic() - started


def test_a_gzip_json_bomb_within_the_body_limit_harms_nobody(bounded: Served, control: str) -> None:
    """60 KB of gzip that inflates to 64 MB of JSON (within the 64 MiB body limit): refused
    once it inflates past the JSON limit. The probe is answered within 1 s plus ten times
    what the largest JSON the server will parse takes to decode here, and RSS peaks below
    the JSON limit's worth of Python objects."""
    bomb = gzip.compress(zeros_json(32 * 1024 * 1024 - 3072), 9)
    assert len(bomb) < 100_000
    probe_bound = 1.0 + 10 * json_decode_seconds(zeros_json(JSON_LIMIT // 2))
    with unharmed(bounded, control, peak=JSON_PEAK, probe_bound=probe_bound):
        status, answer = exchange(
            bounded, post("/v2/models/classifier/infer", bomb, Content_Encoding="gzip"), 60
        )
    assert status == 413, answer[:300]
    assert b"over the limit of 2097152 bytes (--max-json-bytes)" in answer


def empty_lists_json(size: int) -> bytes:
    """About `size` bytes of JSON that cost the most as Python objects: empty lists."""
    count = (size - 100) // 3
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[%d,0],"data":[' % count
    return head + b"[]," * (count - 1) + b"[]]}]}"


def test_the_largest_json_the_server_decodes_four_at_once_harms_nobody(
    bounded: Served, control: str
) -> None:
    """Four bodies just under the JSON limit, of the costliest kinds, sent at once: a million
    numbers (the last out of range) and 700,000 empty lists (refused for their shape). The
    lists' allocation set off the garbage collector's passes over the whole heap, 1.8 s of
    them holding the GIL. Each is decoded, one at a time, within the same bounds."""
    # The numbers end in one out of range for FP32: all are converted, then refused.
    numbers = zeros_json(JSON_LIMIT // 2 - 4096).replace(b"0]}]}", b"1e39]}]}")
    bodies = [numbers, empty_lists_json(JSON_LIMIT - 64)] * 2
    assert all(JSON_LIMIT - 8192 < len(b) <= JSON_LIMIT for b in bodies)
    probe_bound = 1.0 + 10 * json_decode_seconds(zeros_json(JSON_LIMIT // 2))
    url = f"{bounded.url}/v2/models/classifier/infer"
    with (
        unharmed(bounded, control, peak=JSON_PEAK, probe_bound=probe_bound),
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        answers = list(pool.map(lambda b: httpx.post(url, content=b, timeout=60), bodies))
    assert [a.status_code for a in answers] == [400] * 4, [a.text[:200] for a in answers]
    assert all("out of range for datatype FP32" in a.json()["error"] for a in answers[::2])
    assert all(", 0]; the model takes" in a.json()["error"] for a in answers[1::2])


IMAGE_BOMBS: dict[str, tuple[Callable[[], httpx.Request], int, str]] = {
    "a JPEG of 300 scans (each a pass over the image)": (
        lambda: httpx.Request("POST", CLASSIFY, content=scan_bomb(1024)),
        400,
        "the image is a JPEG of 300 scans, over the limit of 32",
    ),
    "eight 1.4 KB WebPs of 6000x6000, each over the decode budget": (
        lambda: httpx.Request("POST", CLASSIFY + "/batch", files=files(*[webp_bomb(6000)] * 8)),
        400,
        "MiB to decode, over the limit of 256 MiB",
    ),
    "eight 3000x3000 WebPs of 500 bytes, decoded in turn within the budget": (
        lambda: httpx.Request("POST", CLASSIFY + "/batch", files=files(*[webp_bomb(3000)] * 8)),
        200,
        '"image":7',
    ),
}


@pytest.mark.parametrize("case", list(IMAGE_BOMBS))
def test_an_image_bomb_gets_its_status_and_harms_nobody(
    bounded: Served, control: str, case: str
) -> None:
    make, expected, message = IMAGE_BOMBS[case]
    request = make()
    head = f"POST {request.url.path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k != "host")
    raw = head.encode() + b"\r\n" + request.read()
    with unharmed(bounded, control, peak=DECODE_BUDGET + SLACK, probe_bound=1.0):
        status, answer = exchange(bounded, raw, 120)
    assert status == expected, answer[:300]
    assert message.encode() in answer, answer[:300]


# Callback URL forms, sent to an asynchronous gateway (a real redis-server holds its queue and
# its quota counters) in the Kubeonnx-Callback-Url header of a submission, as raw bytes (CR,
# LF and UTF-8 travel as a client could send them). Each is refused 400 with a message, is
# never charged, and harms nobody (the same probe and RSS bounds as above). The allowlist has
# every form an entry takes: a host, a wildcard domain, an IP with a port, a CIDR with any
# port, an IPv6 address with a port.

CALLBACK_HOSTS = ["hooks.example.com", "*.example.org", "127.0.0.1:9", "10.0.0.0/8:*", "[::1]:8080"]
ASYNC_INFER = "/v2/models/mlp/async-infer"
ASYNC_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
).encode()
TENANT_KEY = "acme-key"


@pytest.fixture(scope="module")
def callback_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from e2e.redis_server import LocalRedis
    from tests.runtime.test_async import async_env
    from tests.runtime.test_quota_redis import write_policy

    store = LocalRedis().start()
    tmp = tmp_path_factory.mktemp("callbacks")
    limits = {"acme": [{"unit": "requests", "limit": 100_000, "window": "1d"}]}
    config = write_policy(tmp, store.url, limits, decisionBudgetMs=10000)
    env = async_env(
        store.url,
        KUBEONNX_QUOTA_CONFIG=str(config),
        KUBEONNX_ASYNC_CALLBACK_HOSTS=",".join(CALLBACK_HOSTS),
        KUBEONNX_ASYNC_MAX_QUEUED="100000",
    )
    args = ("--role", "gateway", "--model-name", "mlp", "--model-uri", "file:///none")
    try:
        served = start_server(tmp, *args, env=env)
        yield served
        served.stop(signal.SIGKILL, timeout=10)
    finally:
        store.stop()


def charged(served: Served) -> int:
    """What the tenant has used today, as GET /v2/quota answers it."""
    answer = httpx.get(f"{served.url}/v2/quota", headers={"X-Api-Key": TENANT_KEY}, timeout=30)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["limits"][0]["used"])


def submit_with_callback(served: Served, url: str) -> tuple[int | None, bytes]:
    raw = post(
        ASYNC_INFER, ASYNC_BODY, X_Api_Key=TENANT_KEY, Connection="close", Kubeonnx_Callback_Url=url
    )
    return exchange(served, raw, 30)


# (the URL, a fragment of the refusal's message)
HOSTILE_CALLBACKS: dict[str, tuple[str, str]] = {
    "userinfo: an allowed host before @": ("http://hooks.example.com@evil.test/", "not allowed"),
    "userinfo: an allowed host and port before @": (
        "http://hooks.example.com:80@evil.test/",
        "not allowed",
    ),
    "userinfo: a backslash before @": ("http://hooks.example.com\\@evil.test/", "not allowed"),
    "userinfo: %2F before @": ("http://hooks.example.com%2F@evil.test/", "not allowed"),
    "userinfo: an allowed IP and port before @": ("http://127.0.0.1:9@evil.test/", "not allowed"),
    "fragment that names an allowed domain": ("http://evil.test#.example.org/", "not allowed"),
    "IPv6 with a zone": ("http://[fe80::1%25eth0]/", "not allowed"),
    "IPv4-mapped IPv6 of an allowed IP": ("http://[::ffff:127.0.0.1]:9/", "not allowed"),
    "IPv4-mapped IPv6, hex": ("http://[::ffff:7f00:1]:9/", "not allowed"),
    "hex IP": ("http://0x7f.1:9/", "not allowed"),
    "hex IP, one number": ("http://0x7f000001:9/", "not allowed"),
    "decimal IP": ("http://2130706433:9/", "not allowed"),
    "octal IP": ("http://0177.0.0.1:9/", "not a valid URL"),
    "short IP": ("http://127.1:9/", "not allowed"),
    "an allowed IP as a subdomain": ("http://10.0.0.1.evil.test/", "not allowed"),
    "port 0": ("http://hooks.example.com:0/", "port 0"),
    "port 65536": ("http://hooks.example.com:65536/", "not a valid URL"),
    "port +80": ("http://hooks.example.com:+80/", "not a valid URL"),
    "port -1": ("http://hooks.example.com:-1/", "not a valid URL"),
    "port 80a": ("http://hooks.example.com:80a/", "not a valid URL"),
    "two ports": ("http://hooks.example.com:80:80/", "not a valid URL"),
    "a port that is a host": ("http://127.0.0.1:9.evil.test/", "not a valid URL"),
    "a port not listed": ("http://hooks.example.com:8080/", "port 8080"),
    "a tab in the host": ("http://hooks\texample.com/", "not a valid URL"),
    "ideographic full stops": ("http://hooks\u3002example\u3002com/", "not a valid URL"),
    "a full-width full stop": ("http://hooks\uff0eexample.com/", "not a valid URL"),
    "a full-width letter": ("http://\uff48ooks.example.com/", "not a valid URL"),
    "an empty A-label under a wildcard": ("http://xn--.example.org/", "not a valid URL"),
    "an invalid A-label under a wildcard": ("http://xn--a.example.org/", "not a valid URL"),
    "an empty label under a wildcard": ("http://a..example.org/", "not a valid URL"),
    "a label starting with '-' under a wildcard": ("http://-a.example.org/", "not a valid URL"),
    "a 64-character label under a wildcard": (f"http://{'a' * 64}.example.org/", "not a valid"),
    "a 400-character host under a wildcard": (f"http://{'a.' * 200}example.org/", "not a valid"),
    "a 10,000-character host": (f"http://{'a' * 10_000}.example.org/", "not a valid URL"),
    "http://[": ("http://[", "not a valid URL"),
    "http://[::1": ("http://[::1", "not a valid URL"),
    "http://]/": ("http://]/", "not a valid URL"),
    "ftp": ("ftp://hooks.example.com/", "must be an http or https URL"),
    "file": ("file:///etc/passwd", "must be an http or https URL"),
    "gopher": ("gopher://hooks.example.com/", "must be an http or https URL"),
    "javascript": ("javascript:alert(1)", "must be an http or https URL"),
    "no scheme": ("//hooks.example.com/", "must be an http or https URL"),
    "a bare host": ("hooks.example.com", "must be an http or https URL"),
    "empty host": ("http:///hook", "must be an http or https URL"),
    "empty host with a port": ("http://:80/", "must be an http or https URL"),
    "nothing after the scheme": ("http://", "must be an http or https URL"),
    "a trailing dot": ("http://hooks.example.com./", "not a valid URL"),
    "two trailing dots": ("http://hooks.example.com../", "not a valid URL"),
    "a trailing dot and a port": ("http://hooks.example.com.:80/", "not a valid URL"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CALLBACKS))
def test_a_hostile_callback_url_is_refused_uncharged_and_harms_nobody(
    callback_gateway: Served, control: str, case: str
) -> None:
    url, message = HOSTILE_CALLBACKS[case]
    before = charged(callback_gateway)
    with unharmed(callback_gateway, control):
        status, answer = submit_with_callback(callback_gateway, url)
    assert status == 400, (status, answer[:300])
    error = json.loads(answer)["error"]
    assert message in error, error
    assert "hooks.example.com," not in error  # the refusal does not list the allowlist
    assert charged(callback_gateway) == before


@pytest.mark.parametrize(
    "line",
    [
        b"http://hooks.example.com\r\n/",  # CR LF: the header ends, "/" is a malformed line
        b"http://hooks.example.com\n/",
        b"http://hooks.example.com/\rX: y",
        b"http://hooks.example.com/\x00",
    ],
)
def test_a_callback_header_with_control_characters_is_a_4xx(
    callback_gateway: Served, control: str, line: bytes
) -> None:
    """CR, LF and NUL in the header: the HTTP parser refuses the request (400), or the
    callback check does; never 5xx, never charged."""
    before = charged(callback_gateway)
    raw = post(ASYNC_INFER, ASYNC_BODY, X_Api_Key=TENANT_KEY, Connection="close").replace(
        b"\r\n\r\n", b"\r\nKubeonnx-Callback-Url: " + line + b"\r\n\r\n", 1
    )
    with unharmed(callback_gateway, control):
        status, answer = exchange(callback_gateway, raw, 30)
    assert status is not None and 400 <= status < 500, (status, answer[:300])
    assert charged(callback_gateway) == before


def allowed_by_the_list(url: str) -> bool:
    """Whether the HTTP client would call a host and port the allowlist names, computed
    apart from the runtime's check: httpx's own reading of the URL, matched by hand."""
    import ipaddress

    try:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port
    except (httpx.InvalidURL, ValueError):
        return False
    if parsed.scheme not in ("http", "https") or not host:
        return False
    port = port or (80 if parsed.scheme == "http" else 443)
    default = port == (80 if parsed.scheme == "http" else 443)
    if host in ("hooks.example.com",) or host.endswith(".example.org"):
        return default
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (
        (str(ip) == "127.0.0.1" and port == 9)
        or (ip.version == 4 and ip in ipaddress.ip_network("10.0.0.0/8"))
        or (str(ip) == "::1" and port == 8080)
    )


URL_PARTS = {
    "scheme": ["http://", "https://", "HTTP://", "ftp://", "//", "http:/", "http:\\\\", ""],
    "userinfo": ["", "hooks.example.com@", "evil.test\\@", "a%2F@", "u:p@", "@", "127.0.0.1:9@"],
    "host": [
        "hooks.example.com",
        "a.example.org",
        "evil.test",
        "127.0.0.1",
        "10.1.2.3",
        "[::1]",
        "[fe80::1%25eth0]",
        "[::ffff:127.0.0.1]",
        "0x7f.1",
        "2130706433",
        "017700000001",
        "xn--.example.org",
        "xn--a.example.org",
        "hooks\u3002example.com",
        "\uff48ooks.example.com",
        "hooks.example.com.",
        "[",
        "",
        "a" * 300 + ".example.org",
    ],
    "port": ["", ":0", ":9", ":80", ":443", ":8080", ":65536", ":+80", ":*", ":-1", ":"],
    "rest": ["", "/", "/hook?x=1", "#@evil.test", "?@evil.test", "\\@evil.test", "/%0d%0a"],
}
callback_urls = st.one_of(
    st.tuples(*(st.sampled_from(parts) for parts in URL_PARTS.values())).map("".join),
    st.text(
        st.characters(blacklist_categories=("Cs", "Cc")), max_size=60
    ),  # anything a header may carry
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(url=callback_urls)
def test_any_callback_url_is_a_4xx_or_an_allowed_host_and_only_those_are_charged(
    callback_gateway: Served, control: str, url: str
) -> None:
    """A 202 only where the client would call a host and port the allowlist names; every
    other URL a 400 with a message, uncharged."""
    url = url.strip()  # the HTTP parser strips a header value's surrounding blanks
    before = charged(callback_gateway)
    with unharmed(callback_gateway, control):
        status, answer = submit_with_callback(callback_gateway, url)
    # The runtime reads header values as latin-1, whatever bytes the client sent.
    read = url.encode().decode("latin-1")
    if not url:  # an empty header: no callback at all
        assert status == 202, (status, answer[:300])
        assert charged(callback_gateway) == before + 1
        return
    assert status in (202, 400), (url, status, answer[:300])
    event(f"answered {status}")  # --hypothesis-show-statistics: how many were allowed
    if status == 202:
        assert allowed_by_the_list(read), url
        assert charged(callback_gateway) == before + 1
    else:
        assert json.loads(answer)["error"], answer[:300]
        assert charged(callback_gateway) == before
