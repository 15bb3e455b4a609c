"""kubeonnx and the servers a user would pick instead, side by side, each with its batching on.

    .venv/bin/python benchmarks/peers_bench.py [--seconds 10] [--models mlp convnet]
        [--concurrency 64] [--only WORD ...] [--out FILE.md]

Every server serves the same model file with one onnxruntime intra-op thread, pinned with
all its processes to CPU 0; wrk (one thread) runs on CPU 1. Each peer runs from its own
virtual environment, benchmarks/.venv-peer-NAME (`make peers` builds them); a peer whose
environment is missing is reported as such, not skipped silently. Batching: at most 32 rows
a run and a 2 ms wait wherever the server has those knobs (kubeonnx's settings in
runtime_bench.py). Before any timing, each server's answers to 16 different rows sent at
once (so they are batched together) and to the benchmark's own body must equal
onnxruntime's; a server that answers wrong is reported and not timed.

Reported per server and protocol: requests/s, p50/p99 (wrk --latency), CPU per request and
peak RSS of the whole process tree (utime+stime from /proc of every process in the
server's session; VmHWM summed over them), and the average rows per model run over the
timed load (kubeonnx: its kubeonnx_batch_size metric; peers: the adapter's own count).
Also the same CPU split by process and thread name (a profile at /proc's grain: which of a
server's processes and threads spent it). Then the raw onnxruntime limits on CPU 0: a bare
session.run loop at batch 1 and at 32.
Every server is killed after its point; wrk stops itself after --seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from procstat import thread_cpu  # noqa: E402
from runtime_bench import LUA, PLAN, bodies, raw_limit, run_wrk, serve_env  # noqa: E402
from runtime_profile import batch_stats  # noqa: E402

from e2e.cluster import free_port  # noqa: E402
from e2e.generate_models import generate  # noqa: E402
from e2e.serving import wait_serving  # noqa: E402

PEERS = HERE / "peers"
MAX_BATCH = 32
MAX_WAIT_MS = 2
START_TIMEOUT_S = 180
# wrk's own 2 s would drop the slowest answers from the latencies on a loaded machine.
WRK_TIMEOUT_S = 60


def venv(name: str) -> Path:
    return HERE / f".venv-peer-{name}"


@dataclass
class Launch:
    cmd: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Server:
    label: str
    settings: str
    venv: Path | None  # None: kubeonnx, from this interpreter's environment
    protocols: tuple[str, ...]  # "v2-json", "v2-binary", "own-json"
    launch: Callable[[str, Path, int, Path], Launch]
    health: str = "/v2/models/{model}/ready"
    infer: str = "/v2/models/{model}/infer"


def _kubeonnx(model: str, path: Path, port: int, work: Path) -> Launch:
    env = serve_env(model, path, port, work)
    env["KUBEONNX_MAX_BATCH_SIZE"] = str(MAX_BATCH)
    env["KUBEONNX_MAX_BATCH_DELAY_MS"] = str(MAX_WAIT_MS)
    return Launch([str(Path(sys.executable).parent / "kubeonnx"), "serve"], env=env)


def _mlserver(model: str, path: Path, port: int, work: Path) -> Launch:
    d = work / f"mlserver-{model}-{port}"
    d.mkdir()
    # parallel_workers 0: inference in the server process. MLServer 1.7.1's default worker
    # pool fails to start here ("There is no current event loop"), see docs/performance.md.
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
        "debug": False,
    }
    model_settings = {
        "name": model,
        "implementation": "mlserver_model.OnnxModel",
        "parameters": {"uri": str(path)},
        "max_batch_size": MAX_BATCH,
        "max_batch_time": MAX_WAIT_MS / 1000,
    }
    (d / "settings.json").write_text(json.dumps(settings))
    (d / "model-settings.json").write_text(json.dumps(model_settings))
    return Launch(
        [str(venv("mlserver") / "bin/mlserver"), "start", str(d)],
        cwd=d,
        env={"PYTHONPATH": str(PEERS)},
    )


def _kserve(model: str, path: Path, port: int, work: Path) -> Launch:
    python = str(venv("kserve") / "bin/python")
    return Launch([python, str(PEERS / "kserve_server.py"), str(path), model, str(port)])


def _pytriton(model: str, path: Path, port: int, work: Path) -> Launch:
    python = str(venv("pytriton") / "bin/python")
    script = str(PEERS / "pytriton_server.py")
    ports = [str(port), str(free_port()), str(free_port())]
    # PyTriton keeps its workspace (model store, sockets) under HOME's cache unless told.
    # Triton's Python-backend stub links libpython3.11.so from the loader's path: Debian's
    # 3.11.2 here, whose RLock lacks what the venv's own (newer) 3.11 stdlib calls
    # ("'_thread.RLock' object has no attribute '_recursion_count'"). The venv's interpreter's
    # own libpython comes first.
    home = next(
        line.split("=", 1)[1].strip()
        for line in (venv("pytriton") / "pyvenv.cfg").read_text().splitlines()
        if line.startswith("home")
    )
    env = {
        "PYTRITON_HOME": str(work / f"pytriton-{port}"),
        "LD_LIBRARY_PATH": str(Path(home).parent / "lib"),
    }
    return Launch([python, script, str(path), model, *ports], env=env)


def _bentoml(model: str, path: Path, port: int, work: Path) -> Launch:
    bentoml = str(venv("bentoml") / "bin/bentoml")
    env = {
        "PEER_MODEL": str(path),
        "BENTOML_HOME": str(work / f"bentoml-{port}"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    cmd = [bentoml, "serve", "bentoml_service:Onnx", "--host", "127.0.0.1", "--port", str(port)]
    return Launch(cmd, cwd=PEERS, env=env)


def _litserve(model: str, path: Path, port: int, work: Path, fast: bool = False) -> Launch:
    python = str(venv("litserve") / "bin/python")
    env = {"PEER_FAST_QUEUE": "1" if fast else "0"}
    return Launch([python, str(PEERS / "litserve_server.py"), str(path), str(port)], env=env)


def _litserve_fast(model: str, path: Path, port: int, work: Path) -> Launch:
    return _litserve(model, path, port, work, fast=True)


BATCH = f"max batch {MAX_BATCH}, wait {MAX_WAIT_MS} ms"
SERVERS = [
    Server(
        "kubeonnx",
        f"{BATCH} (KUBEONNX_MAX_BATCH_SIZE, KUBEONNX_MAX_BATCH_DELAY_MS)",
        None,
        ("v2-json", "v2-binary"),
        _kubeonnx,
    ),
    Server(
        "MLServer 1.7.1",
        f"adaptive batching: max_batch_size {MAX_BATCH}, max_batch_time {MAX_WAIT_MS} ms; "
        "parallel_workers 0",
        venv("mlserver"),
        ("v2-json", "v2-binary"),
        _mlserver,
    ),
    Server(
        "KServe 0.21.0",
        "no batching: the Python server has none (KServe batches in its Go agent sidecar)",
        venv("kserve"),
        ("v2-json", "v2-binary"),
        _kserve,
    ),
    Server(
        "Triton (PyTriton 0.7.0)",
        f"dynamic batcher: max_batch_size {MAX_BATCH}, "
        f"max_queue_delay_microseconds {MAX_WAIT_MS * 1000}",
        venv("pytriton"),
        ("v2-json", "v2-binary"),
        _pytriton,
    ),
    Server(
        "BentoML 1.4.40",
        f"adaptive batching: max_batch_size {MAX_BATCH}, max_latency_ms 60000 "
        "(the wait is the dispatcher's own); workers 1",
        venv("bentoml"),
        ("own-json",),
        _bentoml,
        health="/readyz",
        infer="/predict",
    ),
    Server(
        "LitServe 0.2.19",
        f"max_batch_size {MAX_BATCH}, batch_timeout {MAX_WAIT_MS} ms; "
        "1 API server, 1 inference worker",
        venv("litserve"),
        ("own-json",),
        _litserve,
        health="/health",
        infer="/predict",
    ),
    Server(
        "LitServe 0.2.19, fast_queue",
        "the same, with fast_queue=True (ZeroMQ queues)",
        venv("litserve"),
        ("own-json",),
        _litserve_fast,
        health="/health",
        infer="/predict",
    ),
]


# --- requests and answers -------------------------------------------------------------------


def request(kind: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """One request's body and headers for rows `x` in protocol `kind`."""
    if kind == "own-json":
        return json.dumps({"input": x.tolist()}).encode(), {"content-type": "application/json"}
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    if kind == "v2-json":
        body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
        return json.dumps(body).encode(), {"content-type": "application/json"}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + x.astype(np.float32).tobytes(), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def answer(kind: str, response: httpx.Response) -> np.ndarray:
    """The output rows of one answer, in whichever form the server gave them."""
    if response.status_code != 200:
        raise ValueError(f"status {response.status_code}: {response.text[:300]}")
    if kind == "own-json":
        data = response.json()
        return np.asarray(data["output"] if isinstance(data, dict) else data, dtype=np.float32)
    body = response.content
    length = response.headers.get("inference-header-content-length")
    head = json.loads(body[: int(length)] if length else body)
    out = head["outputs"][0]
    if "data" in out:
        values = np.asarray(out["data"], dtype=np.float32)
    else:
        size = out["parameters"]["binary_data_size"]
        values = np.frombuffer(body[int(length) : int(length) + size], dtype=np.float32)
    return values.reshape(out["shape"])


def check_answers(url: str, kind: str, model_path: Path, shape: tuple[int, ...]) -> str:
    """'' when the server's answers equal onnxruntime's, else what differed."""
    sys.path.insert(0, str(PEERS))
    from common import session

    sess = session(str(model_path))
    # The first row is the one in wrk's body (runtime_bench.bodies draws it so), then 15 more.
    rows = np.concatenate(
        [
            np.random.default_rng(0).standard_normal((1, *shape)),
            np.random.default_rng(1).standard_normal((15, *shape)),
        ]
    ).astype(np.float32)
    expected = sess.run(None, {"input": rows})[0]
    with httpx.Client(timeout=30) as client:

        def one(i: int) -> np.ndarray:
            body, headers = request(kind, rows[i : i + 1])
            return answer(kind, client.post(url, content=body, headers=headers))

        try:
            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(one, range(16)))
        except (ValueError, KeyError, httpx.HTTPError) as exc:
            return f"{type(exc).__name__}: {exc}"
    for i, g in enumerate(got):
        if g.shape != (1, *expected.shape[1:]) or not np.allclose(
            g[0], expected[i], rtol=1e-4, atol=1e-5
        ):
            return f"row {i}: got {g.ravel()[:4]}, onnxruntime {expected[i].ravel()[:4]}"
    return ""


def wrk_script(work: Path, model: str, kind: str, shape: tuple[int, ...]) -> Path:
    """The wrk script for `kind`: runtime_bench's own bodies for v2, a body of the same row
    for the peers' own JSON."""
    if kind != "own-json":
        return bodies(work, model, shape)["json" if kind == "v2-json" else "binary"]
    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    path = work / f"{model}.own.json"
    path.write_bytes(request(kind, x)[0])
    script = work / f"{model}-own.lua"
    script.write_text(LUA.format(body=path, ctype="application/json", extra=""))
    return script


# --- processes --------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree(leader: int) -> list[int]:
    """The leader's session (the server was started in a new one) and its descendants."""
    parents: dict[int, int] = {}
    members = {leader}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents[int(entry.name)] = int(fields[1])
                if int(fields[3]) == leader:
                    members.add(int(entry.name))
    grown = True
    while grown:
        children = {p for p, parent in parents.items() if parent in members} - members
        grown = bool(children)
        members |= children
    return sorted(p for p in members if p in parents)


def tree_cpu(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def label(pid: int) -> str:
    """A process's name for the CPU split: its script or module when it runs Python."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    for i, arg in enumerate(args):
        if arg.endswith(".py") or arg.endswith("/bentoml"):
            return Path(arg).name
        if arg in ("-m", "-c") and i + 1 < len(args):
            return f"python {arg} {args[i + 1][:40]}"
    return Path(args[0]).name


def split_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds by 'process name/thread name' over the tree (threads of one name summed)."""
    out: dict[str, float] = {}
    for pid in pids:
        try:
            process = label(pid)
            threads = thread_cpu(pid)
        except OSError:
            continue
        for key, seconds in threads.items():
            name = f"{process}/{key.split(' ', 1)[1]}"
            out[name] = out.get(name, 0.0) + seconds
    return out


def tree_status(pids: list[int]) -> tuple[float, set[str]]:
    """(VmHWM summed in MB, the CPU lists the processes may run on)."""
    peak, cpus = 0.0, set()
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) / 1024
            if line.startswith("Cpus_allowed_list:"):
                cpus.add(line.split()[1])
    return peak, cpus


def peer_batches(stats: Path) -> tuple[int, int]:
    """(runs, rows) the adapter's processes have counted so far."""
    runs = rows = 0
    for f in stats.parent.glob(f"{stats.name}.*"):
        parts = f.read_text().split()
        if len(parts) == 2:
            runs, rows = runs + int(parts[0]), rows + int(parts[1])
    return runs, rows


def stop(proc: subprocess.Popen[bytes]) -> None:
    pids = tree(proc.pid)
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    proc.wait()


# --- one server -------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    server: str
    protocol: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms: float = 0.0
    peak_mb: float = 0.0
    batch: float = 0.0
    processes: int = 0
    failure: str = ""
    split: dict[str, float] = field(default_factory=dict)  # CPU us per request by thread


def measure(
    server: Server,
    model: str,
    path: Path,
    work: Path,
    seconds: int,
    concurrency: int,
) -> list[Row]:
    shape = PLAN[model]
    rows = [Row(model, server.label, kind) for kind in server.protocols]
    if server.venv is not None and not (server.venv / ".installed").exists():
        pip_log = server.venv / "pip.log"
        why = pip_log.read_text().strip().splitlines()[-1:] if pip_log.exists() else []
        for row in rows:
            row.failure = f"not installed (`make peers`): {' '.join(why) or 'no environment'}"
        return rows
    port = free_port()
    launch = server.launch(model, path, port, work)
    stats = work / f"stats-{port}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PEER_STATS": str(stats),
        "PEER_MAX_BATCH": str(MAX_BATCH),
        "PEER_MAX_WAIT_MS": str(MAX_WAIT_MS),
        **launch.env,
    }
    if server.venv is not None:
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{server.venv / 'bin'}:{env['PATH']}"
    log = work / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *launch.cmd],
            env=env,
            cwd=launch.cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_serving(
                base + server.health.format(model=model),
                proc,
                START_TIMEOUT_S,
                what=server.label,
                logs=lambda: log.read_text(errors="replace")[-3000:],
            )
        except RuntimeError as exc:
            for row in rows:
                row.failure = f"did not start: {str(exc)[-600:]}"
            return rows
        url = base + server.infer.format(model=model)
        for row in rows:
            problem = check_answers(url, row.protocol, path, shape)
            if problem:
                row.failure = f"wrong answers: {problem}"
                continue
            script = wrk_script(work, model, row.protocol, shape)
            run_wrk(url, script, 4, 1)  # warm-up
            pids = tree(proc.pid)
            before = tree_cpu(pids)
            split_before = split_cpu(pids)
            batches = batch_stats(base) if server.venv is None else peer_batches(stats)
            try:
                row.rps, row.p50_ms, row.p99_ms, total, _ = run_wrk(
                    url, script, concurrency, seconds, timeout_s=WRK_TIMEOUT_S
                )
            except RuntimeError as exc:
                row.failure = str(exc).splitlines()[0]
                continue
            after = batch_stats(base) if server.venv is None else peer_batches(stats)
            pids = tree(proc.pid)
            row.cpu_ms = 1000 * (tree_cpu(pids) - before) / total
            split_after = split_cpu(pids)
            row.split = {
                name: 1e6 * (seconds - split_before.get(name, 0.0)) / total
                for name, seconds in sorted(split_after.items(), key=lambda kv: -kv[1])
                if seconds - split_before.get(name, 0.0) > 0
            }
            row.peak_mb, cpus = tree_status(pids)
            row.processes = len(pids)
            if cpus != {"0"}:
                row.failure = f"not pinned to CPU 0: {sorted(cpus)}"
            if server.venv is None:
                row.batch = (after[0] - batches[0]) / max(after[1] - batches[1], 1)
            else:
                row.batch = (after[1] - batches[1]) / max(after[0] - batches[0], 1)
            print(row, flush=True)
    finally:
        stop(proc)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=list(PLAN), default=["mlp", "convnet"])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", nargs="+", help="servers whose label contains one of these")
    parser.add_argument("--out")
    args = parser.parse_args()
    # A SIGTERM (a timeout's) stops the servers too, through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-peers-"))
    models = generate(work / "models", args.models)
    servers = [
        s for s in SERVERS if not args.only or any(w.lower() in s.label.lower() for w in args.only)
    ]
    limits, rows = [], []
    started = time.monotonic()
    for model in args.models:
        shape = PLAN[model]
        one = raw_limit(models[model], shape, 3)
        batched = raw_limit(models[model], shape, 3, batch=MAX_BATCH)
        limits.append(
            f"raw onnxruntime, {model}: {one:,.0f} runs/s at batch 1, "
            f"{batched:,.0f} rows/s at batch {MAX_BATCH} (CPU 0, one thread)"
        )
        print(limits[-1], flush=True)
        for server in servers:
            rows += measure(server, model, models[model], work, args.seconds, args.concurrency)

    table = [
        f"| model | server | protocol | req/s at c{args.concurrency} | p50 ms | p99 ms "
        "| CPU ms / req | peak MB (all processes) | processes | rows per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.failure:
            table.append(f"| {r.model} | {r.server} | {r.protocol} | {r.failure} ||||||")
            continue
        table.append(
            f"| {r.model} | {r.server} | {r.protocol} | {r.rps:,.0f} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {r.cpu_ms:.3f} | {r.peak_mb:.0f} | {r.processes} "
            f"| {r.batch:.1f} |"
        )
    split = ["Where the CPU went (us per request, by process/thread name, the five largest):", ""]
    for r in rows:
        if not r.failure:
            top = sorted(r.split.items(), key=lambda kv: -kv[1])[:5]
            parts = ", ".join(f"{name} {us:.0f}" for name, us in top)
            split.append(f"- {r.model}, {r.server}, {r.protocol}: {parts}")
    settings = ["| server | batching |", "|---|---|"]
    settings += [f"| {s.label} | {s.settings} |" for s in servers]
    report = "\n".join(
        [
            *limits,
            "",
            *table,
            "",
            *settings,
            "",
            *split,
            "",
            f"({time.monotonic() - started:.0f} s)",
        ]
    )
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
