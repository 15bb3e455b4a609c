"""Where one `kubeonnx serve` configuration spends its CPU, under the benchmark's load.

    .venv/bin/python benchmarks/runtime_profile.py --model convnet --body binary -c 64
    .venv/bin/python benchmarks/runtime_profile.py --model mlp --py-spy PATH/TO/py-spy

Runs the server pinned to CPU 0 and wrk pinned to CPU 1, as runtime_bench.py does, and
reports CPU per request for each of the server's threads (from /proc/PID/task/*/stat) and
the average rows per model run (from the server's own kubeonnx_batch_size metric). With
--py-spy, the main thread is also sampled during the load and its samples are split into
kubeonnx's request path and the HTTP stack (uvicorn, uvloop, asyncio), with the busiest
lines of each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import thread_cpu
from runtime_bench import PLAN, bodies, run_wrk, serve_env, start

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from e2e.cluster import free_port
from e2e.generate_models import generate

# Leaf frames in these run on behalf of kubeonnx's request path (the model included).
OURS = ("kubeonnx_runtime/", "prometheus_client/", "numpy/", "orjson", "onnxruntime/")


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text

    def value(prefix: str) -> float:
        return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))

    return value("kubeonnx_batch_size_sum"), value("kubeonnx_batch_size_count")


# Loaded into the server (as its sitecustomize) by --gc: every collection's generation, start
# (monotonic) and length, rewritten to KUBEONNX_GC_PROBE every 0.2 s by a daemon thread, which
# also calls gc.freeze() once KUBEONNX_GC_PROBE.freeze exists (--gc-freeze).
GC_PROBE = """
import gc, json, os, threading, time
_path = os.environ.get("KUBEONNX_GC_PROBE")
_done, _start = [], [0.0]

def _timer(phase, info):
    if phase == "start":
        _start[0] = time.monotonic()
    else:
        _done.append((info["generation"], _start[0], time.monotonic() - _start[0]))

def _dump():
    frozen = False
    while True:
        time.sleep(0.2)
        if not frozen and os.path.exists(_path + ".freeze"):
            # The benchmark asks once the server answers (before the warm-up load): what
            # exists then is kept out of every later collection. An experiment for a fix,
            # not what the runtime does.
            gc.freeze()
            frozen = True
        tmp = _path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(list(_done), f)
        os.replace(tmp, _path)

if _path:
    gc.callbacks.append(_timer)
    threading.Thread(target=_dump, daemon=True).start()
"""


def gc_pauses(path: Path) -> list[list[float]]:
    """[generation, start, seconds] of every collection the server has made so far."""
    return json.loads(path.read_text()) if path.exists() else []


def summarize_gc(pauses: list[list[float]], seconds: float) -> str:
    lines = [f"garbage collections during the load ({seconds} s):"]
    for gen in (0, 1, 2):
        mine = [p[2] for p in pauses if p[0] == gen]
        if mine:
            long = sum(m >= 0.01 for m in mine)
            lines.append(
                f"  generation {gen}: {len(mine)} collections, {1000 * sum(mine):.0f} ms in all, "
                f"longest {1000 * max(mine):.1f} ms, {long} of 10 ms or more"
            )
    return "\n".join(lines)


def summarize_profile(raw: Path) -> list[str]:
    """Split py-spy's raw (collapsed) stacks of the event-loop thread by whose code runs."""
    leaves: Counter[str] = Counter()
    total = ours = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue  # the inference thread: its time is the model's
        n = int(count)
        total += n
        leaves[frames[-1]] += n
        if any(mark in frames[-1] for mark in OURS):
            ours += n
    if not total:
        return ["no samples of the main thread"]
    lines = [
        f"main thread: {total} samples; kubeonnx's request path and the model "
        f"{100 * ours / total:.1f}%, "
        f"HTTP stack and event loop {100 * (total - ours) / total:.1f}%",
        "busiest lines (self time):",
    ]
    lines += [f"  {100 * n / total:5.1f}%  {leaf}" for leaf, n in leaves.most_common(15)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(PLAN), default="convnet")
    parser.add_argument("--body", choices=["binary", "json"], default="binary")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--py-spy", help="path to a py-spy binary: also sample the main thread")
    parser.add_argument(
        "--gc", action="store_true", help="also time the server's garbage collections"
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="with --gc: gc.freeze() in the server once it has started (an experiment)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kubeonnx-profile-"))
    path = generate(work / "models", [args.model])[args.model]
    script = bodies(work, args.model, PLAN[args.model])[args.body]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = serve_env(args.model, path, port, work)
    env["KUBEONNX_MAX_BATCH_SIZE"] = "32" if args.batching else "1"
    gc_file = work / "gc.json"
    if args.gc:
        probe = work / "gc-probe"
        probe.mkdir()
        (probe / "sitecustomize.py").write_text(GC_PROBE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe), env.get("PYTHONPATH")]))
        env["KUBEONNX_GC_PROBE"] = str(gc_file)
    kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
    proc = start([kubeonnx, "serve"], f"{base}/v2/health/live", env)
    if args.gc_freeze:
        Path(f"{gc_file}.freeze").touch()
        time.sleep(0.5)  # the probe looks every 0.2 s
    url = f"{base}/v2/models/{args.model}/infer"
    try:
        run_wrk(url, script, 4, 1)  # warm-up
        rows_before, runs_before = batch_stats(base)
        cpu_before = thread_cpu(proc.pid)
        spy = None
        if args.py_spy:
            record = [
                *("taskset", "-c", "1", args.py_spy, "record", "--nonblocking", "-r", "400"),
                *("-f", "raw", "-o", str(work / "profile.txt"), "-p", str(proc.pid)),
                *("-d", str(max(1, args.seconds - 1))),
            ]
            spy = subprocess.Popen(
                record,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        gc_before = gc_pauses(gc_file) if args.gc else []
        rps, p50, p99, total, _ = run_wrk(url, script, args.concurrency, args.seconds)
        gc_after = gc_pauses(gc_file) if args.gc else []
        if spy is not None:
            spy.wait()
        cpu_after = thread_cpu(proc.pid)
        rows_after, runs_after = batch_stats(base)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    print(
        f"{args.model}, {args.body}, concurrency {args.concurrency}: {rps:,.0f} req/s, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    if args.gc:
        print(summarize_gc(gc_after[len(gc_before) :], args.seconds))
    runs = runs_after - runs_before
    if runs:
        print(f"rows per model run: {(rows_after - rows_before) / runs:.1f} over {runs:.0f} runs")
    for thread, seconds in cpu_after.items():
        used = seconds - cpu_before.get(thread, 0.0)
        if used > 0.01:
            print(f"thread {thread}: {used:.2f} CPU s, {1000 * used / total:.3f} ms per request")
    if args.py_spy:
        print("\n".join(summarize_profile(work / "profile.txt")))


if __name__ == "__main__":
    main()
