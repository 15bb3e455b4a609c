"""Runs `kubeonnx operator` as a process, as it runs in production, for the e2e suite and demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from e2e.cluster import free_port


class OperatorProcess:
    def __init__(self, kubeconfig: str, workdir: Path, **config: object) -> None:
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.health_port = free_port()
        self.config_path = workdir / "operator-config.yaml"
        self.config_path.write_text(
            yaml.safe_dump({"resyncSeconds": 5, "healthPort": self.health_port, **config})
        )
        self.log_path = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig}
        kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [kubeonnx, "operator", "--config", str(self.config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited:\n{self.logs()[-3000:]}")
            try:
                url = f"http://127.0.0.1:{self.health_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"operator not healthy in 60s:\n{self.logs()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
