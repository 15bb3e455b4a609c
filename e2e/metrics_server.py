"""metrics-server (the pinned build of e2e/build-binaries.sh) as a local process serving
metrics.k8s.io through the test cluster's aggregation layer: it reads each node's kubelet
/metrics/resource from kwok (pods' CPU and memory as kwok's ResourceUsage reports them), and
the HPA controller of the real kube-controller-manager reads it back through kube-apiserver.

kube-apiserver reaches it as an APIService whose Service is of type ExternalName
`localhost` (the aggregator proxies to https://<externalName>:<port>): a Service's
Endpoints may not be loopback addresses, and there is no kube-proxy here."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from e2e.cluster import E2E, free_port

APISERVICE = "v1beta1.metrics.k8s.io"
NAMESPACE, SERVICE = "kube-system", "metrics-server"
# The shortest resolution metrics-server takes: its window, and how often it scrapes.
RESOLUTION = "10s"


def metrics_server_binary() -> Path:
    out = subprocess.run(
        ["bash", str(E2E / "build-binaries.sh"), "metrics-server"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    dirs = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return Path(dirs["METRICS_SERVER_BIN"]) / "metrics-server"


def registration(port: int) -> list[dict[str, Any]]:
    """The Service and the APIService that route metrics.k8s.io to 127.0.0.1:`port`."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {"type": "ExternalName", "externalName": "localhost"},
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": APISERVICE},
            "spec": {
                "group": "metrics.k8s.io",
                "version": "v1beta1",
                "service": {"namespace": NAMESPACE, "name": SERVICE, "port": port},
                # Its certificate is self-signed (--cert-dir): loopback only.
                "insecureSkipTLSVerify": True,
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        },
    ]


class LocalMetricsServer:
    def __init__(self, kubeconfig: str, kubectl: Any) -> None:
        """`kubectl(*args, input=None) -> CompletedProcess`: the cluster's kubectl."""
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl
        self.bin = metrics_server_binary()
        self.dir = Path(tempfile.mkdtemp(prefix="kubeonnx-metrics-server-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "metrics-server.log"

    def logs(self) -> str:
        """The log's start (a refused flag is said there, before its usage) and its end."""
        text = self.log_path.read_text(errors="replace")
        return text if len(text) < 6000 else f"{text[:2000]}\n[...]\n{text[-4000:]}"

    def start(self, timeout: float = 180) -> LocalMetricsServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bin),
                    "--bind-address=127.0.0.1",
                    f"--secure-port={self.port}",
                    f"--cert-dir={self.dir / 'certs'}",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--authentication-kubeconfig={self.kubeconfig}",
                    f"--authorization-kubeconfig={self.kubeconfig}",
                    # kwok's server: each node's InternalIP and kubelet port (--node-ip,
                    # --node-port), the path its metrics.k8s.io/resource-metrics-path
                    # annotation names; plain HTTP.
                    "--kubelet-preferred-address-types=InternalIP",
                    "--kubelet-use-node-status-port",
                    "--deprecated-kubelet-completely-insecure",
                    f"--metric-resolution={RESOLUTION}",
                    "--kubelet-request-timeout=5s",  # under 90% of the resolution
                    "--v=2",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        applied = self.kubectl(
            "apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in registration(self.port))
        )
        assert applied.returncode == 0, applied.stderr
        self.wait_available(timeout)
        return self

    def wait_available(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        conditions: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"metrics-server exited:\n{self.logs()}")
            got = self.kubectl("get", "apiservice", APISERVICE, "-o", "json")
            if got.returncode == 0:
                conditions = json.loads(got.stdout).get("status", {}).get("conditions", [])
                if any(c["type"] == "Available" and c["status"] == "True" for c in conditions):
                    return
            time.sleep(1)
        raise AssertionError(
            f"APIService {APISERVICE} not Available in {timeout:g}s: {conditions}\n{self.logs()}"
        )

    def stop(self) -> None:
        """Unregister first: an APIService without its server makes every client's discovery
        report metrics.k8s.io as unavailable."""
        self.kubectl("delete", "apiservice", APISERVICE, "--ignore-not-found")
        self.kubectl("delete", "service", SERVICE, "-n", NAMESPACE, "--ignore-not-found")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
