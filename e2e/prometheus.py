"""A real Prometheus on loopback (the pinned build of e2e/build-binaries.sh) for the tests that
evaluate the project's PromQL: it scrapes local processes with the target labels the
Prometheus operator gives a PodMonitor's pods, on a short interval."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from e2e.cluster import E2E, free_port

SCRAPE_INTERVAL = "1s"  # a PodMonitor says 15s; the tests do not wait that long


def prometheus_binaries() -> Path:
    """The directory holding prometheus and promtool (built once, then cached)."""
    out = subprocess.run(
        ["bash", str(E2E / "build-binaries.sh"), "prometheus"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    dirs = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return Path(dirs["PROMETHEUS_BIN"])


@dataclass(frozen=True)
class Pod:
    """A local process standing for one pod: its name, the container's, and per named
    container port the loopback address it listens on."""

    name: str
    container: str
    addresses: dict[str, str]


def pod_monitor_scrape_configs(monitor: dict[str, Any], pods: list[Pod]) -> list[dict[str, Any]]:
    """The scrape configuration a PodMonitor becomes, for `pods` (which it selects): one job
    per endpoint, named and labelled as the Prometheus operator does (job "NS/NAME"; the
    target's namespace, pod, container and endpoint, i.e. the port's name). The operator
    discovers the pods and relabels; here the targets are static, with the same labels."""
    meta, spec = monitor["metadata"], monitor["spec"]
    namespace, name = meta["namespace"], meta["name"]
    jobs = []
    for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
        port = endpoint["port"]
        jobs.append(
            {
                "job_name": f"podMonitor/{namespace}/{name}/{i}",
                "metrics_path": endpoint.get("path", "/metrics"),
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "honor_labels": bool(endpoint.get("honorLabels", False)),
                "static_configs": [
                    {
                        "targets": [pod.addresses[port]],
                        "labels": {
                            "job": f"{namespace}/{name}",
                            "namespace": namespace,
                            "pod": pod.name,
                            "container": pod.container,
                            "endpoint": port,
                        },
                    }
                    for pod in pods
                ],
            }
        )
    return jobs


class PromQLError(Exception):
    pass


class LocalPrometheus:
    def __init__(self) -> None:
        self.bin = prometheus_binaries()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kubeonnx-prometheus-"))
        self.data = self.dir / "data"
        self.config_file = self.dir / "prometheus.yml"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write({"global": {"scrape_interval": SCRAPE_INTERVAL}, "scrape_configs": []})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "prometheus.log"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _write(self, config: dict[str, Any]) -> None:
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def check_config(self) -> subprocess.CompletedProcess[str]:
        """promtool's own verdict on the configuration as written."""
        return subprocess.run(
            [str(self.bin / "promtool"), "check", "config", str(self.config_file)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self) -> LocalPrometheus:
        """Start and wait until this process answers (not a server that took the port before
        ours could bind it: that one's data directory is not ours); on a taken port, retry
        on another."""
        for _ in range(5):
            if self._start_once():
                return self
            self.port = free_port()
        raise RuntimeError(f"prometheus did not answer as its own process:\n{self.logs()}")

    def _start_once(self) -> bool:
        with self.log_path.open("ab") as log:
            self.proc = proc = subprocess.Popen(
                [
                    str(self.bin / "prometheus"),
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(f"{self.url}/api/v1/status/flags", timeout=2)
            except httpx.HTTPError:
                answer = None
            if answer is None or answer.status_code == 503:  # not answering, or not ready yet
                time.sleep(0.1)
                continue
            flags = (answer.json().get("data") or {}) if answer.status_code == 200 else {}
            if flags.get("storage.tsdb.path") == str(self.data):  # ours, not a squatter
                return True
            break  # another server answers on the port
        self.stop(keep_dir=True)
        return False

    def scrape(self, scrape_configs: list[dict[str, Any]], timeout: float = 120) -> None:
        """Replace the scrape configuration (checked by promtool first), reload, and wait
        until every target has been scraped successfully."""
        self._write(
            {"global": {"scrape_interval": SCRAPE_INTERVAL}, "scrape_configs": scrape_configs}
        )
        checked = self.check_config()
        if checked.returncode != 0:
            raise AssertionError(f"promtool check config failed:\n{checked.stdout}{checked.stderr}")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        wanted = {
            target
            for job in scrape_configs
            for g in job["static_configs"]
            for target in g["targets"]
        }
        deadline = time.monotonic() + timeout
        active: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            active = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"][
                "activeTargets"
            ]
            up = {t["labels"]["instance"] for t in active if t["health"] == "up"}
            if up == wanted and len(active) == len(wanted):
                return
            time.sleep(0.2)
        raise AssertionError(f"targets not all up in {timeout:g}s: {active}\n{self.logs()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples); PromQLError if Prometheus refuses it."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = answer.json()
        if body.get("status") != "success":
            raise PromQLError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise PromQLError(f"{expr}: a {data['resultType']}, not a vector")
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The single sample's value of an instant query; None when the vector is empty."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {len(result)} samples, one expected: {result}"
        return float(result[0]["value"][1])

    def stop(self, keep_dir: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
