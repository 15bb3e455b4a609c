"""Leader election against the real API server: a leader paused past its Lease (SIGSTOP)
writes nothing once it wakes, because its fence closed while it slept and the standby has
led since. The API server's audit log is the witness: every replica sends its identity in
its User-Agent, so each write is attributed to the process that made it."""

from __future__ import annotations

import json
import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import model, ready

pytestmark = pytest.mark.e2e


def audited_writes(cluster: Cluster, who: str) -> list[dict[str, Any]]:
    """The audit log's entries for writes whose User-Agent names `who` (a POD_NAME)."""
    assert cluster.audit_log is not None
    with cluster.audit_log.open() as f:
        entries = [json.loads(line) for line in f]
    return [e for e in entries if f"({who}_" in e.get("userAgent", "")]


def received(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))


def replica(cluster: Cluster, workdir: Path, pod: str, lease: str, ns: str) -> OperatorProcess:
    workdir.mkdir()
    op = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig, workdir, namespaces=[ns], leaseName=lease
    )
    op.env["POD_NAME"] = pod  # the identity, and so the User-Agent, starts with it
    return op


def test_a_leader_paused_past_its_lease_writes_nothing_after_the_standby_took_over(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    if not cluster.local:
        pytest.skip("needs the local control plane's audit log")
    cluster.kubectl("apply", "--server-side", "-f", str(Path(__file__).parent.parent / "crds"))
    tag = uuid.uuid4().hex[:6]
    lease = f"fence-{tag}"
    old = replica(cluster, tmp_path / "old", f"old-{tag}", lease, namespace)
    new = replica(cluster, tmp_path / "new", f"new-{tag}", lease, namespace)

    def scale_to(replicas: int) -> None:  # a new generation of the model
        cluster.kubectl(
            "patch",
            "inferencemodel",
            "fenced",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"scaling": {"maxReplicas": replicas}}}),
        )

    old.start()
    try:
        eventually(old.leads, 30, what="the first replica leading")
        new.start()
        assert cluster.apply(model("fenced", scaling={"maxReplicas": 2}), namespace).returncode == 0
        ready(cluster, namespace, "fenced")
        assert old.proc is not None
        os.killpg(old.proc.pid, signal.SIGSTOP)  # paused: no renewal, no write, no clock check
        try:
            eventually(new.leads, 60, what="the standby leading")
            # Work the paused leader would do at once if its fence let it: a new generation
            # (a Deployment to apply, a status to write) and a child deleted by hand.
            scale_to(3)
            cluster.kubectl("delete", "service", "fenced", "-n", namespace)
            ready(cluster, namespace, "fenced")
            eventually(
                lambda: cluster.get("service", "fenced", "-n", namespace),
                30,
                what="the standby re-creating the Service",
            )
            woke = datetime.now(UTC)
        finally:
            os.killpg(old.proc.pid, signal.SIGCONT)
        # The woken replica's window to misbehave in, waited for, not timed: its watches
        # deliver the change made while it slept, until its elector finds the Lease lost.
        eventually(lambda: "lost the Lease" in old.logs(), 120, what="the old replica losing")
        # Then one more change, which its watch delivers too (a replica that kept writing
        # would apply it), made by the standby: once the standby's write of it is in the
        # audit log, so is any the woken replica sent before it.
        changed = datetime.now(UTC)
        scale_to(2)
        eventually(
            lambda: any(
                received(e) >= changed and e["objectRef"].get("resource") != "leases"
                for e in audited_writes(cluster, f"new-{tag}")
            ),
            120,
            what="the standby applying the last change",
        )
        late = [
            (e["verb"], e["objectRef"].get("resource"), e["responseStatus"].get("code"))
            for e in audited_writes(cluster, f"old-{tag}")
            if received(e) >= woke
            # A renewal begun before the pause may still be sent; the API server refuses it
            # (409: the Lease changed hands), and a refused request wrote nothing.
            and not (
                e["objectRef"].get("resource") == "leases" and e["responseStatus"]["code"] == 409
            )
        ]
        assert late == [], f"the replica that lost the Lease wrote after it woke: {late}"
        assert new.leads() and not old.leads()
        # The witness can see both replicas: each wrote while it led.
        assert any(received(e) < woke for e in audited_writes(cluster, f"old-{tag}"))
        # The standby re-created the Service deleted by hand (a child the old leader applied
        # and the standby finds unchanged it leaves as it is: nothing else need be written).
        assert any(
            e["objectRef"].get("resource") == "services"
            for e in audited_writes(cluster, f"new-{tag}")
        )
    finally:
        new.stop()
        old.stop()
        print(old.logs()[-3000:])


def test_a_leader_stopped_cleanly_hands_the_lease_back(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    lease = f"handback-{uuid.uuid4().hex[:6]}"
    op = replica(cluster, tmp_path / "op", "handback", lease, namespace)
    op.start()
    try:
        eventually(op.leads, 30, what="the replica leading")
        held = cluster.get("lease", lease, "-n", "default")
        assert held and held["spec"]["holderIdentity"].startswith("handback_")
    finally:
        op.stop()  # SIGTERM
    # No holder, and a 1 s duration: a standby takes over at its next try, not 15 s later.
    spec = (cluster.get("lease", lease, "-n", "default") or {})["spec"]
    assert not spec.get("holderIdentity") and spec["leaseDurationSeconds"] == 1
