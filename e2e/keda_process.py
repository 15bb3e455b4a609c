"""The real KEDA operator and its metrics adapter (the pinned build of e2e/build-binaries.sh)
as processes against the local control plane: no Pod, no ServiceAccount, the admin
kubeconfig; leader election off; their ports on free loopback ports.

KEDA's operator itself scales a Deployment between zero and one replica and back (and runs
the triggers); above one replica, the HPA it creates reads the external metric from KEDA's
adapter (KedaAdapterProcess), an aggregated API server (external.metrics.k8s.io) that asks
the operator for each trigger's value over its gRPC metrics service, with mutual TLS."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from e2e import aggregated_api
from e2e.cluster import E2E, free_port
from e2e.serving import wait_serving

NAMESPACE = "keda"  # KEDA's own namespace: where it would run, and its cluster objects
ADAPTER_SERVICE = "keda-operator-metrics-apiserver"  # the name KEDA's manifests give it
EXTERNAL_METRICS = "v1beta1.external.metrics.k8s.io"


def keda_dir() -> Path:
    """The directory holding the `keda` operator, its `keda-adapter` and `crds/` of the
    pinned version (built once, then cached)."""
    out = subprocess.run(
        ["bash", str(E2E / "build-binaries.sh"), "keda"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    dirs = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return Path(dirs["KEDA_BIN"])


def _certificates(certs: Path) -> None:
    """The mTLS material KEDA's gRPC metrics service loads at start (ca.crt, tls.crt,
    tls.key): one self-signed certificate, its own CA (without it the operator exits). The
    adapter presents the same certificate as its client's, and trusts it as the server's:
    valid for 127.0.0.1, the address it dials."""
    certs.mkdir(exist_ok=True)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=keda-operator",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(certs / "tls.key"),
            "-out",
            str(certs / "tls.crt"),
        ],
        check=True,
        capture_output=True,
    )
    (certs / "ca.crt").write_bytes((certs / "tls.crt").read_bytes())


def keda_env(kubeconfig: str) -> dict[str, str]:
    """What KEDA's operator and its metrics adapter both read: the cluster, every namespace
    watched, and the namespace KEDA itself lives in."""
    return {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "WATCH_NAMESPACE": "",  # every namespace
        "POD_NAMESPACE": NAMESPACE,
        "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
    }


class KedaProcess:
    def __init__(self, binary: Path, kubeconfig: str, workdir: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.grpc_port = free_port()
        self.log_path = workdir / "keda.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    def start(self) -> None:
        certs = self.certs
        _certificates(certs)
        env = keda_env(self.kubeconfig)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "--leader-elect=false",
                    f"--health-probe-bind-address=127.0.0.1:{self.health_port}",
                    f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
                    f"--metrics-service-bind-address=127.0.0.1:{self.grpc_port}",
                    f"--cert-dir={certs}",
                    f"--ca-dir={certs}",
                    "--zap-log-level=info",
                    "--zap-encoder=console",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_serving(
            f"http://127.0.0.1:{self.health_port}/readyz",
            self.proc,
            120,
            what="the KEDA operator",
            logs=lambda: self.logs()[-3000:],
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        _stop(self.proc)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class KedaAdapterProcess:
    """KEDA's metrics adapter serving external.metrics.k8s.io through the aggregation layer
    (e2e/aggregated_api.py), reading each trigger's value from `operator`'s gRPC metrics
    service on loopback (the mTLS material of the operator's certs/, as KEDA's manifests
    mount one Secret in both). Its own delegated authentication and authorization (who asks,
    through the front proxy's headers) use the admin kubeconfig.

    `kubectl(*args, input=None) -> CompletedProcess`: the cluster's kubectl, not raising."""

    def __init__(
        self, binary: Path, kubeconfig: str, workdir: Path, operator: KedaProcess, kubectl: Any
    ) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.operator = operator
        self.kubectl = kubectl
        self.secure_port = free_port()
        # Its own /metrics server listens on every interface (`:PORT`, no flag for the
        # address): a free port, so it never takes another process's.
        self.metrics_port = free_port()
        self.log_path = workdir / "keda-adapter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> KedaAdapterProcess:
        certs = self.operator.certs
        env = keda_env(self.kubeconfig)  # controller-runtime's client: the ScaledObjects
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    "--bind-address=127.0.0.1",
                    f"--secure-port={self.secure_port}",
                    # Serving: the same self-signed certificate (the APIService skips its
                    # verification, loopback only). gRPC client: ca.crt, tls.crt, tls.key
                    # of the directory --cert-dir names.
                    f"--cert-dir={certs}",
                    f"--tls-cert-file={certs / 'tls.crt'}",
                    f"--tls-private-key-file={certs / 'tls.key'}",
                    f"--metrics-service-address=127.0.0.1:{self.operator.grpc_port}",
                    f"--lister-kubeconfig={self.kubeconfig}",
                    f"--authentication-kubeconfig={self.kubeconfig}",
                    f"--authorization-kubeconfig={self.kubeconfig}",
                    f"--port={self.metrics_port}",
                    "--zap-log-level=info",
                    "--zap-encoder=console",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        aggregated_api.register(
            self.kubectl,
            aggregated_api.registration(
                "external.metrics.k8s.io", "v1beta1", NAMESPACE, ADAPTER_SERVICE, self.secure_port
            ),
        )
        aggregated_api.wait_available(
            self.kubectl,
            EXTERNAL_METRICS,
            self.proc,
            "KEDA's metrics adapter",
            lambda: self.logs()[-3000:],
            timeout,
        )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        aggregated_api.unregister(self.kubectl, EXTERNAL_METRICS, NAMESPACE, ADAPTER_SERVICE)
        _stop(self.proc)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
