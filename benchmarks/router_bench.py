"""The router's overhead: the runtime called directly against the router in front of it, in
one run.

    .venv/bin/python benchmarks/router_bench.py [--seconds 10] [--rounds 1]

The model is `mlp` with one intra-op thread; the runtime is pinned to CPU 0, the router
(`kubeonnx serve --role router`, one version of weight 1) to CPU 1, and wrk (one thread) to
CPU 1 as well: on a two-CPU machine the router shares its CPU with the load generator, so
the ratio is a lower bound of what a router with a CPU of its own gives.
Reported: requests/s at 64 connections direct and through the router (the ratio), and p50
at 1 connection direct and through the router (the difference: the router's added p50),
and the CPU time each process spent per request at 64 connections, for each round and the
median over the rounds (`--rounds N`: a noisy machine changes between rounds; in a round
each measure through the router is taken right after the same measure direct).

    .venv/bin/python benchmarks/router_bench.py --profile /tmp/router.prof

runs the router under cProfile (CPU time, the load alone) at 64 connections instead, and
prints where its time goes: the busiest functions, then the share of each part.

    .venv/bin/python benchmarks/router_bench.py --frozen-mirror [--seconds 10] [--rounds 3]

measures what a mirror frozen with SIGSTOP costs the clients: p99 at 16 connections through
a router without a mirror, then through a second router that copies every request to a
runtime frozen for the whole measure, each right after the other in every round (the goal:
the mirrored p99 at most twice the unmirrored).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from procstat import cpu_seconds  # noqa: E402
from runtime_bench import run_wrk  # noqa: E402

from e2e.cluster import free_port  # noqa: E402
from e2e.generate_models import generate  # noqa: E402
from e2e.serving import wait_serving  # noqa: E402

BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'

PROFILED = """
import cProfile, runpy, signal, sys, time
sys.argv = [{script!r}, *sys.argv[1:]]
profiler = cProfile.Profile(time.process_time)
signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())  # the load starts
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    profiler.disable()
    profiler.dump_stats({out!r})
"""


def start(
    cpus: str, env: dict[str, str], port: int, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
    # CPU time, not wall time: on a loaded machine the wall clock charges other processes'
    # time slices to whichever function was running when the router was preempted.
    python = ["-c", PROFILED.format(out=str(profile), script=kubeonnx)] if profile else [kubeonnx]
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, sys.executable, *python, "serve"],
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
    parser.add_argument("--rounds", type=int, default=1, help="direct then router, N times")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the router under cProfile, write its stats here, and print the top entries",
    )
    parser.add_argument(
        "--frozen-mirror",
        action="store_true",
        help="p99 through a router whose mirror target is frozen, against one without a mirror",
    )
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
        router_env = {**common, "KUBEONNX_ROLE": "router", "KUBEONNX_ROUTER_CONFIG": str(config)}
        procs.append(start("1", router_env, router_port, args.profile))
        if args.profile:
            profile(procs.pop(), router_port, script, args)
            return
        if args.frozen_mirror:
            frozen_mirror(procs, common, model, runtime_port, router_port, work, script, args)
            return
        ratios, added, router_us = [], [], []
        for n in range(args.rounds):
            urls = {
                name: f"http://127.0.0.1:{port}/v2/models/mlp/infer"
                for name, port in (("direct", runtime_port), ("router", router_port))
            }
            # Each measure of the router right after the same of the direct path: the
            # machine's load drifts less between the two.
            c64 = {}
            for name, url in urls.items():
                run_wrk(url, script, 4, 1)  # warm
                cpu = [cpu_seconds(p.pid) for p in procs]
                rps, _, _, total, _ = run_wrk(url, script, 64, args.seconds)
                used = [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu, strict=True)]
                c64[name] = (rps, [u / total * 1e6 for u in used])
            c1 = {name: run_wrk(url, script, 1, args.seconds)[1] for name, url in urls.items()}
            (d_rps, d_us), (r_rps, r_us) = c64["direct"], c64["router"]
            d_p50, r_p50 = c1["direct"], c1["router"]
            ratios.append(r_rps / d_rps)
            added.append(r_p50 - d_p50)
            router_us.append(r_us[1])
            print(
                f"round {n + 1}: c64 requests/s: direct {d_rps:.0f}, through the router "
                f"{r_rps:.0f}, ratio {ratios[-1]:.2f}; c1 p50 ms: direct {d_p50:.3f}, "
                f"through the router {r_p50:.3f}, added {added[-1]:.3f}; CPU per request at "
                f"c64: runtime {d_us[0]:.0f} us direct, {r_us[0]:.0f} us behind the router, "
                f"router {r_us[1]:.0f} us",
                flush=True,
            )
        print(
            f"median of {args.rounds}: c64 ratio {statistics.median(ratios):.2f}, "
            f"c1 added p50 {statistics.median(added):.3f} ms, "
            f"router CPU per request {statistics.median(router_us):.0f} us"
        )
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def frozen_mirror(
    procs: list[subprocess.Popen[bytes]],
    common: dict[str, str],
    model: Path,
    runtime_port: int,
    router_port: int,
    work: Path,
    script: Path,
    args: argparse.Namespace,
) -> None:
    """A second runtime (the mirror target) and a router copying every request to it; the
    target is frozen (SIGSTOP) while the clients' p99 is measured through both routers."""
    secret = {"KUBEONNX_MIRROR_SECRET": "bench-mirror-secret"}
    mirror_port, mirrored_port = free_port(), free_port()
    procs.append(
        start(
            "0",
            {
                **common,
                **secret,
                "KUBEONNX_MODEL_URI": f"file://{model}",
                "KUBEONNX_MODEL_NAME": "mlp",
                "KUBEONNX_MODEL_VERSION": "3",
                "KUBEONNX_THREADS": "1",
            },
            mirror_port,
        )
    )
    mirror = procs[-1]
    config = work / "mirrored.json"
    config.write_text(
        json.dumps(
            {
                "versions": [
                    {"name": "1", "url": f"http://127.0.0.1:{runtime_port}", "weight": 1},
                    {"name": "3", "url": f"http://127.0.0.1:{mirror_port}", "mirror_percent": 100},
                ]
            }
        )
    )
    env = {**common, **secret, "KUBEONNX_ROLE": "router", "KUBEONNX_ROUTER_CONFIG": str(config)}
    procs.append(start("1", env, mirrored_port))
    urls = {
        name: f"http://127.0.0.1:{port}/v2/models/mlp/infer"
        for name, port in (("unmirrored", router_port), ("mirror frozen", mirrored_port))
    }
    ratios = []
    for n in range(args.rounds):
        p99 = {}
        for name, url in urls.items():
            run_wrk(url, script, 4, 1)  # warm (the mirror still answers here)
            os.kill(mirror.pid, signal.SIGSTOP)
            try:
                p99[name] = run_wrk(url, script, 16, args.seconds)[2]
            finally:
                os.kill(mirror.pid, signal.SIGCONT)
        ratios.append(p99["mirror frozen"] / p99["unmirrored"])
        print(
            f"round {n + 1}: c16 p99 ms: unmirrored {p99['unmirrored']:.2f}, mirror frozen "
            f"{p99['mirror frozen']:.2f}, ratio {ratios[-1]:.2f}",
            flush=True,
        )
    print(f"median of {args.rounds}: frozen-mirror p99 ratio {statistics.median(ratios):.2f}")


def profile(
    router: subprocess.Popen[bytes], port: int, script: Path, args: argparse.Namespace
) -> None:
    """The router under load at 64 connections, then stopped (SIGINT) so cProfile writes."""
    url = f"http://127.0.0.1:{port}/v2/models/mlp/infer"
    run_wrk(url, script, 4, 1)  # warm
    os.kill(router.pid, signal.SIGUSR1)  # profile from here: the load alone
    rps = run_wrk(url, script, 64, args.seconds)[0]
    os.killpg(router.pid, signal.SIGINT)
    router.wait(60)
    print(f"c64 requests/s through the profiled router: {rps:.0f}")
    stats = pstats.Stats(str(args.profile))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    # Own time (builtins charged to their main caller) by whose code runs.
    shares: dict[str, float] = {}
    for (path, _, _), (_, _, own, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if path == "~" and callers:
            path = max(callers, key=lambda c: callers[c][2])[0]
        shares[_part(path)] = shares.get(_part(path), 0) + own
    total = sum(shares.values())
    for part, own in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"{own / total:6.1%}  {part}")


PARTS = (
    ("kubeonnx_runtime/router.py", "the router's request path (router.py)"),
    ("kubeonnx_runtime/upstream.py", "its upstream client (upstream.py)"),
    ("kubeonnx_runtime/server.py", "uvicorn's HTTP server (client side)"),
    ("uvicorn/", "uvicorn's HTTP server (client side)"),
    ("prometheus_client/", "metrics"),
    ("asyncio/", "the event loop (uvloop, asyncio)"),
    ("_weakrefset", "the event loop (uvloop, asyncio)"),
)


def _part(path: str) -> str:
    return next((part for key, part in PARTS if key in path), f"other: {path}")


if __name__ == "__main__":
    main()
