"""Operator benchmark on the local control plane, every figure from one run.

    .venv/bin/python benchmarks/operator_bench.py [--sizes 100 500] [--unrelated 5000]
        [--baseline DIR] [--out FILE.md] [--create server-side|client-side]
        [--floor-replicas rendered|0] [--keep-floor]

For each size N: the floor is one `kubectl apply --server-side` of the same manifests the
operator renders for N InferenceModels (Deployment, Service, HPA each), replicas as rendered,
so that the cluster starts the floor's pods as it starts the operator's; the operator run is
N InferenceModels applied at once the same way (`kubectl apply --server-side`: one request an
object, as the floor's), timed until every one has all three children and a written status.
Between the two windows the floor's models are left to start (every Deployment Available) and
then deleted, and each window opens once the API server is quiet, so that the operator's
window starts from the cluster the floor's started from (`--keep-floor` leaves the floor's
models running and waits for nothing, as measured before 2026-12-08: the floor's start-up
then falls in the operator's window). `--create client-side --floor-replicas 0` measures as
this benchmark did before these options (kubectl's client-side apply is a GET and a POST per
InferenceModel, one after the other, inside the operator's window; the floor's Deployments at
0 replicas start no pods).

Then the operator's peak RSS (VmHWM), and the API writes it makes over an
hour-equivalent of idle resyncs: restarted with resyncSeconds 1 and watched for 60 s, its
writes counted in the API server's audit log (the operator has an identity of its own).

Before any of that, --unrelated pods and as many Deployments (replicas 0) that are not the
operator's are created in a namespace of their own: a cluster where the operator is one
tenant among many. After the idle minute, the peak RSS of a restart into that cluster is
read for this tree and, with --baseline DIR (another checkout, e.g. `git worktree add`),
for that tree's operator on the same cluster, one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))
from kubeonnx_operator.config import OperatorConfig  # noqa: E402
from kubeonnx_operator.render import Model, render_children  # noqa: E402
from kubeonnx_operator.spec import parse_spec  # noqa: E402

from e2e import cluster as local_cluster  # noqa: E402
from e2e.operator_process import OperatorProcess  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from procstat import cpu_seconds, peak_mb  # noqa: E402

# Small requests: the test cluster's two CPU nodes hold 512 CPUs, and 600 models of the
# default 1 CPU would leave some Unschedulable.
SPEC = {
    "model": {"uri": "s3://models/bench/model.onnx"},
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
}


def inference_models(n: int) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "kubeonnx.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": f"m{i:04d}"},
            "spec": SPEC,
        }
        for i in range(n)
    ]


def unrelated_objects(n: int) -> list[dict[str, Any]]:
    labels = {"app": "someone-else"}
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"p{i:05d}", "labels": labels},
            # Bound to a node that does not exist: stored and listed, never run.
            "spec": {"nodeName": "elsewhere", "containers": [{"name": "c", "image": "busybox"}]},
        }
        for i in range(n)
    ]
    deployments = [idle_deployment(f"d{i:05d}", labels) for i in range(n)]
    return pods + deployments


def idle_deployment(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A Deployment of 0 replicas: stored, watched and listed, never run."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    }


def settle(state: local_cluster.ClusterState, quiet_s: float = 5) -> int:
    """Wait until the operator's writes stop for `quiet_s`; return the audit count."""
    settled, last = time.monotonic(), audit_writes(state)
    while time.monotonic() - settled < quiet_s:
        time.sleep(1)
        now = audit_writes(state)
        if now != last:
            settled, last = time.monotonic(), now
    return last


def restart_peak(work: Path, state: local_cluster.ClusterState, env: dict[str, str]) -> float:
    """Peak RSS (MB) of an operator started into the cluster as it is, once it settled."""
    work.mkdir()
    op = OperatorProcess(str(local_cluster.OPERATOR_KUBECONFIG), work, resyncSeconds=60)
    op.env.update(env)
    op.start()
    try:
        assert op.proc is not None
        time.sleep(5)
        settle(state)
        return peak_mb(op.proc.pid)
    finally:
        op.stop()


def audit_entries(state: local_cluster.ClusterState) -> list[str]:
    """The operator's writes so far as 'verb resource[/subresource]', Lease renewals (every
    2 s) left out."""
    path = Path(state.data_dir) / "audit.log"
    if not path.exists():
        return []
    out = []
    with path.open() as f:
        for line in f:
            ref = json.loads(line).get("objectRef", {})
            if ref.get("resource") != "leases":
                sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
                out.append(f"{json.loads(line)['verb']} {ref.get('resource')}{sub}")
    return out


def audit_writes(state: local_cluster.ClusterState) -> int:
    return len(audit_entries(state))


def cpu_by_process(state: local_cluster.ClusterState, op: OperatorProcess) -> dict[str, float]:
    """CPU seconds so far of each control-plane process and of the operator."""
    pids = {name: state.pids[name] for name in state.running()}
    assert op.proc is not None
    pids["operator"] = op.proc.pid
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except OSError:  # ended meanwhile
            continue
    return out


def requests_by_verb(op: OperatorProcess) -> dict[str, float]:
    """The operator's own count of its API requests outside the watches, by verb (reads
    also by kind), and its reconciles."""
    out: dict[str, float] = {}
    for name, value in op.metrics().items():
        if name.startswith(
            (
                "kubeonnx_operator_api_writes_total",
                "kubeonnx_operator_api_reads_total",
                'kubeonnx_operator_reconciles_total{kind="InferenceModel"',
            )
        ):
            out[name.removeprefix("kubeonnx_operator_")] = value
    return out


def api_requests(kubectl) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The API server's own count of the requests it served, by verb and resource (every
    client's: the controllers', kubectl's and the operator's)."""
    out: dict[str, float] = {}
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        inside = line[line.index("{") + 1 : line.rindex("}")]
        labels = {k: v.strip('"') for k, v in (p.split("=", 1) for p in inside.split(","))}
        sub = labels.get("subresource", "")
        what = f"{labels['verb']} {labels['resource']}" + (f"/{sub}" if sub else "")
        out[what] = out.get(what, 0) + float(line.rsplit(" ", 1)[1])
    return out


def top_requests(calls: dict[str, float], n: int, count: int = 12) -> str:
    ranked = sorted(calls.items(), key=lambda kv: -kv[1])[:count]
    top = ", ".join(f"{k} {v / n:.2f}" for k, v in ranked)
    return f"{sum(calls.values()) / n:.1f} in all; {top}"


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def profile_line(what: str, cpu: dict[str, float], n: int) -> str:
    total = sum(cpu.values())
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
    return f"  {what}: CPU {total:.1f} s ({parts}); {1000 * total / n:.0f} ms a model"


def all_ready(kubectl, ns: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    ims = json.loads(kubectl("get", "inferencemodels", "-n", ns, "-o", "json"))["items"]
    return n == sum(
        1
        for im in ims
        for c in (im.get("status") or {}).get("conditions") or []
        if c["type"] == "Ready" and c["status"] == "True"
    )


def converged(kubectl, ns: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    ims = json.loads(kubectl("get", "inferencemodels", "-n", ns, "-o", "json"))["items"]
    with_status = sum(
        1
        for im in ims
        if (im.get("status") or {}).get("observedGeneration") == im["metadata"]["generation"]
    )
    kids = kubectl(
        "get",
        "deployments,services,horizontalpodautoscalers",
        "-n",
        ns,
        "-l",
        "app.kubernetes.io/managed-by=kubeonnx",
        "-o",
        "name",
    ).split()
    return with_status == n and len(kids) == 3 * n


MUTATING = ("POST ", "PUT ", "PATCH ", "APPLY ", "DELETE ")


def wait_quiet(kubectl, what: str, limit_s: float = 600) -> None:  # type: ignore[no-untyped-def]
    """Wait until the API server serves fewer than 5 writes a second (every client's, over
    5 s): what an earlier step set going (the unrelated objects' ReplicaSets, the pod
    garbage collector deleting the unrelated pods, which are bound to a node that does not
    exist; a deleted floor) is then done or nearly, and does not fall in the next window."""
    t0 = time.monotonic()
    before = api_requests(kubectl)
    while time.monotonic() - t0 < limit_s:
        time.sleep(5)
        now = api_requests(kubectl)
        writes = sum(v for k, v in delta(now, before).items() if k.startswith(MUTATING))
        if writes < 25:
            break
        before = now
    print(f"  quiet before {what} after {time.monotonic() - t0:.0f}s", flush=True)


def clear_floor(kubectl, ns: str) -> None:  # type: ignore[no-untyped-def]
    """Let the floor's models start, then delete them: the operator's window starts from the
    cluster the floor's started from. The floor's window ends when kubectl returns, before
    the cluster has started the floor's pods; left running, their ReplicaSets, pods,
    bindings, endpoints and status writes, and the HPA controller's reads of N more HPAs
    every 15 s, would fall inside the operator's window."""
    t0 = time.monotonic()
    kubectl("wait", "--for=condition=Available", "deployment", "--all", "-n", ns, "--timeout=900s")
    available_s = time.monotonic() - t0
    kubectl("delete", "namespace", ns, "--wait=true", "--timeout=900s")
    print(
        f"  the floor's Deployments were all available {available_s:.1f}s after its apply "
        f"returned; deleted {time.monotonic() - t0 - available_s:.1f}s later",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--unrelated", type=int, default=5000)
    parser.add_argument("--baseline", help="another checkout whose operator to measure too")
    parser.add_argument("--out")
    parser.add_argument(
        "--create",
        choices=["server-side", "client-side"],
        default="server-side",
        help="how kubectl creates the InferenceModels (the floor is always server-side)",
    )
    parser.add_argument(
        "--floor-replicas",
        choices=["rendered", "0"],
        default="rendered",
        help="the floor's Deployments start pods as rendered, or none",
    )
    parser.add_argument(
        "--keep-floor",
        action="store_true",
        help="leave the floor's models running while the operator's window is timed (as "
        "measured before 2026-12-08) instead of letting them start and deleting them first",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-opbench-"))
    state = local_cluster.up()
    op = None
    rows = []

    def kubectl(*a: str, input: str | None = None) -> str:
        return local_cluster.kubectl(state, *a, input=input)

    try:
        kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        kubectl("wait", "--for=condition=Established", "crd/inferencemodels.kubeonnx.io")
        if args.unrelated:
            kubectl("create", "namespace", "unrelated")
            noise = work / "unrelated.yaml"
            noise.write_text(yaml.safe_dump_all(unrelated_objects(args.unrelated)))
            t0 = time.monotonic()
            kubectl("apply", "-n", "unrelated", "--server-side", "-f", str(noise))
            print(f"{2 * args.unrelated} unrelated objects in {time.monotonic() - t0:.0f}s")
        op = OperatorProcess(str(local_cluster.OPERATOR_KUBECONFIG), work, resyncSeconds=60)
        op.start()
        assert op.proc is not None
        config = OperatorConfig()
        for n in args.sizes:
            floor_ns, op_ns = f"floor-{n}", f"op-{n}"
            kubectl("create", "namespace", floor_ns)
            kubectl("create", "namespace", op_ns)
            manifests = [
                c
                for d in inference_models(n)
                for c in render_children(
                    Model(d["metadata"]["name"], floor_ns, parse_spec(d["spec"])), config
                )
            ]
            if args.floor_replicas == "0":
                for manifest in manifests:
                    if manifest["kind"] == "Deployment":
                        manifest["spec"]["replicas"] = 0
            floor_file = work / f"floor-{n}.yaml"
            floor_file.write_text(yaml.safe_dump_all(manifests))
            if not args.keep_floor:
                wait_quiet(kubectl, "the floor")
            cpu0, api0 = cpu_by_process(state, op), api_requests(kubectl)
            t0 = time.monotonic()
            kubectl("apply", "--server-side", "--field-manager=floor", "-f", str(floor_file))
            floor_s = time.monotonic() - t0
            floor_cpu = delta(cpu_by_process(state, op), cpu0)
            floor_api = delta(api_requests(kubectl), api0)
            if not args.keep_floor:
                clear_floor(kubectl, floor_ns)
                wait_quiet(kubectl, "the operator run")

            ims = "\n---\n".join(json.dumps(d) for d in inference_models(n))
            cpu0, calls0 = cpu_by_process(state, op), requests_by_verb(op)
            api0 = api_requests(kubectl)
            t0 = time.monotonic()
            if args.create == "server-side":
                kubectl(
                    "apply",
                    "--server-side",
                    "--field-manager=bench",
                    "-n",
                    op_ns,
                    "-f",
                    "-",
                    input=ims,
                )
            else:
                kubectl("apply", "-n", op_ns, "-f", "-", input=ims)
            created_s = time.monotonic() - t0
            while not converged(kubectl, op_ns, n):
                time.sleep(0.5)
            op_s = time.monotonic() - t0
            op_cpu = delta(cpu_by_process(state, op), cpu0)
            calls = delta(requests_by_verb(op), calls0)
            op_api = delta(api_requests(kubectl), api0)
            rows.append((n, floor_s, op_s, peak_mb(op.proc.pid)))
            print(
                f"N={n}: floor {floor_s:.1f}s, operator {op_s:.1f}s "
                f"({op_s / floor_s:.2f}x), peak {rows[-1][3]:.0f} MB",
                flush=True,
            )
            # Where the time went (kubectl's own CPU is not counted: it is not a process of
            # the cluster), and what the operator asked of the API per model.
            print(
                f"  kubectl's apply of the {n} InferenceModels returned after {created_s:.1f}s "
                "of the operator run",
                flush=True,
            )
            print(profile_line("floor", floor_cpu, n), flush=True)
            print(profile_line("operator run", op_cpu, n), flush=True)
            print(f"  API requests a model, floor: {top_requests(floor_api, n)}", flush=True)
            print(f"  API requests a model, operator run: {top_requests(op_api, n)}", flush=True)
            print(
                "  operator requests a model: "
                + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(calls.items())),
                flush=True,
            )
            # The next size's floor, like this size's, starts from a cluster at rest.
            while not args.keep_floor and not all_ready(kubectl, op_ns, n):
                time.sleep(1)

        # Idle: an hour of 60 s resyncs, compressed to 60 s of 1 s resyncs; a restart first.
        # Every model Ready first, so that what follows is resyncs, not pods catching up.
        for n in args.sizes:
            while not all_ready(kubectl, f"op-{n}", n):
                time.sleep(1)
        op.stop()
        (work / "idle").mkdir()
        idle = OperatorProcess(
            str(local_cluster.OPERATOR_KUBECONFIG), work / "idle", resyncSeconds=1
        )
        before = audit_writes(state)
        idle.start()
        op = idle
        while not idle.leads():
            time.sleep(0.5)
        # What a restart writes (nothing but the Lease, which is not counted: each child
        # carries the digest of what was applied to it); then what 60 resyncs write.
        last = settle(state)
        restart_writes = last - before
        if restart_writes:
            from collections import Counter

            print(f"restart writes: {dict(Counter(audit_entries(state)[before:last]))}")
        time.sleep(60)
        idle_writes = audit_writes(state) - last
        if idle_writes:
            from collections import Counter

            print(f"idle writes: {dict(Counter(audit_entries(state)[last:]))}", flush=True)
        total = sum(args.sizes)
        print(
            f"restart: {restart_writes} writes; idle: {idle_writes} API writes by the "
            f"operator over 60 resyncs of {total} models",
            flush=True,
        )
        op.stop()
        peaks = {"this tree": restart_peak(work / "restart", state, {})}
        if args.baseline:
            base = Path(args.baseline).resolve()
            env = {"PYTHONPATH": f"{base / 'operator'}:{base / 'runtime'}"}
            peaks[f"baseline ({base.name})"] = restart_peak(work / "baseline", state, env)
        for who, mb in peaks.items():
            print(f"restart peak RSS, {who}: {mb:.0f} MB", flush=True)
    finally:
        if op is not None:
            op.stop()
        local_cluster.down()

    lines = [
        "| models | floor: kubectl apply --server-side (s) | operator: all children + "
        "status (s) | ratio | operator peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {f:.1f} | {o:.1f} | {o / f:.2f}x | {m:.0f} |" for n, f, o, m in rows]
    lines.append(
        f"\nIdle: **{idle_writes}** API writes by the operator over an hour-equivalent "
        f"of resyncs (60 x 1 s) of {total} models. The restart before it wrote "
        f"{restart_writes} (the Lease left out: each child carries the digest of what was "
        "applied to it)."
    )
    lines.append(
        f"\nPeak RSS of an operator restarted into the cluster ({total} models, "
        f"{args.unrelated} unrelated pods and {args.unrelated} unrelated Deployments): "
        + ", ".join(f"{who} **{mb:.0f} MB**" for who, mb in peaks.items())
        + "."
    )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
