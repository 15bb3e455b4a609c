"""The operator's connections to a real API server: a watch whose connection goes silent is
re-established, and twenty watched namespaces neither starve writes nor make leadership
flap."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from e2e.conftest import Cluster, eventually
from e2e.operator_process import OperatorProcess
from e2e.test_operator import children, model, ready

pytestmark = pytest.mark.e2e


class FreezingProxy:
    """A loopback TCP proxy to the API server. `freeze()` makes every connection open at
    that moment stop forwarding in both directions while staying open, as a half-open
    connection behind a dead NAT or load balancer does; later connections work."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen: set[int] = set()  # ids of the connection pairs that stay silent
        self.pairs: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.closed = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                pair_id = len(self.pairs)
                self.pairs[pair_id] = (client, upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair_id, src, dst), daemon=True).start()

    def _pump(self, pair_id: int, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while pair_id in self.frozen and not self.closed:
                    time.sleep(0.2)  # hold what was read: nothing more goes through
                if self.closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if pair_id not in self.frozen:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> int:
        with self.lock:
            self.frozen.update(self.pairs)
            return len(self.pairs)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for pair in self.pairs.values():
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.close()


def kubeconfig_via(cluster: Cluster, server: str, path: Path) -> str:
    config = json.loads(Path(cluster.operator_kubeconfig or cluster.kubeconfig).read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = server
    path.write_text(json.dumps(config))
    return str(path)


def api_server(cluster: Cluster) -> tuple[str, int]:
    config = json.loads(Path(cluster.kubeconfig).read_text())
    url = urlsplit(config["clusters"][0]["cluster"]["server"])
    assert url.hostname and url.port
    return url.hostname, url.port


@contextlib.contextmanager
def running(op: OperatorProcess) -> Iterator[OperatorProcess]:
    op.start()
    try:
        yield op
    finally:
        op.stop()
        print(op.logs()[-5000:])


def test_a_watch_whose_connection_goes_silent_is_re_established_and_misses_nothing(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    if not cluster.local:
        pytest.skip("the proxy stands between the operator and a loopback API server")
    cluster.kubectl("apply", "--server-side", "-f", str(Path(__file__).parent.parent / "crds"))
    proxy = FreezingProxy(api_server(cluster))
    kubeconfig = kubeconfig_via(cluster, f"https://127.0.0.1:{proxy.port}", tmp_path / "kc")
    op = OperatorProcess(kubeconfig, tmp_path, namespaces=[namespace], leaseName=f"w-{namespace}")
    # Each watch asks the API server to end it within 10-20 s (5-10 minutes in production),
    # so a silent one is noticed within 50 s (+30 s read margin) instead of 10.5 minutes.
    op.env["KUBEONNX_OPERATOR_WATCH_TIMEOUT_SECONDS"] = "10"
    try:
        with running(op):
            assert cluster.apply(model("before"), namespace).returncode == 0
            ready(cluster, namespace, "before")
            frozen = proxy.freeze()
            assert frozen >= 11  # every watch of the namespace, at least
            # Made while every watch of the operator hears nothing: only a watch that is
            # re-established (a relist) can learn of them.
            assert cluster.apply(model("during"), namespace).returncode == 0
            cluster.kubectl("delete", "inferencemodel", "before", "-n", namespace)
            ready(cluster, namespace, "during", timeout=180)
            assert "Deployment" in children(cluster, namespace, "during")
            # The relist also told the caches what vanished in the gap: the deleted model
            # is no longer watched (nor re-applied with its dead owner's UID).
            watched = 'kubeonnx_operator_watched_objects{resource="InferenceModel"}'
            eventually(lambda: op.metrics()[watched] == 1, 60, what="the deleted model forgotten")
            relists = op.metrics()['kubeonnx_operator_relists_total{resource="InferenceModel"}']
            assert relists >= 1
            eventually(
                lambda: not children(cluster, namespace, "before"),
                60,
                what="before's children gone",
            )
    finally:
        proxy.close()


def lease(cluster: Cluster, name: str) -> dict[str, object]:
    found = cluster.get("lease", name, "-n", "default")
    assert found, f"no Lease {name}"
    return dict(found["spec"])


def test_twenty_watched_namespaces_keep_leadership_steady_and_reconciles_going(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(Path(__file__).parent.parent / "crds"))
    extra = [f"e2e-many-{uuid.uuid4().hex[:6]}-{i}" for i in range(19)]
    for ns in extra:
        cluster.kubectl("create", "namespace", ns)
    namespaces = [namespace, *extra]
    name = f"many-{namespace}"
    # 20 namespaces x 11 kinds: 220 watches, each holding a connection (the old single
    # client's pool of 100 filled at 9 namespaces).
    op = OperatorProcess(
        cluster.operator_kubeconfig or cluster.kubeconfig,
        tmp_path,
        namespaces=namespaces,
        leaseName=name,
    )
    try:
        with running(op):
            eventually(op.leads, 180, interval=2, what="the operator leading")
            holder = lease(cluster, name)
            for ns in (namespaces[0], namespaces[9], namespaces[19]):
                assert cluster.apply(model("spread"), ns).returncode == 0
            for ns in (namespaces[0], namespaces[9], namespaces[19]):
                ready(cluster, ns, "spread", timeout=120)
            # Reconciles go on: a child deleted by hand in the last namespace comes back.
            cluster.kubectl("delete", "service", "spread", "-n", namespaces[19])
            eventually(
                lambda: cluster.get("service", "spread", "-n", namespaces[19]),
                60,
                what="the Service re-created",
            )
            # Leadership stayed put the whole time: the same holder, no transition, and the
            # operator never stopped leading (which it logs).
            # Renewals went on (one every retry period, so wait for the next rather than
            # assume the checks above took longer than one).
            now = eventually(
                lambda: (n := lease(cluster, name))["renewTime"] != holder["renewTime"] and n,
                30,
                what="a renewal of the Lease",
            )
            assert now["holderIdentity"] == holder["holderIdentity"]
            assert now.get("leaseTransitions") == holder.get("leaseTransitions")
            assert "lost the Lease" not in op.logs()
            assert op.leads()
    finally:
        for ns in extra:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
