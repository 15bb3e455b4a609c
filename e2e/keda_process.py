"""The real KEDA operator (the pinned build of e2e/build-binaries.sh) as a process against the
local control plane: no Pod, no ServiceAccount, the admin kubeconfig; leader election off;
its health, metrics and gRPC metrics-service ports on free loopback ports.

KEDA's operator itself scales a Deployment between zero and one replica and back (and runs
the triggers); above one replica, the HPA it creates reads KEDA's metrics adapter, which is
not run here."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from e2e.cluster import E2E, free_port
from e2e.serving import wait_serving

NAMESPACE = "keda"  # KEDA's own namespace: where it would run, and its cluster objects


def keda_dir() -> Path:
    """The directory holding the `keda` operator and `crds/` of the pinned version (built
    once, then cached)."""
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
    tls.key): one self-signed certificate, its own CA. Nothing connects to it here (the
    metrics adapter is not run), but without it the operator exits."""
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

    def start(self) -> None:
        certs = self.workdir / "certs"
        _certificates(certs)
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "WATCH_NAMESPACE": "",  # every namespace
            "POD_NAMESPACE": NAMESPACE,
            "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
        }
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
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
