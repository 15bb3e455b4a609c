"""Instructions benchmark: what a quota costs the runtime in CPU instructions per request, and
what the JSON path costs against bare onnxruntime, counted by valgrind's callgrind, so the
figures do not move with the machine's load as requests/s do.

    .venv/bin/python benchmarks/instructions_bench.py [--requests 2048] [--concurrency 64 16]
        [--convnet-requests 32] [--convnet-concurrency 32] [--skip-quota] [--skip-convnet]
        [--annotate] [--steps] [--out FILE.md]

Each `kubeonnx serve` (one intra-op thread, batching on, max batch 32) runs under
`valgrind --tool=callgrind --instr-atstart=no`: it starts at nearly native speed, and once it
answers, instrumentation is turned on (`callgrind_control -i on`) and it is warmed up. For
each concurrency, the counters are zeroed (`-z`), a fixed number of requests is sent by a
small asyncio client outside valgrind (the server is pinned to CPU 0, the client is not),
and the counters are dumped (`-d`). The server's own /metrics, read before the zeroing and after the
dump, says how many requests were answered, in how many model runs, and (Redis) in how many
script calls, in that window exactly: instructions per request = instructions in the window /
requests in it.

First table: the tiny model (`mlp`), binary tensors, three servers in turn: no quota, a
quota counted in memory, a quota counted in a real redis-server (every request names a
tenant whose limits it never reaches, as in quota_bench.py; the decision budget is raised to
10 s, since a server under callgrind runs some 50x slower, and a request admitted unchecked
would fail the run). Second table: `convnet`, JSON bodies, kubeonnx against a bare
`session.run` loop (also under callgrind) on batches of the size the server's runs averaged.

Instructions are CPU work in user space, not time: a syscall's kernel work, cache misses and
SIMD width are not in them. Under callgrind's slowdown batches fill differently than on a
native server (more requests wait per model run and per Redis script call), so the batching
measured is printed beside each figure. With --annotate, the functions (C level: the
interpreter, uvicorn's parser, onnxruntime...) whose own instructions per request a quota
raises most; with --steps, the quota's steps counted one by one in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import cpu_seconds
from quota_bench import KEY, policy
from runtime_bench import PLAN, bodies, serve_env, start

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from e2e.cluster import free_port
from e2e.generate_models import generate
from e2e.redis_server import LocalRedis

# Python and its imports take a minute or more to start under valgrind on a busy machine.
START_TIMEOUT_S = 600
# One measured window at most: the run stops by itself rather than hang on a stuck server.
WINDOW_TIMEOUT_S = 900
SERVE = "import sys; sys.argv = ['kubeonnx', 'serve']; from kubeonnx_cli import main; main()"


def valgrind(out: Path) -> list[str]:
    """callgrind with instrumentation off until `callgrind_control -i on` (a fast start)."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        f"--log-file={out}.log",
    ]


def control(pid: int, *flags: str) -> None:
    subprocess.run(
        ["callgrind_control", *flags, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


def dump(pid: int, out: Path) -> Path:
    """Dump the counters since the last zeroing; return the file written (out.N)."""
    before = {p: p.stat().st_mtime_ns for p in out.parent.glob(f"{out.name}.*[0-9]")}
    control(pid, "-d")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in out.parent.glob(f"{out.name}.*[0-9]"):
            if before.get(path) == path.stat().st_mtime_ns:
                continue
            if "\ntotals:" in path.read_text(errors="replace"):
                return path
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump next to {out}")


def instructions(dumped: Path) -> int:
    match = re.search(r"^totals:\s+(\d+)", dumped.read_text(errors="replace"), re.M)
    if not match:
        raise RuntimeError(f"no totals in {dumped}")
    return int(match.group(1))


# ---------------------------------------------------------------------------- the client


def request_bytes(port: int, model: str, body: bytes, ctype: str, header_len: int | None) -> bytes:
    head = [
        f"POST /v2/models/{model}/infer HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        f"X-Api-Key: {KEY}",
    ]
    if header_len is not None:
        head.append(f"Inference-Header-Content-Length: {header_len}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _connection(port: int, request: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(request)
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"the server answered {status!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
    finally:
        writer.close()


def send(port: int, request: bytes, requests: int, concurrency: int) -> None:
    """`requests` requests over `concurrency` keep-alive connections, each one at a time."""
    per = math.ceil(requests / concurrency)

    async def all_of_them() -> None:
        work = (_connection(port, request, per) for _ in range(concurrency))
        await asyncio.wait_for(asyncio.gather(*work), WINDOW_TIMEOUT_S)

    asyncio.run(all_of_them())


# ------------------------------------------------------------------ the server's counters


@dataclass
class Counters:
    """What the server's /metrics says it did (its counters summed over their labels)."""

    values: dict[str, float] = field(default_factory=dict)

    def __sub__(self, other: Counters) -> Counters:
        keys = self.values.keys() | other.values.keys()
        return Counters({k: self.values.get(k, 0) - other.values.get(k, 0) for k in keys})

    def __getitem__(self, key: str) -> float:
        return self.values.get(key, 0.0)


WANTED = {
    "kubeonnx_requests_total": lambda labels: "ok" if 'code="200"' in labels else "failed",
    "kubeonnx_batch_size_count": lambda labels: "",
    "kubeonnx_batch_size_sum": lambda labels: "",
    "kubeonnx_quota_redis_seconds_count": lambda labels: "",
    "kubeonnx_quota_decisions_total": lambda labels: re.search(  # type: ignore[union-attr]
        r'decision="(\w+)"', labels
    ).group(1),
}


def scrape(port: int) -> Counters:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=120).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in WANTED:
            labels, _, value = rest.rpartition("} ")
            key = f"{name}:{WANTED[name](labels)}".rstrip(":")
            out[key] = out.get(key, 0.0) + float(value)
    return Counters(out)


@dataclass
class Window:
    server: str
    concurrency: int
    instructions: int
    counted: Counters
    dumped: Path
    redis_usec: float | None = None  # redis-server's own time in commands (INFO commandstats)
    redis_cpu_s: float | None = None  # redis-server's CPU (utime + stime)

    @property
    def requests(self) -> float:
        return self.counted["kubeonnx_requests_total:ok"]

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests

    @property
    def rows_per_run(self) -> float:
        return self.counted["kubeonnx_batch_size_sum"] / self.counted["kubeonnx_batch_size_count"]

    @property
    def per_script_call(self) -> float | None:
        calls = self.counted["kubeonnx_quota_redis_seconds_count"]
        return self.requests / calls if calls else None


def redis_command_usec(url: str) -> float:
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(float(v["usec"]) for v in stats.values())


# ------------------------------------------------------------------------ the servers


def measure_server(
    label: str,
    model: str,
    model_path: Path,
    work: Path,
    request: bytes,
    port: int,
    concurrencies: list[int],
    requests: int,
    extra_env: dict[str, str],
    redis: LocalRedis | None = None,
) -> list[Window]:
    out = work / f"callgrind-{re.sub(r'[^a-z0-9]+', '-', label.lower())}.out"
    env = {**serve_env(model, model_path, port, work), "KUBEONNX_MAX_BATCH_SIZE": "32"}
    env.update(extra_env)
    started = time.monotonic()
    proc = start(
        [*valgrind(out), sys.executable, "-c", SERVE],
        f"http://127.0.0.1:{port}/v2/health/live",
        env,
        timeout_s=START_TIMEOUT_S,
    )
    print(f"{label}: serving under valgrind after {time.monotonic() - started:.0f} s", flush=True)
    windows = []
    try:
        control(proc.pid, "-i", "on")
        for c in concurrencies:
            # Warm-up: caches, the Redis script. (Each send opens its connections: their set-up
            # is in the window, once per connection.)
            warm = min(2 * c, max(1, requests // 4))
            send(port, request, warm, min(c, warm))
            before = scrape(port)
            redis_before = redis_command_usec(redis.url) if redis else 0.0
            redis_cpu = cpu_seconds(redis.proc.pid) if redis and redis.proc else 0.0
            control(proc.pid, "-z")
            started = time.monotonic()
            send(port, request, requests, c)
            dumped = dump(proc.pid, out)
            took = time.monotonic() - started
            window = Window(label, c, instructions(dumped), scrape(port) - before, dumped)
            if redis and redis.proc:
                window.redis_usec = redis_command_usec(redis.url) - redis_before
                window.redis_cpu_s = cpu_seconds(redis.proc.pid) - redis_cpu
            check(window)
            windows.append(window)
            print(
                f"{label}, c{c}: {window.per_request:,.0f} instructions a request over "
                f"{window.requests:.0f} requests ({took:.0f} s), {window.rows_per_run:.1f} rows "
                "a model run"
                + (
                    f", {window.per_script_call:.1f} requests a script call"
                    if window.per_script_call
                    else ""
                ),
                flush=True,
            )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return windows


def check(window: Window) -> None:
    """A window whose requests were not all served, or not all decided, measures nothing."""
    counted = window.counted
    if counted["kubeonnx_requests_total:failed"]:
        raise RuntimeError(f"{window.server}: {counted['kubeonnx_requests_total:failed']} failed")
    for decision in ("admitted_unchecked", "unavailable", "refused"):
        if counted[f"kubeonnx_quota_decisions_total:{decision}"]:
            raise RuntimeError(f"{window.server}: requests {decision} in the measured window")


def with_budget(path: Path) -> Path:
    """The quota_bench policy with a decision budget callgrind's slowdown cannot exceed."""
    config = json.loads(path.read_text())
    config["decisionBudgetMs"] = 10000
    path.write_text(json.dumps(config))
    return path


# ------------------------------------------------------------- bare onnxruntime, counted

RAW_WORKER = """
import sys
import numpy as np
import onnxruntime as ort

options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
shape = tuple(int(n) for n in sys.argv[2].split(","))
print("ready", flush=True)
for line in sys.stdin:
    batch, runs = (int(n) for n in line.split())
    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    for _ in range(runs):
        session.run(None, {"input": x})
    print("done", flush=True)
"""


def measure_raw(model_path: Path, shape: tuple[int, ...], work: Path, batches: list[int]) -> dict:
    """Instructions per row of a bare session.run loop, for each batch size (rows per run)."""
    out = work / "callgrind-raw.out"
    cmd = [*valgrind(out), sys.executable, "-c", RAW_WORKER, str(model_path)]
    proc = subprocess.Popen(
        ["taskset", "-c", "0", *cmd, ",".join(map(str, shape))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdin and proc.stdout

    def ask(line: str) -> None:
        if line:
            proc.stdin.write(line + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        answer = proc.stdout.readline()  # type: ignore[union-attr]
        if not answer:
            raise RuntimeError(f"the bare onnxruntime loop exited (see {out}.log)")

    per_row = {}
    try:
        ask("")  # ready
        control(proc.pid, "-i", "on")
        for batch in batches:
            runs = max(1, 16 // batch)  # callgrind counts the same for every run: few suffice
            ask(f"{batch} 1")  # warm-up at this size
            control(proc.pid, "-z")
            ask(f"{batch} {runs}")
            per_row[batch] = instructions(dump(proc.pid, out)) / (batch * runs)
            print(f"bare onnxruntime, batch {batch}: {per_row[batch]:,.0f} a row", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return per_row


# ------------------------------------------------------------------------- annotation


def self_costs(dumped: Path) -> dict[str, int]:
    """Instructions spent in each function itself (callgrind_annotate's exclusive cost), by
    function and library. (Inclusive costs say nothing here: every Python function runs inside
    the one recursive interpreter function, so they all include one another.)"""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dumped)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*?)(?:\s+\[(.*)\])?$", line)
        if match and ":" in match.group(2):
            where = match.group(2).rsplit("/", 1)[-1]
            library = (match.group(3) or "").rsplit("/", 1)[-1]
            name = f"{where} ({library})" if library else where
            costs[name] = costs.get(name, 0) + int(match.group(1).replace(",", ""))
    return costs


def annotate(base: Window, other: Window, top: int = 20) -> list[str]:
    """The functions whose own instructions per request `other` raises most over `base`."""
    a, b = self_costs(base.dumped), self_costs(other.dumped)
    delta = {
        name: b.get(name, 0) / other.requests - a.get(name, 0) / base.requests
        for name in a.keys() | b.keys()
    }
    lines = [
        f"\n{other.server} against {base.server}, c{other.concurrency}: instructions a request "
        "in the function itself, the largest increases",
        "",
        "| function (library) | without | with | added |",
        "|---|---|---|---|",
    ]
    for name in sorted(delta, key=lambda n: -delta[n])[:top]:
        lines.append(
            f"| `{name}` | {a.get(name, 0) / base.requests:,.0f} | "
            f"{b.get(name, 0) / other.requests:,.0f} | {delta[name]:+,.0f} |"
        )
    return lines


# ------------------------------------------------------------ the quota's steps, counted

STEPS_WORKER = """
import json, re, sys, time
from prometheus_client import CollectorRegistry
from kubeonnx_runtime.metrics import RuntimeMetrics
from kubeonnx_runtime.quota import Quota, QuotaConfig

config = QuotaConfig.model_validate_json(open(sys.argv[1]).read())
tenant = config.tenants[0].name
count = RuntimeMetrics(CollectorRegistry()).quota_decisions.counter("mlp")
quota = Quota(config, on_decision=count)
headers = {quota.header: sys.argv[2]}


def admit():
    step = quota.admit(tenant, 1)
    try:
        step.send(None)
    except StopIteration as done:
        return done.value


decision = admit()
answer = decision.headers(time.time())
# uvicorn's checks of each header of an answer (as its httptools protocol makes them)
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE


def uvicorn_checks():
    for name, value in answer:
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            raise RuntimeError(name)
        name.lower()


steps = {
    "nothing (the loop's own cost, subtracted)": lambda: None,
    "identify: the tenant of the key": lambda: quota.identify(headers),
    "admit, in memory (its metric included)": admit,
    "the decision's metric alone": lambda: count(tenant, "admitted"),
    "the budget headers (Decision.headers)": lambda: decision.headers(time.time()),
    "uvicorn's checks of those headers": uvicorn_checks,
}
print("ready", flush=True)
for line in sys.stdin:
    name, runs = line.rsplit(" ", 1)
    for _ in range(int(runs)):
        steps[name]()
    print("done", flush=True)
"""
STEP_NAMES = re.findall(r'^    "([^"]+)": ', STEPS_WORKER, re.M)


def measure_steps(config: Path, work: Path, runs: int = 2000) -> list[str]:
    """Instructions per call of each step a quota adds to a request, one at a time in one
    process: where the cost the first table shows goes."""
    out = work / "callgrind-steps.out"
    proc = subprocess.Popen(
        [*valgrind(out), sys.executable, "-c", STEPS_WORKER, str(config), KEY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdin and proc.stdout
    lines = ["", "| step (in memory) | instructions a call |", "|---|---|"]
    try:
        if not proc.stdout.readline():
            raise RuntimeError(f"the steps worker exited (see {out}.log)")
        control(proc.pid, "-i", "on")
        empty = 0.0
        for i, name in enumerate(STEP_NAMES):
            for n in (runs // 10, runs):  # a warm-up, then the count
                if n == runs:
                    control(proc.pid, "-z")
                proc.stdin.write(f"{name} {n}\n")
                proc.stdin.flush()
                if not proc.stdout.readline():
                    raise RuntimeError(f"the steps worker exited (see {out}.log)")
            per_call = instructions(dump(proc.pid, out)) / runs
            if i == 0:
                empty = per_call
            else:
                lines.append(f"| {name} | {per_call - empty:,.0f} |")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return lines


# ------------------------------------------------------------------------------- main


def quota_table(windows: list[Window]) -> list[str]:
    lines = [
        "| server | c | requests | instructions a request | none / this | rows a model run "
        "| requests a script call | redis-server in commands a request | redis-server CPU a "
        "request |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {w.concurrency: w for w in windows if w.server == "no quota"}
    for w in windows:
        ratio = base[w.concurrency].per_request / w.per_request
        calls = f"{w.per_script_call:.1f}" if w.per_script_call else ""
        usec = f"{w.redis_usec / w.requests:.1f} us" if w.redis_usec is not None else ""
        cpu = f"{1e6 * w.redis_cpu_s / w.requests:.0f} us" if w.redis_cpu_s is not None else ""
        lines.append(
            f"| {w.server} | {w.concurrency} | {w.requests:.0f} | {w.per_request:,.0f} | "
            f"{ratio:.3f} | {w.rows_per_run:.1f} | {calls} | {usec} | {cpu} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2048, help="per point, mlp")
    parser.add_argument("--convnet-requests", type=int, default=32, help="per point, convnet")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--convnet-concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--skip-convnet", action="store_true")
    parser.add_argument("--skip-quota", action="store_true")
    parser.add_argument("--annotate", action="store_true")
    parser.add_argument("--steps", action="store_true", help="the quota's steps, one by one")
    parser.add_argument("--out")
    args = parser.parse_args()
    # A stopped run (timeout, Ctrl-C) still kills its servers (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-instructions-"))
    models = generate(work / "models", ["mlp", "convnet"])
    report: list[str] = []

    if not args.skip_quota:
        bodies(work, "mlp", PLAN["mlp"])
        body = (work / "mlp.bin").read_bytes()
        header_len = len(body) - 4 * math.prod(PLAN["mlp"])
        redis = LocalRedis().start()
        configs = {
            "no quota": (None, None),
            "quota, memory": (with_budget(policy(work, "memory", None)), None),
            "quota, redis": (with_budget(policy(work, "redis", redis.url)), redis),
        }
        windows: list[Window] = []
        try:
            for label, (config, store) in configs.items():
                port = free_port()
                request = request_bytes(port, "mlp", body, "application/octet-stream", header_len)
                env = {"KUBEONNX_QUOTA_CONFIG": str(config)} if config else {}
                windows += measure_server(
                    label,
                    "mlp",
                    models["mlp"],
                    work,
                    request,
                    port,
                    args.concurrency,
                    args.requests,
                    env,
                    store,
                )
        finally:
            redis.stop()
        report += ["mlp, binary tensors, batching on (max 32):", "", *quota_table(windows)]
        if args.annotate:
            for c in args.concurrency:
                point = {w.server: w for w in windows if w.concurrency == c}
                report += annotate(point["no quota"], point["quota, memory"])
                report += annotate(point["quota, memory"], point["quota, redis"])

    if args.steps:
        report += measure_steps(with_budget(policy(work, "steps", None)), work)

    if not args.skip_convnet:
        bodies(work, "convnet", PLAN["convnet"])
        body = (work / "convnet.json").read_bytes()
        port = free_port()
        request = request_bytes(port, "convnet", body, "application/json", None)
        served = measure_server(
            "kubeonnx, JSON",
            "convnet",
            models["convnet"],
            work,
            request,
            port,
            args.convnet_concurrency,
            args.convnet_requests,
            {},
        )
        sizes = sorted({max(1, round(w.rows_per_run)) for w in served})
        raw = measure_raw(models["convnet"], PLAN["convnet"], work, sizes)
        report += [
            "",
            "convnet, JSON bodies, batching on (max 32), against a bare session.run loop:",
            "",
            "| c | rows | rows a model run | kubeonnx a row | bare onnxruntime a row, at "
            "that batch size | bare / kubeonnx |",
            "|---|---|---|---|---|---|",
        ]
        for w in served:
            bare = raw[max(1, round(w.rows_per_run))]
            report.append(
                f"| {w.concurrency} | {w.requests:.0f} | {w.rows_per_run:.1f} | "
                f"{w.per_request:,.0f} | {bare:,.0f} | {bare / w.per_request:.3f} |"
            )
        report.append(
            "\nbare onnxruntime a row, by batch size: "
            + ", ".join(f"{b}: {v:,.0f}" for b, v in raw.items())
        )

    text = "\n".join(report) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
