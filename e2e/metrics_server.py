"""metrics-server (the pinned build of e2e/build-binaries.sh) as a local process serving
metrics.k8s.io through the test cluster's aggregation layer (e2e/aggregated_api.py): it
reads each node's kubelet /metrics/resource from kwok (pods' CPU and memory as kwok's
ResourceUsage reports them), and the HPA controller of the real kube-controller-manager
reads it back through kube-apiserver."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from e2e import aggregated_api
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
    return aggregated_api.registration("metrics.k8s.io", "v1beta1", NAMESPACE, SERVICE, port)


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
        aggregated_api.register(self.kubectl, registration(self.port))
        self.wait_available(timeout)
        return self

    def wait_available(self, timeout: float) -> None:
        assert self.proc is not None
        aggregated_api.wait_available(
            self.kubectl, APISERVICE, self.proc, "metrics-server", self.logs, timeout
        )

    def stop(self) -> None:
        """Unregister first: an APIService without its server makes every client's discovery
        report metrics.k8s.io as unavailable."""
        aggregated_api.unregister(self.kubectl, APISERVICE, NAMESPACE, SERVICE)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
