"""An API served by a local process through the test cluster's aggregation layer
(metrics-server's metrics.k8s.io, KEDA's adapter's external.metrics.k8s.io).

kube-apiserver reaches the process as an APIService whose Service is of type ExternalName
`localhost` (the aggregator proxies to https://<externalName>:<port>): a Service's
Endpoints may not be loopback addresses, and there is no kube-proxy here."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

Kubectl = Callable[..., Any]  # (*args, input=None) -> CompletedProcess, not raising


def registration(
    group: str, version: str, namespace: str, service: str, port: int
) -> list[dict[str, Any]]:
    """The Service and the APIService that route `group`/`version` to 127.0.0.1:`port`."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "namespace": namespace},
            "spec": {"type": "ExternalName", "externalName": "localhost"},
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": f"{version}.{group}"},
            "spec": {
                "group": group,
                "version": version,
                "service": {"namespace": namespace, "name": service, "port": port},
                # The process's certificate is self-signed: loopback only.
                "insecureSkipTLSVerify": True,
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]


def register(kubectl: Kubectl, objects: list[dict[str, Any]]) -> None:
    applied = kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in objects))
    assert applied.returncode == 0, applied.stderr


def wait_available(
    kubectl: Kubectl,
    apiservice: str,
    proc: subprocess.Popen[bytes],
    what: str,
    logs: Callable[[], str],
    timeout: float,
) -> None:
    """Until kube-apiserver says the APIService is Available (it has reached the process);
    the process's log when it exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    conditions: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited:\n{logs()}")
        got = kubectl("get", "apiservice", apiservice, "-o", "json")
        if got.returncode == 0:
            conditions = json.loads(got.stdout).get("status", {}).get("conditions", [])
            if any(c["type"] == "Available" and c["status"] == "True" for c in conditions):
                return
        time.sleep(1)
    raise AssertionError(
        f"APIService {apiservice} not Available in {timeout:g}s: {conditions}\n{logs()}"
    )


def unregister(kubectl: Kubectl, apiservice: str, namespace: str, service: str) -> None:
    """First, before the process stops: an APIService without its server makes every
    client's discovery report its group as unavailable."""
    kubectl("delete", "apiservice", apiservice, "--ignore-not-found")
    kubectl("delete", "service", service, "-n", namespace, "--ignore-not-found")
