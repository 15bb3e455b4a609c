"""Asynchronous inference: how fast a replica drains the queue, against the same server's
synchronous requests/s, in one run.

    .venv/bin/python benchmarks/async_bench.py [--seconds 10] [--out FILE.md]

A real redis-server on loopback. The model is `mlp` with batching (32) and one intra-op
thread; the model's server is pinned to CPU 0, wrk (one thread) and the gateway to CPU 1.
1. sync: wrk at 16 connections on /infer for --seconds: requests/s.
2. submit: wrk at 16 connections on the gateway's /async-infer for --seconds, with no
   consumer running: submissions/s, and the queue they leave.
3. drain: the model's server starts (after its start-up) and consumes the queue; the time
   from its first answer to the last gives answers/s.
Reported: the three rates, and drain / sync.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from runtime_bench import run_wrk  # noqa: E402

from e2e.cluster import free_port  # noqa: E402
from e2e.generate_models import generate  # noqa: E402
from e2e.redis_server import LocalRedis  # noqa: E402
from e2e.serving import wait_serving  # noqa: E402

BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
PREFIX = "kubeonnx:{bench/mlp}"


def start(cpus: str, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, kubeonnx, "serve"],
        env={**os.environ, **env, "KUBEONNX_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_serving(f"http://127.0.0.1:{port}/v2/health/ready", proc, 60, what="kubeonnx serve")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-async-bench-"))
    model = generate(work / "models", ["mlp"])["mlp"]
    (work / "body").write_bytes(BODY)
    script = work / "post.lua"
    script.write_text(
        f'local f = io.open("{work / "body"}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    redis = LocalRedis().start()
    client = redis.client()
    env = {
        "KUBEONNX_MODEL_URI": f"file://{model}",
        "KUBEONNX_MODEL_NAME": "mlp",
        "KUBEONNX_THREADS": "1",
        "KUBEONNX_MAX_BATCH_SIZE": "32",
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_LOG_LEVEL": "warning",
        "KUBEONNX_CACHE_DIR": str(work / "cache"),
        "KUBEONNX_TERMINATION_LOG": str(work / "term"),
        "KUBEONNX_ASYNC_REDIS_URL": redis.url,
        "KUBEONNX_ASYNC_PREFIX": PREFIX,
        "KUBEONNX_ASYNC_MAX_QUEUED": "10000000",
    }
    try:
        # 1. synchronous, on a server whose queue is empty
        port = free_port()
        server = start("0", env, port)
        url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
        run_wrk(url, script, 4, 1)
        sync_rps = run_wrk(url, script, 16, args.seconds)[0]
        stop(server)

        # 2. submissions at the gateway, nothing consuming
        port = free_port()
        gateway = start("1", {**env, "KUBEONNX_ROLE": "gateway"}, port)
        submit_rps = run_wrk(
            f"http://127.0.0.1:{port}/v2/models/mlp/async-infer", script, 16, args.seconds
        )[0]
        stop(gateway)
        queued = client.xlen(f"{PREFIX}:requests")

        # 3. a replica drains the queue
        completed = f"{PREFIX}:completed"
        server = start("0", env, free_port())
        while not int(client.get(completed) or 0):
            time.sleep(0.001)
        first, began = int(client.get(completed) or 0), time.monotonic()
        while int(client.get(completed) or 0) < queued:
            time.sleep(0.01)
        drain_rps = (queued - first) / (time.monotonic() - began)
        stop(server)
    finally:
        redis.stop()
    lines = [
        "| what | per second |",
        "|---|---|",
        f"| synchronous /infer, 16 connections | {sync_rps:,.0f} requests |",
        f"| /async-infer at the gateway, nothing consuming | {submit_rps:,.0f} submissions |",
        f"| one replica draining {queued:,} queued requests | {drain_rps:,.0f} answers |",
        f"| drain / sync | {drain_rps / sync_rps:.2f}x |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
