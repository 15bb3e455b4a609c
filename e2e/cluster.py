"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, and kwok standing in for nodes and kubelets.

    python -m e2e.cluster up      # builds missing binaries, starts, writes .cluster/kubeconfig
    python -m e2e.cluster dev     # `make dev`: up, the CRDs and the operator, then what to type
    python -m e2e.cluster down    # stops every process it started (the operator too)

The cluster lives in .cluster/ (KUBEONNX_CLUSTER_DIR moves it, e.g. for the tests of `make dev`).

The pytest fixture in e2e/conftest.py calls the same `up` and `down`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("KUBEONNX_CLUSTER_DIR", ROOT / ".cluster")).resolve()
STATE_FILE = STATE_DIR / "state.json"
KUBECONFIG = STATE_DIR / "kubeconfig"
# A second identity for the operator, so its API writes can be told apart in the audit log.
OPERATOR_KUBECONFIG = STATE_DIR / "operator.kubeconfig"
OPERATOR_USER = "kubeonnx-operator"
E2E = Path(__file__).resolve().parent


def log(msg: str) -> None:
    # A closed terminal (SIGHUP) must not stop a clean-up half way.
    with contextlib.suppress(OSError):
        print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def build_binaries() -> dict[str, Path]:
    """Run the pinned build (a no-op when cached); return each binary's path. A failed build
    has said why on stderr (e.g. that Go is missing): exit with its status, no traceback."""
    build = subprocess.Popen(
        ["bash", str(E2E / "build-binaries.sh")], stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = build.communicate()
    except KeyboardInterrupt:
        # Ctrl-C reached the build too (the terminal's whole process group): it removes its
        # work folders and says so in one line; no traceback on top of it.
        build.wait()
        raise SystemExit(130) from None
    if build.returncode:
        raise SystemExit(build.returncode)
    dirs = dict(line.split("=", 1) for line in out.split() if "=" in line)
    paths = {}
    for var, names in {
        "KUBERNETES_BIN": [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ],
        "ETCD_BIN": ["etcd"],
        "KWOK_BIN": ["kwok", "stages.yaml", "metrics.yaml"],
        "HELM_BIN": ["helm"],
    }.items():
        for name in names:
            paths[name] = Path(dirs[var]) / name
    return paths


def _kubeconfig(server: str, user: str, token: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kubeonnx-e2e",
            "clusters": [
                {
                    "name": "kubeonnx-e2e",
                    "cluster": {"server": server, "insecure-skip-tls-verify": True},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kubeonnx-e2e",
                    "context": {"cluster": "kubeonnx-e2e", "user": user, "namespace": "default"},
                }
            ],
        },
        indent=2,
    )


PORT_LOCKS = Path(tempfile.gettempdir()) / "kubeonnx-ports"
_held_ports: dict[int, int] = {}  # port: the descriptor of its lock, oldest first
HELD_PORTS_MAX = 256  # locks held at once; each is a file descriptor


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except OSError:
        return 32768, 60999


def free_port() -> int:
    """A loopback port no other test process is given while this one holds it (until it
    exits, or has claimed HELD_PORTS_MAX more). Taken outside the kernel's ephemeral range,
    so no port-0 bind and no outgoing connection is given it meanwhile; claimed with a lock
    file that every test process honours; and free when handed out. (Binding port 0 and
    releasing it, as this did, let another test's server or client take the port before
    ours bound it.)"""
    low, _ = _ephemeral_range()
    first = 15000 if low > 20000 else 1024
    PORT_LOCKS.mkdir(exist_ok=True)
    candidates = list(range(first, low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _held_ports:
            continue
        fd = os.open(PORT_LOCKS / str(port), os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use by something that does not take our locks
                os.close(fd)
                continue
        if len(_held_ports) >= HELD_PORTS_MAX:  # the oldest has long been bound by its server
            os.close(_held_ports.pop(next(iter(_held_ports))))
        _held_ports[port] = fd
        return port
    raise RuntimeError(f"no free loopback port in {first}-{low - 1}")


@dataclass
class ClusterState:
    data_dir: str
    kubeconfig: str
    server: str
    token: str
    bin_dir: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)
    # Each process's identity when started (process_identity): `down` signals a pid only
    # while it is still that process, never one that took the pid over (after a reboot, an
    # OOM kill, a crash).
    started: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    # Who started it: "cluster-up", "dev", "demo" or "e2e" (the suite). `make demo` and the
    # e2e suite never take over the others'.
    owner: str = "cluster-up"

    def save(self) -> None:
        STATE_DIR.mkdir(exist_ok=True)
        STATE_FILE.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> ClusterState | None:
        if not STATE_FILE.exists():
            return None
        return cls(**json.loads(STATE_FILE.read_text()))

    def ours(self, name: str) -> bool:
        """Whether the process recorded as `name` still runs (and is the one started)."""
        pid, identity = self.pids.get(name), self.started.get(name)
        return pid is not None and identity is not None and process_identity(pid) == identity

    def running(self) -> list[str]:
        """The names of its processes that still run; none: a stale state, no cluster."""
        return [name for name in self.pids if self.ours(name)]


def running_state() -> ClusterState | None:
    """The cluster in STATE_DIR, or None when none is recorded or none of its processes
    still runs (a reboot, a `kill -9` of everything: the state file is only a leftover)."""
    state = ClusterState.load()
    return state if state is not None and state.running() else None


def process_identity(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: the boot and its start
    time (in clock ticks since boot, field 22 of /proc/PID/stat); None when none runs (a
    zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    if fields[0] == "Z":  # fields[0] is field 3 (the state), so field 22 is fields[19]
        return None
    return f"{boot}/{fields[19]}"


def _start(state: ClusterState, name: str, argv: list[str]) -> None:
    logf = open(Path(state.data_dir) / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        argv,
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    record(state, name, proc.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _wait(what: str, check, timeout: float, state: ClusterState | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        if state:
            for name, pid in state.pids.items():
                if not _alive(pid):
                    tail = (Path(state.data_dir) / f"{name}.log").read_text(errors="replace")[
                        -3000:
                    ]
                    raise RuntimeError(f"{name} exited while waiting for {what}:\n{tail}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}" + (f": {last}" if last else ""))


def _https_ok(url: str, token: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
        return bool(resp.status == 200)


def kubectl(state: ClusterState, *args: str, input: str | None = None) -> str:
    return subprocess.run(
        [state.bin_dir["kubectl"], "--kubeconfig", state.kubeconfig, *args],
        check=True,
        capture_output=True,
        text=True,
        input=input,
    ).stdout


NODE_READY_JSONPATH = (
    'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}'
)
NODES = [
    # name, gpu count, extra labels
    ("kwok-cpu-0", 0, {}),
    ("kwok-cpu-1", 0, {}),
    ("kwok-gpu-h100", 1, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
    ("kwok-gpu-a100", 4, {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}),
]


def node_manifest(name: str, gpus: int, labels: dict[str, str]) -> dict[str, object]:
    capacity = {"cpu": "256", "memory": "2Ti", "pods": "500", "ephemeral-storage": "10Ti"}
    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        **labels,
    }
    taints = []
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
        node_labels["nvidia.com/gpu.present"] = "true"
        node_labels["nvidia.com/gpu.count"] = str(gpus)
        taints.append({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels,
            "annotations": {
                "kwok.x-k8s.io/node": "fake",
                "node.alpha.kubernetes.io/ttl": "0",
                # Where metrics-server reads this node's kubelet /metrics/resource: kwok
                # serves every node's on its own port (--node-port), under the node's name.
                "metrics.k8s.io/resource-metrics-path": f"/metrics/nodes/{name}/metrics/resource",
            },
        },
        "spec": {"taints": taints},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "containerRuntimeVersion": "kwok",
            },
        },
    }


def _grant_chart_role(state: ClusterState, helm: Path) -> None:
    """Bind the operator's identity to the ClusterRole and the leader-election Role the Helm
    chart ships, and nothing more: whatever the e2e suite and the benchmarks see the
    operator do, the chart allows."""
    rendered = subprocess.run(
        [str(helm), "template", OPERATOR_USER, str(ROOT / "charts" / "kubeonnx"), "-n", "default"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    role = next(d for d in docs if d.get("kind") == "ClusterRole")
    lease_role = next(d for d in docs if d.get("kind") == "Role")
    kubectl(
        state,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [role, lease_role]}),
    )
    kubectl(
        state,
        "create",
        "clusterrolebinding",
        OPERATOR_USER,
        f"--clusterrole={role['metadata']['name']}",
        f"--user={OPERATOR_USER}",
    )
    kubectl(
        state,
        "create",
        "rolebinding",
        OPERATOR_USER,
        "-n",
        "default",
        f"--role={lease_role['metadata']['name']}",
        f"--user={OPERATOR_USER}",
    )


_locked = 0  # how deep this process is in `exclusive` (up's clean-up calls down)


@contextlib.contextmanager
def exclusive(command: str) -> Iterator[None]:
    """Hold the cluster directory's lock while starting or stopping its cluster: a second
    `make dev` (or a `make dev-down`) started meanwhile refuses in one line instead of
    starting a second control plane that the state file does not name."""
    global _locked
    if _locked:
        _locked += 1
        try:
            yield
        finally:
            _locked -= 1
        return
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:  # not inherited by the children
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"another command is starting or stopping the cluster in {STATE_DIR}:"
                f" `{command}` refused (run it again once that one is done)"
            ) from None
        _locked = 1
        try:
            yield
        finally:
            _locked = 0


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def front_proxy_certificates(pki: Path) -> dict[str, Path]:
    """The aggregation layer's certificates: a CA, and the client certificate kube-apiserver
    presents, signed by it, when it proxies a request to an aggregated API server
    (metrics-server's metrics.k8s.io), which trusts the CA through the
    extension-apiserver-authentication ConfigMap."""
    ca, ca_key = pki / "front-proxy-ca.crt", pki / "front-proxy-ca.key"
    cert, key, csr = (pki / f"front-proxy-client.{x}" for x in ("crt", "key", "csr"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "7",
             "-subj", "/CN=kubeonnx-front-proxy-ca")  # fmt: skip
    _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=front-proxy-client")
    ext = pki / "front-proxy-client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "7", "-extfile", str(ext))  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


def stop_command(owner: str) -> str:
    """The make target that stops a cluster `owner` started."""
    return {"dev": "dev-down", "demo": "demo-down"}.get(owner, "cluster-down")


def up(owner: str = "cluster-up", bins: dict[str, Path] | None = None) -> ClusterState:
    """Start the control plane; return its state. A running cluster is refused (it may hold
    the user's work), except one the same e2e suite or demo left when killed, which is
    stopped first; a stale state (none of its processes runs) is cleaned up. A second
    command starting or stopping it meanwhile is refused (`exclusive`)."""
    with exclusive(f"make {owner}"):
        return _start_cluster(owner, bins)


def _start_cluster(owner: str, bins: dict[str, Path] | None) -> ClusterState:
    existing = ClusterState.load()
    takes_over = existing is not None and existing.owner == owner and owner in ("e2e", "demo")
    if existing is not None and existing.running() and not takes_over:
        raise SystemExit(
            f"a cluster started by `make {existing.owner}` runs in {STATE_DIR} (export"
            f" KUBECONFIG={existing.kubeconfig}): `make {stop_command(existing.owner)}`"
            " stops it (and everything in it)"
        )
    if existing is not None:
        down()
    started = time.monotonic()
    bins = bins or build_binaries()
    # Named before it is made, inside the try that removes it: a Ctrl-C at any point after
    # its creation (before the state names it, or after) leaves no folder holding the admin
    # token behind.
    data = Path(tempfile.gettempdir()) / f"kubeonnx-cluster-{secrets.token_hex(8)}"
    try:
        return _up(owner, bins, data, started)
    except BaseException:
        down()  # the state's processes, once it names them
        shutil.rmtree(data, ignore_errors=True)
        KUBECONFIG.unlink(missing_ok=True)
        OPERATOR_KUBECONFIG.unlink(missing_ok=True)
        raise


def _up(owner: str, bins: dict[str, Path], data: Path, started: float) -> ClusterState:
    data.mkdir(mode=0o700)
    pki = data / "pki"
    pki.mkdir()
    token = secrets.token_hex(16)
    operator_token = secrets.token_hex(16)
    (data / "tokens.csv").write_text(
        f'{token},admin,admin,"system:masters"\n'
        # The operator's identity has no group: only the chart's ClusterRole (bound below).
        f"{operator_token},{OPERATOR_USER},{OPERATOR_USER}\n"
    )
    # The API writes the operator makes, and only those, go to the audit log: the operator
    # benchmark counts them.
    (data / "audit-policy.yaml").write_text(
        json.dumps(
            {
                "apiVersion": "audit.k8s.io/v1",
                "kind": "Policy",
                "omitStages": ["RequestReceived"],
                "rules": [
                    {
                        "level": "Metadata",
                        "users": [OPERATOR_USER],
                        "verbs": ["create", "update", "patch", "delete", "deletecollection"],
                    },
                    # Every Secret request of a service account (the chart's operator in
                    # e2e/test_chart.py): which verbs it tries, on which names.
                    {
                        "level": "Metadata",
                        "userGroups": ["system:serviceaccounts"],
                        "resources": [{"group": "", "resources": ["secrets"]}],
                    },
                    {"level": "None"},
                ],
            }
        )
    )
    subprocess.run(
        ["openssl", "genrsa", "-out", str(pki / "sa.key"), "2048"], check=True, capture_output=True
    )
    subprocess.run(
        ["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")],
        check=True,
        capture_output=True,
    )
    front_proxy = front_proxy_certificates(pki)
    ports = {k: free_port() for k in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok")}
    server = f"https://127.0.0.1:{ports['apiserver']}"
    STATE_DIR.mkdir(exist_ok=True)
    KUBECONFIG.write_text(_kubeconfig(server, "admin", token))
    OPERATOR_KUBECONFIG.write_text(_kubeconfig(server, OPERATOR_USER, operator_token))
    state = ClusterState(
        str(data),
        str(KUBECONFIG),
        server,
        token,
        {k: str(v) for k, v in bins.items()},
        ports=ports,
        owner=owner,
    )
    state.save()
    _start(
        state,
        "etcd",
        [
            str(bins["etcd"]),
            "--data-dir",
            str(data / "etcd"),
            "--name",
            "default",
            "--listen-client-urls",
            f"http://127.0.0.1:{ports['etcd']}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{ports['etcd']}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{ports['etcd-peer']}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{ports['etcd-peer']}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{ports['etcd-peer']}",
            "--listen-metrics-urls",
            "",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
    )
    _start(
        state,
        "kube-apiserver",
        [
            str(bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--cert-dir={pki}",
            f"--token-auth-file={data / 'tokens.csv'}",
            f"--audit-policy-file={data / 'audit-policy.yaml'}",
            f"--audit-log-path={data / 'audit.log'}",
            "--audit-log-format=json",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            # The aggregation layer (metrics.k8s.io from metrics-server, for the HPA):
            # requests proxied with the front proxy's client certificate and the
            # user in these headers.
            f"--requestheader-client-ca-file={front_proxy['ca']}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={front_proxy['cert']}",
            f"--proxy-client-key-file={front_proxy['key']}",
            "--v=1",
        ],
    )
    _wait("kube-apiserver", lambda: _https_ok(f"{server}/readyz", token), 90, state)
    kcm_kubeconfig = str(KUBECONFIG)
    _start(
        state,
        "kube-controller-manager",
        [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kcm']}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            "--controllers=*,-nodeipam,-persistentvolume-binder,-attachdetach,"
            "-persistentvolume-expander,-cloud-node-lifecycle,-ttl,-bootstrapsigner,-tokencleaner",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
            "--concurrent-gc-syncs=20",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--v=1",
        ],
    )
    _start(
        state,
        "kube-scheduler",
        [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            "--leader-elect=false",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--v=1",
        ],
    )
    _start(
        state,
        "kwok",
        [
            str(bins["kwok"]),
            f"--kubeconfig={kcm_kubeconfig}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--manage-nodes-with-label-selector=",
            "--cidr=10.244.0.0/16",
            # Each node's address and kubelet port are kwok's own server, which serves
            # the nodes' /metrics/resource (metrics.yaml) for metrics-server.
            "--node-ip=127.0.0.1",
            f"--node-port={ports['kwok']}",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--config={Path(bins['kwok']).parent / 'stages.yaml'}",
            f"--config={Path(bins['kwok']).parent / 'metrics.yaml'}",
        ],
    )
    nodes = "\n---\n".join(json.dumps(node_manifest(*n)) for n in NODES)
    kubectl(state, "apply", "-f", "-", input=nodes)
    kubectl(state, "apply", "-f", str(E2E / "manifests" / "keda-scaledobject-crd.yaml"))
    kubectl(state, "apply", "-f", str(E2E / "manifests" / "podmonitor-crd.yaml"))
    _wait(
        "default service account",
        lambda: "default" in kubectl(state, "get", "serviceaccount", "default", "-o", "name"),
        60,
        state,
    )
    _wait(
        "nodes Ready",
        lambda: (
            kubectl(
                state,
                "get",
                "nodes",
                "-o",
                NODE_READY_JSONPATH,
            ).split()
            == ["True"] * len(NODES)
        ),
        60,
        state,
    )
    kubectl(
        state,
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/scaledobjects.keda.sh",
        "crd/podmonitors.monitoring.coreos.com",
    )
    _grant_chart_role(state, bins["helm"])
    log(f"up in {time.monotonic() - started:.1f}s; kubeconfig: {KUBECONFIG}")
    return state


def start_operator(state: ClusterState, kubeconfig: str) -> None:
    """The operator as a process (as the demo and the e2e suite run it), recorded in the state
    so that `down` stops it before the API server it talks to: left running, it would log
    Lease errors every 2 s for ever."""
    from e2e.operator_process import OperatorProcess

    work = Path(state.data_dir) / "operator"
    work.mkdir(exist_ok=True)
    operator = OperatorProcess(kubeconfig, work)
    operator.start(on_spawn=lambda pid: record(state, "operator", pid))


def record(state: ClusterState, name: str, pid: int) -> None:
    state.pids[name] = pid
    identity = process_identity(pid)
    if identity is not None:
        state.started[name] = identity
    state.save()


def dev() -> None:
    """`make dev`: the control plane, the CRDs and the operator, then what to type next."""
    with exclusive("make dev"):
        state = up(owner="dev")
        try:
            kubectl(state, "apply", "--server-side", "-f", str(ROOT / "crds"))
            kubectl(
                state,
                "wait",
                "--for=condition=Established",
                "crd/inferencemodels.kubeonnx.io",
                "crd/quotapolicies.kubeonnx.io",
            )
            # The chart's RBAC, no more (the identity _grant_chart_role bound).
            start_operator(state, str(OPERATOR_KUBECONFIG))
        except BaseException:
            down()
            raise
    kubectl_bin, helm_bin = state.bin_dir["kubectl"], state.bin_dir["helm"]
    print(f"""
The local cluster is up: the CRDs are installed and the operator runs as a local process
(its log: {state.data_dir}/operator/operator.log).

    export KUBECONFIG={state.kubeconfig}
    export PATH={Path(kubectl_bin).parent}:{Path(helm_bin).parent}:$PATH
    # the pinned kubectl: {kubectl_bin}
    # the pinned helm:    {helm_bin}

Next:
    kubectl create namespace demo
    kubectl create secret generic s3-credentials -n demo \\
        --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...
    kubectl apply -n demo -f examples/cpu-hpa.yaml
    kubectl get im -n demo                  (REASON and MESSAGE say what is missing)
    kubectl describe im -n demo mlp-cpu
    make dev-down                           (stops the cluster and the operator)

Pods here are simulated (kwok, no kubelet, no container runtime): Ready means scheduled,
not serving; `kubectl logs`, `exec` and `port-forward` do not work. To see a model answer,
`make demo` runs the runtime as a local process with the Deployment's command (on a cluster
of its own: run it after `make dev-down`; it refuses to take this one over).""")


def _signal(pid: int, sig: int) -> None:
    """Signal the process group `pid` leads, or the process alone (the demo's runtime leads
    none)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def down(owner: str | None = None) -> bool:
    """Stop every process `up` started (and the operator `start_operator` started) and remove
    its data; safe to call twice. With an owner, refuse a running cluster someone else
    started. Whether there was a cluster (a state) to remove."""
    with exclusive(f"make {stop_command(owner or 'cluster-up')}"):
        return _stop_cluster(owner)


def _stop_cluster(owner: str | None) -> bool:
    state = ClusterState.load()
    if state is None:
        return False
    if owner is not None and state.owner != owner and state.running():
        raise SystemExit(
            f"the cluster in {STATE_DIR} was started by `make {state.owner}`, not `make {owner}`:"
            f" `make {stop_command(state.owner)}` stops it"
        )
    order = [
        "runtime",
        "operator",
        "kwok",
        "kube-scheduler",
        "kube-controller-manager",
        "kube-apiserver",
        "etcd",
    ]
    # Only the processes it started: a recorded pid now held by another process (after a
    # reboot, or a process that died) is left alone.
    names = [n for n in order if n in state.pids and state.ours(n)]
    pids = [state.pids[n] for n in names]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for name in names:
        if state.ours(name):
            _signal(state.pids[name], signal.SIGKILL)
    shutil.rmtree(state.data_dir, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    KUBECONFIG.unlink(missing_ok=True)
    OPERATOR_KUBECONFIG.unlink(missing_ok=True)
    log(f"down: stopped {', '.join(names)}" if names else "down: none of its processes was running")
    return True


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "up"
    try:
        if command == "up":
            # `make cluster-up`'s output is the kubeconfig's path (`make dev` and `make demo`
            # say it in their own words).
            print(up().kubeconfig)
        elif command == "dev":
            dev()
        elif command == "down":
            if not down(argv[1] if len(argv) > 1 else None):
                log(f"no cluster in {STATE_DIR}: nothing to stop")
        else:
            log(f"usage: python -m e2e.cluster up|dev|down [OWNER] (not {command!r})")
            return 2
    except KeyboardInterrupt:
        # up() and dev() have stopped what they had started: one line, no traceback.
        log(
            "interrupted: `make dev-down` finishes stopping it"
            if command == "down"
            else "interrupted: what it had started is stopped"
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
