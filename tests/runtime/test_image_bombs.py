"""Image bombs within the pixel limit, against the real server: a JPEG of hundreds of scans is
refused from its header; decodes share a memory budget (KUBEONNX_MAX_DECODE_BYTES); a batch
that failed, or whose client left, decodes nothing more; an over-quota upload is refused
before anything is decoded."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from kubeonnx_runtime.images import DecodeBudget
from kubeonnx_runtime.quota import key_hash
from PIL import Image

from e2e.generate_images import scene
from tests.runtime.conftest import Served, start_server

MAX_DECODE = 320 * 1024 * 1024  # KUBEONNX_MAX_DECODE_BYTES of the server below
SLACK = 64 * 1024 * 1024  # the process's own growth: bodies, Python objects, allocator
PROCESSING = {
    "input": {"image": {"size": [32, 32]}},
    "output": {"classification": {"topK": 1}},
}


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG segment; a scan's entropy-coded data belongs to its
    SOS segment."""
    segments, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            segments.append((marker, pos, pos + 2))
            break
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not
            while True:  # a stuffed 0xFF00 or a restart marker
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        segments.append((marker, pos, end))
        pos = end
    return segments


def progressive_jpeg(side: int = 512) -> bytes:
    out = io.BytesIO()
    scene(side, side, seed=7).save(out, "JPEG", progressive=True, quality=40)
    return out.getvalue()


def scan_bomb(side: int = 512, scans: int = 300) -> bytes:
    """A progressive JPEG whose last scan (a refinement of every luma block, the costliest
    pass) is repeated until it has `scans` scans: libjpeg decodes it, warning only, and each
    repeat is a pass over the whole image."""
    data = progressive_jpeg(side)
    segments = jpeg_segments(data)
    sos = [s for s in segments if s[0] == 0xDA]
    _, start, end = sos[-1]
    eoi = segments[-1][1]
    return data[:eoi] + data[start:end] * (scans - len(sos)) + data[eoi:]


def webp_bomb(side: int) -> bytes:
    """A lossless WebP of side x side pixels of one colour: about 1.4 KB for 6000 x 6000."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 90)).save(out, "WEBP", lossless=True)
    return out.getvalue()


def truncated_png() -> bytes:
    out = io.BytesIO()
    scene(256, 256, seed=3).save(out, "PNG")
    return out.getvalue()[:2000]  # a header that opens, pixels that end early


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


@contextlib.contextmanager
def peak_growth(served: Served) -> Iterator[Callable[[], int]]:
    """How far the server's RSS peaked above where it was at the start (Linux resets the
    peak, VmHWM, on writing 5 to clear_refs)."""
    pid = served.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _status(pid, "VmRSS")
    peak: list[int] = []
    yield lambda: peak[0]
    peak.append(_status(pid, "VmHWM") - before)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def cpu_until_idle(served: Served, work: Callable[[], None]) -> float:
    """CPU seconds the server spends on `work`, counted until it has stopped spending any
    (decodes left running after the answer count too)."""
    pid = served.proc.pid
    start = cpu_seconds(pid)
    work()
    last, deadline = cpu_seconds(pid), time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - last < 0.03:
            return now - start
        last = now
    raise AssertionError("the server did not go idle within 120 s")


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f"i{i}", data)) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def bombed(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Served]:
    """An image server with a 320 MiB decode budget; tenant 'tight' may send one image a
    minute, keyless callers plenty."""
    tmp = tmp_path_factory.mktemp("bombs")
    policy = {
        "policy": "bombs",
        "namespace": "tests",
        "tenants": [
            {
                "name": "tight",
                "keySha256": [key_hash("tight-key")],
                "limits": [{"unit": "rows", "limit": 1, "window": "1m"}],
            }
        ],
        "defaultTenant": {"limits": [{"unit": "requests", "limit": 100000, "window": "1m"}]},
    }
    (tmp / "quota.json").write_text(json.dumps(policy))
    served = start_server(
        tmp,
        *("--model-uri", f"file://{models['convnet']}", "--model-name", "classifier"),
        env={
            "KUBEONNX_PROCESSING": json.dumps(PROCESSING),
            "KUBEONNX_MAX_DECODE_BYTES": str(MAX_DECODE),
            "KUBEONNX_QUOTA_CONFIG": str(tmp / "quota.json"),
        },
    )
    yield served
    served.stop()


def predict(served: Served, batch: bool = False) -> str:
    return f"{served.url}/v2/models/classifier/predict" + ("/batch" if batch else "")


def test_a_jpeg_of_many_scans_is_refused_from_its_header(bombed: Served) -> None:
    assert jpeg_segments(scan_bomb()).count  # the bomb parses as a JPEG
    r = httpx.post(predict(bombed), content=scan_bomb(), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "the image is a JPEG of 300 scans, over the limit of 32"
    # An ordinary progressive JPEG (libjpeg's 10 scans) is served.
    assert httpx.post(predict(bombed), content=progressive_jpeg(), timeout=60).status_code == 200


def test_a_jpeg_header_of_millions_of_markers_is_refused_before_pillow_reads_it(
    bombed: Served,
) -> None:
    """Two million empty comments (8 MB) ahead of a 16x16 picture took Pillow 2.3 s of CPU
    to open, a marker at a time; the body limit allows eight times as many."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "JPEG")
    plain = out.getvalue()
    bomb = plain[:2] + b"\xff\xfe\x00\x02" * 2_000_000 + plain[2:]
    one = cpu_until_idle(bombed, lambda: None)  # the idle server's own
    answers: list[httpx.Response] = []
    spent = cpu_until_idle(
        bombed, lambda: answers.append(httpx.post(predict(bombed), content=bomb, timeout=60))
    )
    assert answers[0].status_code == 400, answers[0].text
    assert answers[0].json()["error"] == (
        "the image is a JPEG with more than 65536 marker bytes (0xFF) before its first scan"
    )
    assert spent < one + 1.0, f"the server spent {spent:.1f} s of CPU"
    assert httpx.post(predict(bombed), content=plain).status_code == 200


def test_decodes_share_the_memory_budget(bombed: Served) -> None:
    """Eight 4000x4000 lossless WebPs of a few KB: each decode holds about 290 MB, so only
    one fits the budget at a time, and the process never holds more than the budget."""
    bomb = webp_bomb(4000)
    assert len(bomb) < 10_000
    with peak_growth(bombed) as grown:
        r = httpx.post(predict(bombed, batch=True), files=files(*[bomb] * 8), timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 8
    assert grown() < MAX_DECODE + SLACK, f"RSS peaked {grown() >> 20} MiB above its start"


def test_an_image_that_needs_more_than_the_budget_is_refused(bombed: Served) -> None:
    with peak_growth(bombed) as grown:
        r = httpx.post(predict(bombed), content=webp_bomb(6000), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("the image needs about ")
    assert r.json()["error"].endswith(" MiB to decode, over the limit of 320 MiB")
    assert grown() < SLACK


def test_a_failed_batch_and_a_client_that_left_decode_nothing_more(bombed: Served) -> None:
    """A batch whose first image fails to decode, and a batch whose client hangs up once it
    has sent it, cost about one big decode each (the one that may have started alongside),
    not the seven or eight the batch holds."""
    bomb = webp_bomb(4000)
    one = cpu_until_idle(
        bombed,
        lambda: httpx.post(predict(bombed), content=bomb, timeout=60).raise_for_status(),
    )

    def failing() -> None:
        r = httpx.post(
            predict(bombed, batch=True), files=files(truncated_png(), *[bomb] * 7), timeout=120
        )
        assert r.status_code == 400 and "files[0]" in r.json()["error"], r.text

    def hanging_up() -> None:
        request = httpx.Request("POST", predict(bombed, batch=True), files=files(*[bomb] * 8))
        head = "POST /v2/models/classifier/predict/batch HTTP/1.1\r\nHost: t\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k != "host")
        host, port = bombed.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + b"\r\n" + request.read())
            time.sleep(0.3)  # the server has the body; the client goes

    assert one > 0
    assert cpu_until_idle(bombed, failing) < 3 * one
    assert cpu_until_idle(bombed, hanging_up) < 3 * one


def test_an_over_quota_upload_is_refused_before_it_is_decoded(bombed: Served) -> None:
    key = {"X-Api-Key": "tight-key"}
    tiny = np.zeros((8, 8, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(tiny).save(out, "PNG")
    assert httpx.post(predict(bombed), content=out.getvalue(), headers=key).status_code == 200
    # The window's one row is used: a bomb is refused for now, four at once for ever (the
    # tenant's whole limit is one row a minute), both before any decoding.
    with peak_growth(bombed) as grown:
        r = httpx.post(predict(bombed), content=webp_bomb(4000), headers=key, timeout=60)
    assert r.status_code == 429, r.text
    assert grown() < SLACK, f"RSS peaked {grown() >> 20} MiB above its start"
    with peak_growth(bombed) as grown:
        r = httpx.post(
            predict(bombed, batch=True),
            files=files(*[webp_bomb(4000)] * 4),
            headers=key,
            timeout=60,
        )
    assert r.status_code == 413 and "can never be admitted" in r.json()["error"], r.text
    assert grown() < SLACK, f"RSS peaked {grown() >> 20} MiB above its start"


def test_the_decode_budget_is_first_come_first_served_and_frees_what_is_cancelled() -> None:
    async def scenario() -> None:
        budget = DecodeBudget(100)
        await budget.acquire(60)
        big = asyncio.ensure_future(budget.acquire(60))  # does not fit: waits
        small = asyncio.ensure_future(budget.acquire(10))  # fits, but does not overtake
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        big.cancel()
        await asyncio.wait_for(small, 1)  # granted once the one ahead of it gave up
        assert big.cancelled()
        assert budget.held == 70
        budget.release(60)
        budget.release(10)
        assert budget.held == 0
        await asyncio.wait_for(budget.acquire(100), 1)  # all of it, once free

    asyncio.run(scenario())
