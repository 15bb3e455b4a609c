"""`make demo`: kubeonnx's whole job on one machine, from nothing.

Brings up the local control plane (building the pinned binaries if needed), an S3 stand-in
holding a generated model, and the operator; applies examples/cpu-hpa.yaml; runs the runtime
exactly as the operator's Deployment says (e2e/contract.py); sends one inference; prints the
answer and `kubectl get inferencemodels`, printing each command it runs. On a terminal it
then waits for Ctrl-C; otherwise it stops at once. Ctrl-C, `kill` and a closed terminal all
stop what it started and remove its temporary folder (`make demo-down` cleans up after a
`kill -9`). It refuses to start over a cluster of `make dev` or `make cluster-up`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e import cluster as local_cluster
from e2e.contract import run_container
from e2e.generate_models import generate
from e2e.operator_process import OperatorProcess
from e2e.s3 import CREDENTIALS, LocalS3

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "demo"
EXAMPLE_ENDPOINT = "http://minio.storage.svc:9000"  # examples/cpu-hpa.yaml's, replaced


def say(msg: str) -> None:
    # A closed terminal (SIGHUP) must not stop the clean-up half way.
    with contextlib.suppress(OSError):
        print(msg, flush=True)


def step(msg: str) -> None:
    say(f"\n==> {msg}")


DEMO_POLICY = {
    "apiVersion": "kubeonnx.io/v1alpha1",
    "kind": "QuotaPolicy",
    "metadata": {"name": "demo-quota"},
    "spec": {
        "tenants": [
            {
                "name": "demo",
                "apiKeySecret": {"name": "demo-api-key", "key": "token"},
                "limits": [{"unit": "requests", "limit": 3, "window": "1m"}],
            }
        ]
    },
}


def eventually_quota(kubectl: Any, name: str) -> dict[str, Any]:
    """The model's Deployment once the operator has given it the quota file."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        deployment: dict[str, Any] = json.loads(
            kubectl("get", "deployment", name, "-n", NAMESPACE, "-o", "json")
        )
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if any(e["name"] == "KUBEONNX_QUOTA_CONFIG" for e in env):
            return deployment
        time.sleep(0.5)
    raise RuntimeError("the operator did not give the model its quota file within 60 s")


def operator_commands(config: Path) -> str:
    """The commands that write the operator's configuration file (it lives in the demo's
    temporary folder) and start the operator with it, one line each, to repeat them. The
    file goes to a new temporary folder, never the current one (the user's clone)."""
    lines = shlex.join(["printf", "%s\\n", *config.read_text().splitlines()])
    return (
        f'    $ config="$(mktemp -d)/{config.name}"\n'
        f'    $ {lines} > "$config"\n'
        f'    $ kubeonnx operator --config "$config"   (KUBECONFIG as above)'
    )


def interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # A state none of whose processes runs (a reboot, everything killed) is no cluster.
    existing = local_cluster.running_state()
    if existing is not None and existing.owner != "demo":
        down = local_cluster.stop_command(existing.owner)
        print(
            f"a cluster started by `make {existing.owner}` runs in {local_cluster.STATE_DIR}:"
            f" the demo does not tear it down. Stop it first (`make {down}`), then `make demo`.",
            file=sys.stderr,
        )
        return 1
    # Before anything starts: a machine without Go gets the build's one line, and nothing to undo.
    bins = local_cluster.build_binaries()
    # Ctrl-C, `kill` and a closed terminal all end in the `finally` below.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-demo-"))
    s3 = operator = runtime = None
    try:
        step("Control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes)")
        state = local_cluster.up(owner="demo", bins=bins)
        print(
            "    Pods here are simulated by kwok (no kubelet): Ready means scheduled, not\n"
            "    serving, and `kubectl logs` / `port-forward` do not work. The answer below comes\n"
            "    from the runtime run as a local process with the Deployment's command.\n"
            "    The commands this demo runs, to repeat them (kubectl is the pinned one:\n"
            f"    {state.bin_dir['kubectl']}):\n"
            f"    $ export KUBECONFIG={state.kubeconfig}"
        )

        def kubectl(*args: str, input: str | None = None, shown: str | None = None) -> str:
            """Run kubectl; print the command (or `shown`, its shell form) when it changes
            something."""
            if shown or args[0] in ("apply", "create", "patch", "wait"):
                say(f"    $ {shown or shlex.join(['kubectl', *args])}")
            return local_cluster.kubectl(state, *args, input=input)

        step("S3 stand-in on loopback, holding a model made by e2e/generate_models.py")
        models = generate(work / "models", ["mlp"])
        s3 = LocalS3().start()
        s3.put_models(models, keys={"mlp": "mlp/v1/model.onnx"})
        print(f"    s3://models/mlp/v1/model.onnx at {s3.endpoint}")

        step("Operator (kubeonnx operator) and the CRDs (InferenceModel, QuotaPolicy)")
        kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        kubectl(
            "wait",
            "--for=condition=Established",
            "crd/inferencemodels.kubeonnx.io",
            "crd/quotapolicies.kubeonnx.io",
        )
        operator = OperatorProcess(state.kubeconfig, work)
        # Recorded with the cluster, so that `make demo-down` stops it too.
        operator.start(on_spawn=lambda pid: local_cluster.record(state, "operator", pid))
        say(operator_commands(operator.config_path))

        step("kubectl apply -f examples/cpu-hpa.yaml, its S3 endpoint the stand-in's")
        example = (ROOT / "examples" / "cpu-hpa.yaml").read_text()
        assert EXAMPLE_ENDPOINT in example, f"examples/cpu-hpa.yaml lacks {EXAMPLE_ENDPOINT}"
        manifest = example.replace(EXAMPLE_ENDPOINT, s3.endpoint)
        name = yaml.safe_load(manifest)["metadata"]["name"]
        kubectl("create", "namespace", NAMESPACE)
        kubectl(
            "create",
            "secret",
            "generic",
            "s3-credentials",
            "-n",
            NAMESPACE,
            *[f"--from-literal={k}={v}" for k, v in CREDENTIALS.items()],
        )
        rewrite = f"sed 's#{EXAMPLE_ENDPOINT}#{s3.endpoint}#' examples/cpu-hpa.yaml"
        applied = kubectl(
            "apply",
            "-n",
            NAMESPACE,
            "-f",
            "-",
            input=manifest,
            shown=f"{rewrite} | kubectl apply -n {NAMESPACE} -f -",
        )
        print(applied.strip())
        kubectl("wait", "-n", NAMESPACE, "--for=create", "--timeout=60s", f"deployment/{name}")
        kubectl(
            "wait",
            "-n",
            NAMESPACE,
            "--for=jsonpath={.status.conditions[0].status}=True",
            "--timeout=60s",
            f"inferencemodel/{name}",
        )
        deployment = json.loads(kubectl("get", "deployment", name, "-n", NAMESPACE, "-o", "json"))

        step("The runtime, run exactly as the Deployment's container says")
        secret = json.loads(
            kubectl("get", "secret", "s3-credentials", "-n", NAMESPACE, "-o", "json")
        )
        runtime = run_container(deployment, {"s3-credentials": secret}, work)
        local_cluster.record(state, "runtime", runtime.proc.pid)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        say(
            "    a local process, not a pod: "
            + shlex.join([*container.get("command", []), *container.get("args", [])])
            + "\n    (its environment and files from the Deployment, the Secret's keys included)"
        )
        runtime.probe("startupProbe")
        runtime.probe("readinessProbe")
        print(f"    ready at {runtime.url} (in the cluster: the Service {name}.{NAMESPACE})")

        step(f"POST {runtime.url}/v2/models/{name}/infer  (Open Inference Protocol v2)")
        request = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": [0.1, 0.2, 0.3, 0.4, 1.0, -1.0, 0.5, 2.0],
                }
            ]
        }
        print("    request: " + json.dumps(request))
        answer = httpx.post(f"{runtime.url}/v2/models/{name}/infer", json=request, timeout=10)
        answer.raise_for_status()
        print("    answer:  " + json.dumps(answer.json()))

        step("A QuotaPolicy: tenant 'demo' may make 3 requests a minute")
        runtime.stop()
        runtime = None
        kubectl(
            "create",
            "secret",
            "generic",
            "demo-api-key",
            "-n",
            NAMESPACE,
            "--from-literal=token=demo-key",
        )
        policy = json.dumps(DEMO_POLICY)
        print(
            kubectl(
                "apply",
                "-n",
                NAMESPACE,
                "-f",
                "-",
                input=policy,
                shown=f"echo {shlex.quote(policy)} | kubectl apply -n {NAMESPACE} -f -",
            ).strip()
        )
        patch = json.dumps({"spec": {"quotaPolicy": DEMO_POLICY["metadata"]["name"]}})
        print(
            kubectl(
                "patch", "inferencemodel", name, "-n", NAMESPACE, "--type=merge", "-p", patch
            ).strip()
        )
        deployment = eventually_quota(kubectl, name)
        quota_config = json.loads(
            kubectl("get", "configmap", f"{name}-quota", "-n", NAMESPACE, "-o", "json")
        )
        api_key = json.loads(
            kubectl("get", "secret", "demo-api-key", "-n", NAMESPACE, "-o", "json")
        )
        runtime = run_container(
            deployment,
            {"s3-credentials": secret, "demo-api-key": api_key},
            work / "metered",
            config_maps={f"{name}-quota": quota_config},
        )
        local_cluster.record(state, "runtime", runtime.proc.pid)
        runtime.probe("startupProbe")
        runtime.probe("readinessProbe")
        for attempt in range(1, 5):
            answer = httpx.post(
                f"{runtime.url}/v2/models/{name}/infer",
                json=request,
                headers={"X-Api-Key": "demo-key"},
                timeout=10,
            )
            shown = {
                k: answer.headers[k]
                for k in ("retry-after", "ratelimit", "x-ratelimit-remaining", "x-ratelimit-reset")
                if k in answer.headers
            }
            print(f"    request {attempt}: {answer.status_code} {json.dumps(shown)}")
        print(f"    body:  {answer.text}")

        step("kubectl get inferencemodels,quotapolicies -A")
        print(kubectl("get", "inferencemodels,quotapolicies", "-A"))
        if sys.stdin.isatty():
            print(f"""How to go on (while this runs):
    export KUBECONFIG={state.kubeconfig}
    kubectl get inferencemodels -A      kubectl describe im {name} -n {NAMESPACE}
    curl {runtime.url}/v2/models/{name}
    make demo-down                        (stops everything if this process was killed)""")
            print("\nRunning; press Ctrl-C to stop everything.", flush=True)
            while True:
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 0  # stopped on purpose: Ctrl-C, `kill`, a closed terminal
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        step("Stopping")
        if runtime is not None:
            runtime.stop()
        if operator is not None:
            operator.stop()
        if s3 is not None:
            s3.stop()
        local_cluster.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
