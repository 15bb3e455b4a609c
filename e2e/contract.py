"""Run a Deployment's runtime container as a local process, as the kubelet would run it.

Taken verbatim from the pod spec: command, args, environment (Secret references resolved),
the probes' paths. Translated, as a kubelet provides them: each volume mount path and the
termination message path become local directories or files, the container port becomes a
free loopback port (named ports resolved), and the process listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e.cluster import free_port
from e2e.serving import wait_serving


@dataclass
class LocalContainer:
    proc: subprocess.Popen[bytes]
    port: int
    container: dict[str, Any]
    termination_log: Path
    log_path: Path
    named_ports: dict[str, int]  # the container's named ports, as local loopback ports

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where the container's `metrics` port serves /metrics (not the http port)."""
        return f"http://127.0.0.1:{self.named_ports['metrics']}/metrics"

    def probe(self, kind: str, timeout: float = 120) -> float:
        """Poll the container's own probe until it passes; return the seconds it took."""
        return wait_serving(
            f"{self.url}{self.container[kind]['httpGet']['path']}",
            self.proc,
            timeout,
            what=f"the runtime (its {kind})",
            logs=self.logs,
        )

    def logs(self) -> str:
        term = self.termination_log.read_text() if self.termination_log.exists() else ""
        return f"{term}\n{self.log_path.read_text(errors='replace')[-3000:]}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def resolve_env(container: dict[str, Any], secrets: dict[str, dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        data = (secrets.get(ref["name"]) or {}).get("data") or {}
        if ref["key"] in data:
            env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        elif not ref.get("optional"):
            raise AssertionError(f"Secret {ref['name']} has no key {ref['key']}")
    return env


def run_container(
    deployment: dict[str, Any],
    secrets: dict[str, dict[str, Any]],
    workdir: Path,
    container_name: str = "runtime",
    config_maps: dict[str, dict[str, Any]] | None = None,
) -> LocalContainer:
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == container_name)
    env = resolve_env(container, secrets)

    # Volumes: each mount path maps to a local directory; rewrite paths under it.
    mounts = {
        m["mountPath"]: workdir / "volumes" / m["name"] for m in container.get("volumeMounts", [])
    }
    term_path = container.get("terminationMessagePath", "/dev/termination-log")
    local_term = workdir / "termination-log"
    for local in mounts.values():
        local.mkdir(parents=True, exist_ok=True)
    # A Secret volume's keys become files, as the kubelet writes them (the quota file).
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("secret")
        if source:
            secret = secrets[source["secretName"]]
            for key, value in (secret.get("data") or {}).items():
                (mounts[mount["mountPath"]] / key).write_bytes(base64.b64decode(value))
        source = volumes.get(mount["name"], {}).get("configMap")
        if source:  # its items' keys, written to their paths
            data = (config_maps or {})[source["name"]].get("data") or {}
            for item in source.get("items") or [{"key": k, "path": k} for k in data]:
                (mounts[mount["mountPath"]] / item["path"]).write_text(data[item["key"]])
        projected = volumes.get(mount["name"], {}).get("projected")
        for part in (projected or {}).get("sources", []):  # the quota file and tenants' keys
            ((kind, ref),) = part.items()
            if kind == "secret":
                found = secrets.get(ref["name"]) or {}
                data = {k: base64.b64decode(v) for k, v in (found.get("data") or {}).items()}
            else:
                found = (config_maps or {}).get(ref["name"]) or {}
                data = {k: v.encode() for k, v in (found.get("data") or {}).items()}
            for item in ref.get("items") or [{"key": k, "path": k} for k in data]:
                if item["key"] not in data:
                    assert ref.get("optional"), f"{kind} {ref['name']} has no key {item['key']}"
                    continue  # the kubelet leaves an optional one out
                target = mounts[mount["mountPath"]] / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[item["key"]])

    def translate(value: str) -> str:
        if value == term_path:
            return str(local_term)
        for mount, local in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        return value

    env = {k: translate(v) for k, v in env.items()}
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    local = {str(port): str(free_port()) for port in ports.values()}  # http, metrics
    local_port = int(local[str(ports["http"])])
    env = {k: local.get(v, v) if k.endswith("_PORT") else v for k, v in env.items()}
    env["KUBEONNX_HOST"] = "127.0.0.1"

    command = container.get("command", []) + container.get("args", [])
    venv_bin = Path(sys.executable).parent
    command[0] = (
        shutil.which(command[0], path=f"{venv_bin}{os.pathsep}{os.environ['PATH']}") or command[0]
    )
    log_path = workdir / "runtime.log"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBEONNX_", "AWS_"))}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    named = {name: int(local[str(port)]) for name, port in ports.items() if name}
    return LocalContainer(proc, local_port, container, local_term, log_path, named)
