"""The router role with real processes: `kubeonnx serve` runtimes serving the same model as
versions 1, 2 and 3 (each answer names its version), and `kubeonnx serve --role router` in
front of them."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
            deadline = time.monotonic() + 60
            while metric(router.url, "kubeonnx_router_mirrors_total", outcome="sent") < 20:
                assert time.monotonic() < deadline
                time.sleep(0.1)
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
