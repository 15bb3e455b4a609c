"""What creating an InferenceModel costs the API server, and which part of the CRD costs it.

    PYTHONPATH=operator:runtime .venv/bin/python benchmarks/crd_admission_bench.py \
        [--n 500] [--rounds 3] [--variants full no-cel ...] [--crd FILE]

On the local control plane (`e2e/cluster.py`), no operator running: N objects created by one
`kubectl apply --server-side` (one request an object, as operator_bench.py creates them), for
InferenceModels under variants of the CRD, each variant installed under a group of its own
(VARIANT.bench.kubeonnx.io) so that all are served at once:

- full: the CRD as it is;
- no-cel: every x-kubernetes-validations rule removed;
- no-cel-no-defaults: every rule and every default removed (the rules read defaulted fields,
  spec.scaling.minReplicas among them, so the defaults cannot go without them);
- preserve: no schema, x-kubernetes-preserve-unknown-fields at the root;

and, to compare, N ConfigMaps and N Deployments (replicas 0), and the full CRD created with
`kubectl create` (a POST an object, no managedFields built from the schema's structure).
The variants are run in turn, round after round, so that a busy spell on a shared machine
falls on all of them. Each run reports its seconds, the CPU seconds kube-apiserver, etcd and
kubectl used in it, and the API server's own time serving the requests
(apiserver_request_duration_seconds) and CEL's
(apiserver_cel_evaluation_duration_seconds, where the API server exports it).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from operator_bench import idle_deployment  # noqa: E402
from procstat import cpu_seconds  # noqa: E402

from e2e import cluster as local_cluster  # noqa: E402

SPEC = {  # operator_bench.py's
    "model": {"uri": "s3://models/bench/model.onnx"},
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
}


def _strip(node: Any, key: str) -> Any:
    """`node` without `key` at any depth."""
    if isinstance(node, dict):
        return {k: _strip(v, key) for k, v in node.items() if k != key}
    if isinstance(node, list):
        return [_strip(v, key) for v in node]
    return node


def _preserve(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


SCHEMA_VARIANTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "full": lambda s: s,
    "no-cel": lambda s: _strip(s, "x-kubernetes-validations"),
    "no-defaults": lambda s: _strip(s, "default"),
    "no-cel-no-defaults": lambda s: _strip(_strip(s, "x-kubernetes-validations"), "default"),
    "preserve": _preserve,
}
OTHER = ["configmaps", "deployments", "full-create"]
# Not run unless named: the rules read defaulted fields, so every object is refused.
NOT_BY_DEFAULT = ["no-defaults"]


def variant_crd(crd: dict[str, Any], variant: str) -> dict[str, Any]:
    group = f"{variant}.bench.kubeonnx.io"
    out = copy.deepcopy(crd)
    out["metadata"] = {"name": f"{crd['spec']['names']['plural']}.{group}"}
    out["spec"]["group"] = group
    for version in out["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        version["schema"]["openAPIV3Schema"] = SCHEMA_VARIANTS[variant](schema)
    return out


def objects(what: str, n: int) -> list[dict[str, Any]]:
    if what == "configmaps":
        return [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"m{i:04d}"},
                "data": {"uri": "s3://models/bench/model.onnx"},
            }
            for i in range(n)
        ]
    if what == "deployments":
        return [idle_deployment(f"m{i:04d}", {"app": "bench"}) for i in range(n)]
    variant = what.removesuffix("-create")
    return [
        {
            "apiVersion": f"{variant}.bench.kubeonnx.io/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": f"m{i:04d}"},
            "spec": SPEC,
        }
        for i in range(n)
    ]


def metric_sums(text: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Each series of the named metrics (histogram sums and counts), by its labels."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefixes) and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


SERVED = ("apiserver_request_duration_seconds_sum{", "apiserver_request_duration_seconds_count{")
CEL = (
    "apiserver_cel_evaluation_duration_seconds_sum",
    "apiserver_cel_evaluation_duration_seconds_count",
)
FIGURES = ("wall_s", "apiserver_cpu_s", "etcd_cpu_s", "kubectl_cpu_s", "served_s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v for v in [*SCHEMA_VARIANTS, *OTHER] if v not in NOT_BY_DEFAULT],
    )
    parser.add_argument("--crd", default=str(ROOT / "crds" / "inferencemodels.kubeonnx.io.yaml"))
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    crd = yaml.safe_load(Path(args.crd).read_text())
    state = local_cluster.up()
    runs: list[dict[str, Any]] = []

    def kubectl(*a: str, input: str | None = None) -> str:
        return local_cluster.kubectl(state, *a, input=input)

    try:
        crds = [
            variant_crd(crd, v)
            for v in SCHEMA_VARIANTS
            if v in args.variants or f"{v}-create" in args.variants
        ]
        kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crds))
        for c in crds:
            kubectl("wait", "--for=condition=Established", f"crd/{c['metadata']['name']}")
        time.sleep(5)  # discovery caught up
        apiserver, etcd = state.pids["kube-apiserver"], state.pids["etcd"]
        for r in range(args.rounds):
            for what in args.variants:
                ns = f"r{r}-{what}"
                kubectl("create", "namespace", ns)
                body = "\n---\n".join(json.dumps(o) for o in objects(what, args.n))
                verb = ["create"] if what.endswith("-create") else ["apply", "--server-side"]
                m0 = kubectl("get", "--raw", "/metrics")
                cpu0 = cpu_seconds(apiserver), cpu_seconds(etcd)
                kube0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.monotonic()
                try:
                    kubectl(*verb, "-n", ns, "-f", "-", input=body)
                except subprocess.CalledProcessError as e:
                    print(f"round {r} {what}: refused: {e.stderr.splitlines()[:2]}", flush=True)
                    continue
                wall = time.monotonic() - t0
                kube1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu1 = cpu_seconds(apiserver), cpu_seconds(etcd)
                m1 = kubectl("get", "--raw", "/metrics")
                served0, served1 = metric_sums(m0, SERVED), metric_sums(m1, SERVED)
                served = {k: v - served0.get(k, 0) for k, v in served1.items()}
                # The requests that created the objects: their verb is APPLY or POST, and
                # there are about N of them.
                creating = {
                    k: v
                    for k, v in served.items()
                    if "_sum{" in k
                    and ('verb="APPLY"' in k or 'verb="POST"' in k)
                    and served.get(k.replace("_sum{", "_count{"), 0) >= args.n * 0.9
                }
                cel0, cel1 = metric_sums(m0, CEL), metric_sums(m1, CEL)
                run = {
                    "round": r,
                    "what": what,
                    "wall_s": wall,
                    "apiserver_cpu_s": cpu1[0] - cpu0[0],
                    "etcd_cpu_s": cpu1[1] - cpu0[1],
                    "kubectl_cpu_s": (kube1.ru_utime + kube1.ru_stime)
                    - (kube0.ru_utime + kube0.ru_stime),
                    "served_s": sum(creating.values()),
                    "cel": {k: v - cel0.get(k, 0) for k, v in cel1.items() if v - cel0.get(k, 0)},
                }
                runs.append(run)
                print(
                    f"round {r} {what:20s} {wall:6.1f} s;"
                    f" CPU apiserver {run['apiserver_cpu_s']:5.1f}"
                    f" etcd {run['etcd_cpu_s']:4.1f} kubectl {run['kubectl_cpu_s']:4.1f};"
                    f" served {run['served_s']:5.1f} s; cel {run['cel']}",
                    flush=True,
                )
    finally:
        local_cluster.down()
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=1))
    print(f"\nmedians over {args.rounds} rounds, {args.n} objects a run:")
    print(
        "| objects | wall (s) | kube-apiserver CPU (s) | etcd CPU (s) | kubectl CPU (s) "
        "| served (s) |"
    )
    print("|---|---|---|---|---|---|")
    for what in args.variants:
        mine = [x for x in runs if x["what"] == what]
        if not mine:  # refused every time
            continue
        med = {k: statistics.median(x[k] for x in mine) for k in FIGURES}
        print(f"| {what} | " + " | ".join(f"{med[k]:.1f}" for k in FIGURES) + " |")


if __name__ == "__main__":
    main()
