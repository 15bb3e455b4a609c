"""A request to a model scaled to zero waits, and wakes it (spec.scaling.holdRequests), with
the real KEDA (e2e/keda_process.py), the real Prometheus and real processes:

- the operator renders the model (KEDA scales it to zero) with the router in front of it,
  its file, its PodMonitor and the ScaledObject's `held` trigger;
- a real `kubeonnx serve --role router` runs that file (its upstream a loopback port where
  no runtime runs yet) as its Deployment's container would, and the real Prometheus scrapes
  it with the labels its PodMonitor gives;
- a request sent to it is held: the held gauge, scraped, makes the trigger's query (as the
  operator wrote it) above 0, and the real KEDA scales the model's Deployment from 0 to 1;
- a runtime then started on the upstream's port answers the held request: 200.

This is the demand query evaluated by the real Prometheus over metrics a real process
exposes, waking a model at zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e.cluster import free_port
from e2e.conftest import Cluster, eventually
from e2e.generate_models import generate
from e2e.keda_process import KedaProcess
from e2e.operator_process import OperatorProcess
from e2e.prometheus import LocalPrometheus, Pod, pod_monitor_scrape_configs
from e2e.serving import wait_serving
from e2e.test_keda import (  # noqa: F401 (the module's fixtures)
    keda,
    keda_crds,
    operator,
    prometheus,
    replicas,
    until_keda_ready,
)
from e2e.test_operator import condition, until_reason

pytestmark = pytest.mark.e2e
KUBEONNX = str(Path(sys.executable).parent / "kubeonnx")
NAME = "held"
REQUEST = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}


def holding_model() -> dict[str, Any]:
    return {
        "apiVersion": "kubeonnx.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": f"s3://models/{NAME}/model.onnx"},
            "scaling": {
                "autoscaler": "keda",
                "minReplicas": 0,
                "maxReplicas": 2,
                "holdRequests": True,
            },
        },
    }


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith("KUBEONNX_")}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [KUBEONNX, *args], env={**base, **env}, stdout=out, stderr=subprocess.STDOUT
            )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def start_router(cluster: Cluster, ns: str, upstream: int, work: Path) -> tuple[Process, Pod]:
    """The router's container as its Deployment runs it, on loopback: the file from its
    ConfigMap with each version's Service replaced by `upstream`, its ports free ones."""
    config_map = cluster.get("configmap", f"{NAME}-router", "-n", ns)
    assert config_map is not None
    config = json.loads(config_map["data"]["router.json"])
    for version in config["versions"]:
        version["url"] = f"http://127.0.0.1:{upstream}"
    path = work / "router.json"
    path.write_text(json.dumps(config))
    deployment = cluster.get("deployment", f"{NAME}-router", "-n", ns)
    assert deployment is not None
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {str(p["containerPort"]): free_port() for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env = {k: str(ports.get(v, v)) if k.endswith("_PORT") else v for k, v in env.items()}
    env |= {"KUBEONNX_HOST": "127.0.0.1", "KUBEONNX_TERMINATION_LOG": str(work / "term")}
    args = [*container["args"][:-1], str(path)]  # the file given as the container's
    router = Process(args, env, work / "router.log")
    addresses = {
        p["name"]: f"127.0.0.1:{ports[str(p['containerPort'])]}" for p in container["ports"]
    }
    wait_serving(
        f"http://{addresses['http']}/v2/health/live",
        router.proc,
        120,
        what="the router",
        logs=router.logs,
        ok=lambda status: status == 200,
    )
    return router, Pod(f"{NAME}-router-0", container["name"], addresses)


def test_a_held_request_wakes_the_model_from_zero_and_is_answered(
    cluster: Cluster,
    operator: OperatorProcess,  # noqa: F811
    keda: KedaProcess,  # noqa: F811
    prometheus: LocalPrometheus,  # noqa: F811
    namespace: str,
    tmp_path: Path,
) -> None:
    work = tmp_path
    assert cluster.apply(holding_model(), namespace).returncode == 0
    until_keda_ready(cluster, keda, namespace, NAME)
    eventually(lambda: replicas(cluster, namespace, NAME) == 0, 120, what="KEDA at 0")
    until_reason(cluster, namespace, NAME, "ScaledToZero")
    so = cluster.get("scaledobject.keda.sh", NAME, "-n", namespace) or {}
    (held,) = [t for t in so["spec"]["triggers"] if t["name"] == "held"]
    query = held["metadata"]["query"]
    assert query in condition(cluster, namespace, NAME)["message"]  # says what wakes it
    # Service NAME (the Ingress's backend) goes to the router once it has a ready replica.
    eventually(
        lambda: (
            (cluster.get("service", NAME, "-n", namespace) or {})["spec"]["selector"]
            == {"kubeonnx.io/router": NAME}
        ),
        120,
        what="Service held selecting the router",
    )

    upstream = free_port()
    router, pod = start_router(cluster, namespace, upstream, work)
    runtime: Process | None = None
    answers: list[httpx.Response] = []
    sender: threading.Thread | None = None
    try:
        monitor = cluster.get("podmonitor", f"{NAME}-router", "-n", namespace)
        assert monitor is not None, "the operator wrote no PodMonitor for the router"
        prometheus.scrape(pod_monitor_scrape_configs(monitor, [pod]))
        assert prometheus.value(query) == 0  # scraped, nothing held

        def send() -> None:
            url = f"http://{pod.addresses['http']}/v2/models/{NAME}/infer"
            answers.append(httpx.post(url, json=REQUEST, timeout=600))

        sender = threading.Thread(target=send)
        sender.start()
        eventually(
            lambda: (prometheus.value(query) or 0) >= 1,
            120,
            what="the held request in Prometheus",
        )
        eventually(
            lambda: replicas(cluster, namespace, NAME) == 1,
            120,
            what="KEDA scaling the model to 1 on the held request",
        )
        assert answers == []  # still held: no runtime answers yet

        # The replica KEDA asked for, as a local process on the upstream's port.
        model = generate(work / "models", ["mlp"])["mlp"]
        runtime = Process(
            ["serve", "--model-uri", f"file://{model}", "--model-name", NAME],
            {
                "KUBEONNX_HOST": "127.0.0.1",
                "KUBEONNX_PORT": str(upstream),
                "KUBEONNX_CACHE_DIR": str(work / "cache"),
                "KUBEONNX_TERMINATION_LOG": str(work / "runtime-term"),
            },
            work / "runtime.log",
        )
        sender.join(300)
        assert not sender.is_alive(), router.logs()
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_name"] == NAME
        eventually(lambda: prometheus.value(query) == 0, 120, what="nothing held any more")
    finally:
        if sender is not None and sender.is_alive() and runtime is None:
            router.stop()  # the held request ends with the router
        if sender is not None:
            sender.join(60)
        if runtime is not None:
            runtime.stop()
        router.stop()
