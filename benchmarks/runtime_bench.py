"""Runtime benchmark: every figure from one run, side by side, on this machine.

    .venv/bin/python benchmarks/runtime_bench.py [--seconds 10] [--out FILE.md]
        [--models mlp convnet] [--only batching naive] [--baseline DIR]

--baseline DIR adds kubeonnx as checked out in DIR (e.g. `git worktree add DIR COMMIT`),
with batching, to the same run: a change is measured against the code before it, side by
side. --only keeps the servers whose label contains one of the words given.

Servers run pinned to CPU 0 with one intra-op thread; wrk (compiled, Debian's `wrk`) runs
pinned to CPU 1, so the load generator does not compete with the server. Each point: batch
1 per request, wrk for --seconds after a 1 s warm-up. Reported: requests/s, p50/p99 latency
(wrk --latency), server CPU seconds per 1,000 requests (/proc utime+stime), server peak RSS
(VmHWM), and wrk's own CPU seconds per 1,000 requests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from e2e.cluster import free_port  # noqa: E402
from e2e.generate_models import generate  # noqa: E402
from e2e.serving import wait_serving  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from procstat import cpu_seconds, peak_mb  # noqa: E402

LUA = """
local f = io.open("{body}", "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "{ctype}"
{extra}
"""


@dataclass
class Point:
    model: str
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_1k: float
    wrk_cpu_per_1k: float
    peak_mb: float


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(
    url: str, script: Path, connections: int, seconds: int, *, timeout_s: int | None = None
) -> tuple[float, float, float, int, float]:
    """(req/s, p50 ms, p99 ms, requests, wrk's CPU s). With timeout_s, wrk waits that long for
    an answer (its default is 2 s, and a request it gave up on is left out of its latencies)
    and a request that still timed out fails the point."""
    cmd = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        *([f"--timeout={timeout_s}s"] if timeout_s else []),
        "-s",
        str(script),
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, _, usage = os.wait4(proc.pid, 0)
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    except (AttributeError, KeyError) as exc:
        raise RuntimeError(f"cannot read wrk's output ({exc}):\n{out}") from None
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed responses:\n{out}")
    timeouts = re.search(r"Socket errors:.*timeout (\d+)", out)
    if timeout_s and timeouts and int(timeouts.group(1)):
        raise RuntimeError(f"{timeouts.group(1)} requests timed out after {timeout_s} s:\n{out}")
    return rps, p50, p99, total, usage.ru_utime + usage.ru_stime


def start(
    cmd: list[str],
    url: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    *,
    timeout_s: float = 60,
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["taskset", "-c", "0", *cmd],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        wait_serving(url, proc, timeout_s, what=" ".join(cmd))
    except RuntimeError:
        proc.kill()
        raise
    return proc


def serve_env(model: str, path: Path, port: int, work: Path) -> dict[str, str]:
    """`kubeonnx serve` settings for a benchmark: the model from a file, one intra-op thread."""
    return {
        "KUBEONNX_MODEL_URI": f"file://{path}",
        "KUBEONNX_MODEL_NAME": model,
        "KUBEONNX_PORT": str(port),
        "KUBEONNX_HOST": "127.0.0.1",
        "KUBEONNX_THREADS": "1",
        "KUBEONNX_LOG_LEVEL": "warning",
        "KUBEONNX_CACHE_DIR": str(work / "cache"),
        "KUBEONNX_TERMINATION_LOG": str(work / "term"),
    }


def bodies(work: Path, model: str, shape: tuple[int, ...]) -> dict[str, Path]:
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    js = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    paths = {"json": work / f"{model}.json", "binary": work / f"{model}.bin"}
    paths["json"].write_text(json.dumps(js))
    paths["binary"].write_bytes(header + x.tobytes())
    scripts = {}
    for kind in paths:
        extra = (
            f'wrk.headers["Inference-Header-Content-Length"] = "{len(header)}"'
            if kind == "binary"
            else ""
        )
        ctype = "application/octet-stream" if kind == "binary" else "application/json"
        script = work / f"{model}-{kind}.lua"
        script.write_text(LUA.format(body=paths[kind], ctype=ctype, extra=extra))
        scripts[kind] = script
    return scripts


def raw_limit(
    path: Path, shape: tuple[int, ...], seconds: float, batch: int = 1, threads: int = 1
) -> float:
    """Rows/s of a bare session.run loop in this process (pinned to CPU 0)."""
    os.sched_setaffinity(0, {0})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            session.run(None, {"input": x})
            counts[i] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return sum(counts) * batch / seconds


# model -> the shape of one row of its input
PLAN: dict[str, tuple[int, ...]] = {
    "mlp": (4,),  # tiny: server overhead dominates
    "wide": (256,),  # model and server cost about the same per row
    "convnet": (3, 32, 32),  # medium: compute dominates
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=list(PLAN), default=list(PLAN))
    parser.add_argument("--out")
    parser.add_argument("--baseline", type=Path, help="a checkout of kubeonnx to compare with")
    parser.add_argument("--only", nargs="+", help="servers whose label contains one of these")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-bench-"))
    models = generate(work / "models", args.models)
    kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
    points: list[Point] = []
    lines: list[str] = []

    concurrencies = [1, 16, 64]
    for model in args.models:
        shape = PLAN[model]
        scripts = bodies(work, model, shape)
        limit = raw_limit(models[model], shape, 3)
        limit2 = raw_limit(models[model], shape, 3, threads=2)
        limit_b = raw_limit(models[model], shape, 3, batch=32)
        lines.append(
            f"raw onnxruntime, {model}: {limit:,.0f} runs/s (1 thread), "
            f"{limit2:,.0f} runs/s (2 threads, one session), "
            f"{limit_b:,.0f} rows/s at batch 32"
        )
        print(lines[-1], flush=True)
        servers = {
            "naive FastAPI (JSON)": (
                [
                    sys.executable,
                    str(ROOT / "benchmarks/naive_server.py"),
                    str(models[model]),
                    "{port}",
                    "1",
                ],
                "json",
                {},
            ),
            "kubeonnx, no batching (JSON)": (
                [kubeonnx, "serve"],
                "json",
                {"KUBEONNX_MAX_BATCH_SIZE": "1"},
            ),
            "kubeonnx, no batching (binary)": (
                [kubeonnx, "serve"],
                "binary",
                {"KUBEONNX_MAX_BATCH_SIZE": "1"},
            ),
            "kubeonnx, batching (JSON)": (
                [kubeonnx, "serve"],
                "json",
                {"KUBEONNX_MAX_BATCH_SIZE": "32"},
            ),
            "kubeonnx, batching (binary)": (
                [kubeonnx, "serve"],
                "binary",
                {"KUBEONNX_MAX_BATCH_SIZE": "32"},
            ),
        }
        if args.baseline:
            # The baseline's runtime package shadows this checkout's (PYTHONPATH comes first).
            baseline_env = {
                "PYTHONPATH": str(args.baseline.resolve() / "runtime"),
                "KUBEONNX_MAX_BATCH_SIZE": "32",
            }
            for kind in ("json", "binary"):
                label = f"kubeonnx @ baseline, batching ({'JSON' if kind == 'json' else kind})"
                servers[label] = ([kubeonnx, "serve"], kind, baseline_env)
        if args.only:
            servers = {k: v for k, v in servers.items() if any(w in k for w in args.only)}
        for label, (cmd, kind, extra_env) in servers.items():
            port = free_port()
            env = {**serve_env(model, models[model], port, work), **extra_env}
            cmd = [c.replace("{port}", str(port)) for c in cmd]
            url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
            proc = start(cmd, f"http://127.0.0.1:{port}/v2/health/live", env)
            try:
                run_wrk(url, scripts[kind], 4, 1)  # warm-up
                for c in concurrencies:
                    before = cpu_seconds(proc.pid)
                    rps, p50, p99, total, wrk_cpu = run_wrk(url, scripts[kind], c, args.seconds)
                    used = cpu_seconds(proc.pid) - before
                    point = Point(
                        model,
                        label,
                        c,
                        rps,
                        p50,
                        p99,
                        1000 * used / total,
                        1000 * wrk_cpu / total,
                        peak_mb(proc.pid),
                    )
                    points.append(point)
                    print(point, flush=True)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    table = [
        "| model | server | concurrency | req/s | p50 ms | p99 ms | server CPU s / 1k req "
        "| wrk CPU s / 1k req | server peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        table.append(
            f"| {p.model} | {p.server} | {p.concurrency} | {p.rps:,.0f} | "
            f"{p.p50_ms:.2f} | {p.p99_ms:.2f} | {p.cpu_per_1k:.3f} | "
            f"{p.wrk_cpu_per_1k:.3f} | {p.peak_mb:.0f} |"
        )
    report = "\n".join(lines) + "\n\n" + "\n".join(table) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
