"""Fixtures of the e2e suite: the local control plane (or E2E_KUBECONFIG's cluster) and a
fresh namespace per test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from e2e import cluster as local_cluster
from e2e.operator_process import OperatorProcess

T = TypeVar("T")


@dataclass
class Cluster:
    kubeconfig: str
    kubectl_bin: str
    local: bool  # our own control plane (kwok nodes) rather than E2E_KUBECONFIG's
    operator_kubeconfig: str = ""  # an identity of the operator's own (local plane only)
    audit_log: Path | None = None  # the operator identity's API writes (local plane only)

    def operator_writes(self, namespace: str) -> int:
        """API writes the operator has made in `namespace`, from the audit log."""
        assert self.audit_log is not None
        if not self.audit_log.exists():
            return 0
        with self.audit_log.open() as f:
            return sum(
                1
                for line in f
                if json.loads(line).get("objectRef", {}).get("namespace") == namespace
            )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", self.kubeconfig, *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def get(self, *args: str) -> dict[str, Any] | None:
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def create_secret(self, name: str, namespace: str, data: dict[str, str]) -> None:
        literals = [f"--from-literal={k}={v}" for k, v in data.items()]
        self.kubectl("create", "secret", "generic", name, "-n", namespace, *literals)

    def apply(
        self, manifest: dict[str, Any] | str, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *ns, "-f", "-", input=text, check=False)


def eventually(
    check: Callable[[], T | None],
    timeout: float = 60,
    interval: float = 0.5,
    what: str = "condition",
) -> T:
    """Poll until `check` returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    external = os.environ.get("E2E_KUBECONFIG")
    if external:
        kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
        if not kubectl:
            kubectl = str(local_cluster.build_binaries()["kubectl"])
        yield Cluster(external, kubectl, local=False)
        return
    # A state none of whose processes runs (a reboot) is no cluster: `up` cleans it up.
    existing = local_cluster.running_state()
    if existing is not None and existing.owner != "e2e":
        down = local_cluster.stop_command(existing.owner)
        pytest.exit(
            f"a cluster started by `make {existing.owner}` runs in {local_cluster.STATE_DIR}: "
            f"the e2e suite does not take it over; `make {down}` stops it",
            returncode=2,
        )
    state = local_cluster.up(owner="e2e")
    try:
        yield Cluster(
            state.kubeconfig,
            state.bin_dir["kubectl"],
            local=True,
            operator_kubeconfig=str(local_cluster.OPERATOR_KUBECONFIG),
            audit_log=Path(state.data_dir) / "audit.log",
        )
    finally:
        local_cluster.down()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The CRDs installed and `kubeonnx operator` running as a process, per test module."""
    cluster.kubectl("apply", "--server-side", "-f", str(repo_root / "crds"))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/inferencemodels.kubeonnx.io",
        "crd/quotapolicies.kubeonnx.io",
    )
    op = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig, tmp_path_factory.mktemp("operator")
    )
    op.start()
    yield op
    op.stop()
    print(op.logs()[-5000:])
