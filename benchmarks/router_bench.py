"""The router's overhead: the runtime called directly against the router in front of it, in
one run.

    .venv/bin/python benchmarks/router_bench.py [--seconds 10]

The model is `mlp` with one intra-op thread; the runtime is pinned to CPU 0, the router
(`kubeonnx serve --role router`, one version of weight 1) to CPU 1, and wrk (one thread) to
CPU 1 as well: on a two-CPU machine the router shares its CPU with the load generator, so
the ratio is a lower bound of what a router with a CPU of its own gives.
Reported: requests/s at 64 connections direct and through the router (the ratio), and p50
at 1 connection direct and through the router (the difference: the router's added p50).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from runtime_bench import run_wrk  # noqa: E402

from e2e.cluster import free_port  # noqa: E402
from e2e.generate_models import generate  # noqa: E402
from e2e.serving import wait_serving  # noqa: E402

BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-router-bench-"))
    model = generate(work / "models", ["mlp"])["mlp"]
    (work / "body").write_bytes(BODY)
    script = work / "post.lua"
    script.write_text(
        f'local f = io.open("{work / "body"}", "rb"); wrk.body = f:read("*a"); f:close()\n'
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
    )
    common = {
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_LOG_LEVEL": "warning",
        "KUBEONNX_CACHE_DIR": str(work / "cache"),
        "KUBEONNX_TERMINATION_LOG": str(work / "termination-log"),
    }
    runtime_port, router_port = free_port(), free_port()
    config = work / "router.json"
    config.write_text(
        json.dumps(
            {"versions": [{"name": "1", "url": f"http://127.0.0.1:{runtime_port}", "weight": 1}]}
        )
    )
    procs = [
        start(
            "0",
            {
                **common,
                "KUBEONNX_MODEL_URI": f"file://{model}",
                "KUBEONNX_MODEL_NAME": "mlp",
                "KUBEONNX_THREADS": "1",
            },
            runtime_port,
        )
    ]
    try:
        procs.append(
            start(
                "1",
                {**common, "KUBEONNX_ROLE": "router", "KUBEONNX_ROUTER_CONFIG": str(config)},
                router_port,
            )
        )
        results = {}
        for name, port in (("direct", runtime_port), ("router", router_port)):
            url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
            run_wrk(url, script, 4, 1)  # warm
            rps = run_wrk(url, script, 64, args.seconds)[0]
            p50 = run_wrk(url, script, 1, args.seconds)[1]
            results[name] = (rps, p50)
        (d_rps, d_p50), (r_rps, r_p50) = results["direct"], results["router"]
        print(
            f"c64 requests/s: direct {d_rps:.0f}, through the router {r_rps:.0f}, "
            f"ratio {r_rps / d_rps:.2f}"
        )
        print(
            f"c1 p50 ms: direct {d_p50:.3f}, through the router {r_p50:.3f}, "
            f"added {r_p50 - d_p50:.3f}"
        )
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    main()
