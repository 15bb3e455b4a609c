"""The Gateway API's standard CRDs for the e2e suite: the Go module sigs.k8s.io/gateway-api at
the version pinned in e2e/versions.env (GATEWAY_API_VERSION), fetched through the Go module
proxy (`go mod download`), and its config/crd/standard/ kept in
~/.cache/kubeonnx/gateway-api-<version>/. Nothing of it is copied into the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from e2e.conftest import Cluster, eventually

E2E = Path(__file__).resolve().parent
MODULE = "sigs.k8s.io/gateway-api"
# The kinds the operator reads or writes (the standard channel has more).
CRDS = ("gatewayclasses", "gateways", "httproutes")
GROUP = "gateway.networking.k8s.io"


def version() -> str:
    for line in (E2E / "versions.env").read_text().splitlines():
        if line.startswith("GATEWAY_API_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("GATEWAY_API_VERSION is not in e2e/versions.env")


def crd_dir() -> Path:
    """The standard CRDs of the pinned version, downloaded once (moved into place whole)."""
    pinned = version()
    cache = Path(os.environ.get("KUBEONNX_CACHE", Path.home() / ".cache" / "kubeonnx"))
    target = cache / f"gateway-api-{pinned}"
    if all((target / f"{GROUP}_{crd}.yaml").exists() for crd in CRDS):
        return target
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    with tempfile.TemporaryDirectory() as work:
        found = subprocess.run(
            ["go", "mod", "download", "-json", f"{MODULE}@{pinned}"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        source = Path(json.loads(found.stdout)["Dir"]) / "config" / "crd" / "standard"
        staged = Path(work) / "crds"
        shutil.copytree(source, staged)
        for path in staged.rglob("*"):
            path.chmod(0o644 if path.is_file() else 0o755)  # the module cache is read-only
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staged), target)
    return target


def served(cluster: Cluster) -> bool:
    found = cluster.kubectl("get", "--raw", f"/apis/{GROUP}/v1", check=False)
    return found.returncode == 0 and all(crd in found.stdout for crd in CRDS)


def install(cluster: Cluster) -> None:
    directory = crd_dir()
    for crd in CRDS:
        cluster.kubectl("apply", "--server-side", "-f", str(directory / f"{GROUP}_{crd}.yaml"))
    names = [f"crd/{crd}.{GROUP}" for crd in CRDS]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    eventually(lambda: served(cluster), 60, what=f"{GROUP}/v1 served")


def uninstall(cluster: Cluster) -> None:
    names = [f"{crd}.{GROUP}" for crd in CRDS]
    cluster.kubectl("delete", "crd", *names, "--ignore-not-found", "--wait=true", "--timeout=60s")
    eventually(
        lambda: cluster.kubectl("get", "--raw", f"/apis/{GROUP}/v1", check=False).returncode,
        60,
        what=f"{GROUP}/v1 no longer served",
    )
