"""`make demo`: kubeonnx's whole job on one machine, from nothing.

Brings up the local control plane (building the pinned binaries if needed), an S3 stand-in
holding a generated model, and the operator; applies examples/cpu-hpa.yaml; runs the runtime
exactly as the operator's Deployment says (e2e/contract.py); sends one inference; prints the
answer and `kubectl get inferencemodels`. On a terminal it then waits for Ctrl-C; otherwise
it stops at once. Either way it leaves nothing running (`make demo-down` also cleans up).
"""

from __future__ import annotations

import json
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


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


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


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-demo-"))
    s3 = operator = runtime = None
    try:
        step("Control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes)")
        state = local_cluster.up()

        def kubectl(*args: str, input: str | None = None) -> str:
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
        operator.start()

        step("kubectl apply -f examples/cpu-hpa.yaml")
        doc = yaml.safe_load((ROOT / "examples" / "cpu-hpa.yaml").read_text())
        doc["spec"]["model"]["s3"]["endpoint"] = s3.endpoint
        name = doc["metadata"]["name"]
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
        print(kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(doc)).strip())
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
        print(kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(DEMO_POLICY)).strip())
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
        print(f"""How to go on:
    export KUBECONFIG={state.kubeconfig}
    kubectl get inferencemodels -A      kubectl describe im {name} -n {NAMESPACE}
    curl {runtime.url}/v2/models/{name}
    make demo-down                        (stops everything if this process was killed)""")
        if sys.stdin.isatty():
            print("\nRunning; press Ctrl-C to stop everything.", flush=True)
            while True:
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        step("Stopping")
        if runtime is not None:
            runtime.stop()
        if operator is not None:
            operator.stop()
        if s3 is not None:
            s3.stop()
        local_cluster.down()


if __name__ == "__main__":
    sys.exit(main())
