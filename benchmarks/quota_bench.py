"""Quota benchmark: what enforcing a QuotaPolicy costs, against the same server without one,
in the same run.

    .venv/bin/python benchmarks/quota_bench.py [--seconds 8] [--rounds 2]

The tiny model (`mlp`, server overhead dominates, so the quota's share is the largest it can
be), binary tensors, batching on, concurrency 64 (`--concurrency 64 16` for several); server
pinned to CPU 0, wrk to CPU 1, a real redis-server unpinned. Three servers, measured in turn,
`--rounds` times over: no quota; a quota counted in memory; a quota counted in Redis (the
requests of a tenant that wait at once share one Lua round trip). Every request names a
tenant whose limits it never reaches, so each one is counted in two windows and admitted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_bench import bodies, run_wrk, serve_env, start

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from e2e.cluster import free_port
from e2e.generate_models import generate
from e2e.redis_server import LocalRedis

KEY = "bench-key"


def policy(work: Path, name: str, redis_url: str | None) -> Path:
    from kubeonnx_runtime.quota import key_hash

    limits = [
        {"unit": "requests", "limit": 10**12, "window": "1m"},
        {"unit": "rows", "limit": 10**12, "window": "1d"},
    ]
    config = {
        "policy": name,
        "namespace": "tests",
        "tenants": [{"name": "bench", "keySha256": [key_hash(KEY)], "limits": limits}],
    }
    if redis_url:
        # Open: a round trip over the 25 ms timeout admits the request unchecked instead of
        # failing it, and is counted; on 2 shared cores redis-server is sometimes starved.
        config["redis"] = {"url": redis_url}
        config["failureMode"] = "Open"
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def unchecked_count(metrics_url: str) -> float:
    import httpx

    text = httpx.get(metrics_url).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubeonnx_quota_decisions_total{") and "admitted_unchecked" in line
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-quota-bench-"))
    model = "mlp"
    path = generate(work / "models", [model])[model]
    script = bodies(work, model, (4,))["binary"]
    with script.open("a") as f:
        f.write(f'wrk.headers["X-Api-Key"] = "{KEY}"\n')
    redis = LocalRedis().start()
    configs = {
        "no quota": None,
        "quota, memory": policy(work, "memory", None),
        "quota, redis": policy(work, "redis", redis.url),
    }
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {
        (k, c): [] for c in args.concurrency for k in configs
    }
    kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
    try:
        for _ in range(args.rounds):
            for label, config in configs.items():
                port = free_port()
                env = {**serve_env(model, path, port, work), "KUBEONNX_MAX_BATCH_SIZE": "32"}
                if config is not None:
                    env["KUBEONNX_QUOTA_CONFIG"] = str(config)
                proc = start([kubeonnx, "serve"], f"http://127.0.0.1:{port}/v2/health/live", env)
                url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
                try:
                    run_wrk(url, script, 4, 1)  # warm-up
                    for c in args.concurrency:
                        before = unchecked_count(f"http://127.0.0.1:{port}/metrics")
                        rps, p50, p99, total, _ = run_wrk(url, script, c, args.seconds)
                        unchecked = unchecked_count(f"http://127.0.0.1:{port}/metrics") - before
                        results[(label, c)].append((rps, p50, p99))
                        print(
                            f"{label}, c{c}: {rps:,.0f} req/s, p50 {p50:.2f} ms, "
                            f"p99 {p99:.2f} ms, {unchecked:.0f} of {total} admitted unchecked "
                            "(Redis over 25 ms)",
                            flush=True,
                        )
                finally:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    finally:
        redis.stop()
    table = [
        "| server | c | req/s | p50 ms | p99 ms | req/s vs no quota | p50 added ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, c), runs in results.items():
        base = results[("no quota", c)]
        for (rps, p50, p99), (b_rps, b_p50, _) in zip(runs, base, strict=True):
            table.append(
                f"| {label} | {c} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / b_rps:.2f} | "
                f"{p50 - b_p50:+.2f} |"
            )
    print("\n" + "\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
