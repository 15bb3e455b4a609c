"""The README's quickstart, followed on the local control plane as far as a simulated
kubelet lets it go: the namespace and the S3 credentials Secret (step 5), the model file
and its check (step 6), apply and `kubectl wait --for=condition=Ready` (step 7), each block
run as the README writes it; and `helm install` printing its NOTES (step 3, a dry run: the
operator here is the test's process, since kwok runs no container). Port-forward and the
answer (steps 8 and 9) need a real kubelet."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from e2e.cluster import build_binaries
from e2e.conftest import Cluster
from e2e.generate_models import generate
from e2e.operator_process import OperatorProcess
from tests.operator.test_readme import KUBEONNX, README, shell_blocks

ROOT = Path(__file__).resolve().parent.parent


def block_with(text: str) -> str:
    found = [b for b in shell_blocks(README) if text in b]
    assert len(found) == 1, f"one README block with {text!r}, found {len(found)}"
    return found[0]


def run(block: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, f"README block failed:\n{block}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_quickstart_up_to_the_kubelet(
    cluster: Cluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    bins = build_binaries()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubeonnx").write_text(f'#!/bin/sh\nexec {shlex.join(KUBEONNX)} "$@"\n')
    (bin_dir / "kubeonnx").chmod(0o755)
    for name in ("kubectl", "helm"):
        (bin_dir / name).symlink_to(bins[name])
    for name in ("examples", "charts", "crds"):
        (tmp_path / name).symlink_to(ROOT / name)
    generate(tmp_path / "models", ["mlp"])
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "KUBECONFIG": cluster.kubeconfig,
    }
    try:
        run(block_with("kubectl create namespace demo"), tmp_path, env)  # step 5
        run(block_with("cat > mlp.yaml"), tmp_path, env)  # step 6
        out = run(block_with("kubectl apply -f mlp.yaml"), tmp_path, env)  # step 7
        assert "mlp" in out and "True" in out, out
        url = cluster.kubectl(
            "get", "im", "mlp", "-n", "demo", "-o", "jsonpath={.status.url}"
        ).stdout
        assert url.strip() == "http://mlp.demo.svc.cluster.local/v2/models/mlp"
    finally:
        cluster.kubectl("delete", "namespace", "demo", "--wait=false", check=False)
    # step 3's install, as a dry run against this cluster: what it prints next
    env["REGISTRY"] = "registry.example.com/you"
    run(block_with("cat > my-values.yaml"), tmp_path, env)  # step 3's values file
    install = block_with("helm install kubeonnx charts/kubeonnx")
    line = " ".join(
        part.strip().rstrip("\\")
        for part in install.splitlines()
        if part.strip().startswith(("helm install", "--set", "-f"))
    )
    notes = run(line + " --dry-run=client", tmp_path, env)
    assert "kubectl -n kubeonnx-system rollout status deployment/kubeonnx" in notes, notes
    assert "no registry holds" not in notes  # the quickstart points the chart at your images
    assert "registry.example.com/you/kubeonnx-operator:0.1.0" in notes, notes
