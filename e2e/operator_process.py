"""Runs `kubeonnx operator` as a process, as it runs in production, for the e2e suite and demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from e2e.cluster import free_port
from e2e.serving import wait_serving


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
        self.env: dict[str, str] = {}  # added to the process's environment

    def start(self, on_spawn: Callable[[int], None] | None = None) -> None:
        """on_spawn: given the pid (its process group) before the wait, e.g. to record it."""
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.env}
        kubeonnx = str(Path(sys.executable).parent / "kubeonnx")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [kubeonnx, "operator", "--config", str(self.config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if on_spawn is not None:
            on_spawn(self.proc.pid)
        wait_serving(
            f"http://127.0.0.1:{self.health_port}/healthz",
            self.proc,
            60,
            what="the operator",
            logs=lambda: self.logs()[-3000:],
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def metrics(self) -> dict[str, float]:
        """The operator's /metrics as {'name{labels}': value}. A process that does not answer
        fails the test: read as empty, it would pass every "wrote nothing" check."""
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/metrics", timeout=10
            ) as response:
                text = response.read().decode()
        except OSError as exc:
            raise AssertionError(
                f"the operator's /metrics did not answer ({exc}):\n{self.logs()[-3000:]}"
            ) from exc
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def leads(self) -> bool:
        return self.metrics().get("kubeonnx_operator_leader") == 1.0

    def writes(self) -> float:
        return sum(
            v
            for k, v in self.metrics().items()
            if k.startswith("kubeonnx_operator_api_writes_total")
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
