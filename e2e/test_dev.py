"""The local test bed as a user's tool: `make dev` / `make dev-down`, and `make demo` leaving
no trap (it never takes over another's cluster; Ctrl-C or a closed terminal stops all it
started; a machine without Go gets one line). Each test has a cluster directory of its own
(KUBEONNX_CLUSTER_DIR), so none touches `.cluster/` or the suite's cluster."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from e2e.cluster import process_identity
from e2e.terminal import as_from_a_terminal

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
# `make` with the running venv, never reinstalling it (-o: its stamp counts as up to date).
MAKE = ["make", "-C", str(ROOT), f"VENV={VENV}", "-o", f"{VENV}/.installed"]


def env_for(cluster_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "KUBEONNX_CLUSTER_DIR": str(cluster_dir), **extra}


def state_of(cluster_dir: Path) -> dict[str, object]:
    state: dict[str, object] = json.loads((cluster_dir / "state.json").read_text())
    return state


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def processes_naming(*paths: str) -> list[str]:
    """Every live process whose command line names one of these paths."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(p in cmdline for p in paths) and alive(int(proc.name)):
            found.append(f"{proc.name}: {cmdline}")
    return found


def wait_gone(pids: list[int], timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def test_dev_up_demo_refuses_it_and_dev_down_stops_everything(tmp_path: Path) -> None:
    cluster_dir = tmp_path / "cluster"
    env = env_for(cluster_dir)
    dev = subprocess.run(
        [*MAKE, "dev"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    try:
        assert dev.returncode == 0, dev.stdout + dev.stderr
        state = state_of(cluster_dir)
        pids: dict[str, int] = state["pids"]  # type: ignore[assignment]
        assert state["owner"] == "dev"
        assert {"operator", "kube-apiserver", "etcd", "kwok"} <= set(pids), pids
        assert all(alive(p) for p in pids.values()), pids
        bins: dict[str, str] = state["bin_dir"]  # type: ignore[assignment]
        out = dev.stdout
        assert f"export KUBECONFIG={cluster_dir / 'kubeconfig'}" in out, out
        assert bins["kubectl"] in out and bins["helm"] in out, out
        assert "kubectl apply -n demo -f examples/cpu-hpa.yaml" in out, out
        assert "kubectl get im" in out and "make dev-down" in out, out
        assert "simulated (kwok" in out and "Ready means scheduled" in out, out
        assert "port-forward" in out, out
        # The CRDs are there and the operator answers (its health port, in its config).
        kubectl = [bins["kubectl"], "--kubeconfig", str(cluster_dir / "kubeconfig")]
        subprocess.run([*kubectl, "get", "crd", "inferencemodels.kubeonnx.io"], check=True)

        # A second `make dev` refuses, saying how to stop the first, and leaves it running
        # (it used to stop it, and everything applied to it, and start another).
        again = subprocess.run(
            [*MAKE, "dev"], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert again.returncode != 0, again.stdout + again.stderr
        assert "a cluster started by `make dev` runs" in again.stderr, again.stderr
        assert "`make dev-down` stops it" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr, again.stderr
        assert state_of(cluster_dir)["pids"] == pids
        assert all(alive(p) for p in pids.values()), pids

        # `make demo` refuses the dev cluster, and leaves it running.
        demo = subprocess.run(
            [sys.executable, "-m", "e2e.demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert demo.returncode == 1, demo.stdout + demo.stderr
        assert "make dev" in demo.stderr and "make dev-down" in demo.stderr, demo.stderr
        # `make demo-down` does not stop it either.
        demo_down = subprocess.run(
            [*MAKE, "demo-down"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert demo_down.returncode != 0
        assert "make dev-down" in demo_down.stderr, demo_down.stderr
        assert state_of(cluster_dir)["pids"] == pids
        assert all(alive(p) for p in pids.values()), pids
        subprocess.run([*kubectl, "get", "nodes"], check=True, capture_output=True)
    finally:
        down = subprocess.run(
            [*MAKE, "dev-down"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert wait_gone(list(pids.values())) == []
    assert not (cluster_dir / "state.json").exists()
    assert not Path(str(state["data_dir"])).exists()
    assert processes_naming(str(cluster_dir), str(state["data_dir"])) == []


def test_ctrl_c_during_make_dev_is_one_line_and_stops_what_it_started(tmp_path: Path) -> None:
    """Ctrl-C while `make dev` starts the control plane: what it started is stopped, one
    line says so (it printed a Python traceback)."""
    cluster_dir = tmp_path / "cluster"
    dev = subprocess.Popen(
        [*MAKE, "dev"],
        env=env_for(cluster_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # signalled as a group, as a terminal does
        preexec_fn=as_from_a_terminal,
    )
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 480
        while "kube-apiserver" not in pids:  # a well-defined point: the API server started
            assert dev.poll() is None and time.monotonic() < deadline, dev.communicate()[1]
            with contextlib.suppress(OSError, ValueError):
                pids = state_of(cluster_dir)["pids"]  # type: ignore[assignment]
            time.sleep(0.2)
        data_dir = Path(str(state_of(cluster_dir)["data_dir"]))
        # Frozen, the API server never turns ready, so the Ctrl-C lands while `make dev` is
        # still starting the control plane, however fast or slow the machine.
        os.kill(pids["kube-apiserver"], signal.SIGSTOP)
        os.killpg(dev.pid, signal.SIGINT)
        _, err = dev.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(pids["kube-apiserver"], signal.SIGCONT)
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
            subprocess.run([sys.executable, "-m", "e2e.cluster", "down"], env=env_for(cluster_dir))
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if not line.startswith(("make", "["))]
    assert ours == [], err
    assert "[cluster] interrupted: what it had started is stopped" in err, err
    assert wait_gone(list(pids.values())) == [], err
    assert not (cluster_dir / "state.json").exists()
    assert not data_dir.exists()


def pump(proc: subprocess.Popen[str], lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM], ids=["ctrl-c", "hangup", "kill"]
)
def test_demo_interrupted_stops_everything_it_started(tmp_path: Path, sig: int) -> None:
    cluster_dir = tmp_path / "cluster"
    # Its own session, signalled as a group: what a terminal does on Ctrl-C or on closing.
    demo = subprocess.Popen(
        [sys.executable, "-m", "e2e.demo"],
        cwd=ROOT,
        env=env_for(cluster_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )
    lines: list[str] = []
    reader = threading.Thread(target=pump, args=(demo, lines), daemon=True)
    reader.start()
    try:
        # A well-defined point: the cluster, the S3 stand-in and the operator are up.
        deadline = time.monotonic() + 480
        while not any("$ kubeonnx operator --config" in line for line in lines):
            assert demo.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        state = state_of(cluster_dir)
        pids: dict[str, int] = state["pids"]  # type: ignore[assignment]
        assert "operator" in pids and all(alive(p) for p in pids.values()), pids
        operator_cmd = Path(f"/proc/{pids['operator']}/cmdline").read_bytes().split(b"\0")
        work = Path(operator_cmd[operator_cmd.index(b"--config") + 1].decode()).parent
        assert work.name.startswith("kubeonnx-demo-") and work.exists(), work
        text = "".join(lines)
        assert "Ready means scheduled" in text and "local process" in text, text
        # The operator's configuration file is in the temporary folder: the line before
        # the operator's command writes it (into a new temporary folder, not the current one).
        assert '> "$config"\n    $ kubeonnx operator --config "$config"' in text, text
        (write,) = [line for line in lines if line.endswith('> "$config"\n')]
        assert "healthPort:" in write and "resyncSeconds:" in write, write
        assert "$ kubectl apply --server-side -f" in text, text
        if sig == signal.SIGTERM:
            os.kill(demo.pid, sig)  # `kill PID`: the demo alone
        else:
            os.killpg(demo.pid, sig)
        rc = demo.wait(180)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
            subprocess.run([sys.executable, "-m", "e2e.cluster", "down"], env=env_for(cluster_dir))
    reader.join(10)
    assert rc == 0, "".join(lines)
    assert wait_gone(list(pids.values())) == [], "".join(lines)
    assert not (cluster_dir / "state.json").exists()
    assert not work.exists() and not Path(str(state["data_dir"])).exists()
    assert processes_naming(str(cluster_dir), str(state["data_dir"]), str(work)) == []


def test_demo_down_stops_what_a_kill_9ed_demo_left(tmp_path: Path) -> None:
    """README (Try it without a cluster): a demo killed with `kill -9` cleans nothing up;
    `make demo-down` then stops what it left running (cluster, operator, runtime)."""
    cluster_dir = tmp_path / "cluster"
    # On a terminal the demo waits for Ctrl-C once it is done: everything it starts is up.
    terminal, tty = pty.openpty()
    demo = subprocess.Popen(
        [sys.executable, "-m", "e2e.demo"],
        cwd=ROOT,
        env=env_for(cluster_dir),
        stdin=tty,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    os.close(tty)
    lines: list[str] = []
    reader = threading.Thread(target=pump, args=(demo, lines), daemon=True)
    reader.start()
    work: Path | None = None
    try:
        deadline = time.monotonic() + 600
        while not any("press Ctrl-C to stop everything" in line for line in lines):
            assert demo.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        state = state_of(cluster_dir)
        pids: dict[str, int] = state["pids"]  # type: ignore[assignment]
        assert {"runtime", "operator", "kube-apiserver", "etcd", "kwok"} <= set(pids), pids
        operator_cmd = Path(f"/proc/{pids['operator']}/cmdline").read_bytes().split(b"\0")
        work = Path(operator_cmd[operator_cmd.index(b"--config") + 1].decode()).parent
        os.kill(demo.pid, signal.SIGKILL)  # `kill -9 PID`: the demo alone, nothing cleaned up
        demo.wait(60)
        assert all(alive(p) for p in pids.values()), pids  # what the killed demo left
        down = subprocess.run(
            [*MAKE, "demo-down"],
            env=env_for(cluster_dir),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(terminal)
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        subprocess.run([sys.executable, "-m", "e2e.cluster", "down"], env=env_for(cluster_dir))
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    reader.join(10)
    assert down.returncode == 0, down.stdout + down.stderr
    assert wait_gone(list(pids.values())) == [], down.stderr
    assert not (cluster_dir / "state.json").exists()
    assert not Path(str(state["data_dir"])).exists()
    assert processes_naming(str(cluster_dir), str(state["data_dir"]), str(work)) == []


def test_the_demo_answers_then_refuses_the_fourth_request_and_stops(tmp_path: Path) -> None:
    """README (Try it without a cluster): `make demo` prints an inference answer, then puts
    the model under a QuotaPolicy of 3 requests a minute and shows the fourth refused (429
    with Retry-After and the budget headers), then `kubectl get inferencemodels,
    quotapolicies`; off a terminal it stops everything when it ends."""
    cluster_dir = tmp_path / "cluster"
    demo = subprocess.run(
        [sys.executable, "-m", "e2e.demo"],
        cwd=ROOT,
        env=env_for(cluster_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = demo.stdout
    assert demo.returncode == 0, out + demo.stderr
    (answer,) = [line.split("answer:", 1)[1] for line in out.splitlines() if "answer:" in line]
    (output,) = json.loads(answer)["outputs"]
    assert output["shape"] == [2, 3] and len(output["data"]) == 6, answer
    requests = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s+request (\d): (\d{3}) (\{.*\})", line)
        if match:
            requests[int(match[1])] = (int(match[2]), json.loads(match[3]))
    assert [requests[n][0] for n in (1, 2, 3, 4)] == [200, 200, 200, 429], out
    left = [re.search(r";r=(\d+);", requests[n][1]["ratelimit"]) for n in (1, 2, 3, 4)]
    assert [m[1] if m else None for m in left] == ["2", "1", "0", "0"], requests
    # The X-RateLimit-* trio and Retry-After come with the refusal only (design change 91).
    assert "x-ratelimit-remaining" not in requests[3][1], requests
    refused = requests[4][1]
    assert 0 < int(refused["retry-after"]) <= 60, refused
    assert "is over its limit of 3 requests per 1m" in out, out
    assert {"ratelimit", "x-ratelimit-reset"} <= set(refused), refused
    listed = out.split("kubectl get inferencemodels,quotapolicies -A", 1)[1]
    assert "inferencemodel.kubeonnx.io/" in listed and "quotapolicy.kubeonnx.io/" in listed, out
    assert not (cluster_dir / "state.json").exists()
    assert processes_naming(str(cluster_dir)) == []


def test_demo_without_go_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    path = f"{VENV}/bin:/usr/bin:/bin"
    if shutil.which("go", path=path):
        pytest.skip("Go is on the system PATH here")
    demo = subprocess.run(
        [sys.executable, "-m", "e2e.demo"],
        cwd=ROOT,
        # An empty binaries cache: the build must run, and cannot.
        env=env_for(tmp_path / "cluster", PATH=path, KUBEONNX_CACHE=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert demo.returncode != 0
    assert demo.stdout == ""
    lines = demo.stderr.splitlines()
    assert len(lines) == 1, demo.stderr
    assert "Go is not installed" in lines[0] and "https://go.dev/dl/" in lines[0], lines
    assert not (tmp_path / "cluster" / "state.json").exists()


def test_the_e2e_suite_refuses_a_cluster_of_make_dev(tmp_path: Path) -> None:
    """`make e2e` over a running `make dev` stops at once, naming the command that stops it,
    and leaves that cluster's state alone (it used to tear it down and start its own)."""
    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    # Its one process runs (a stand-in, recorded as `make dev` records its processes).
    etcd = subprocess.Popen(["sleep", "300"], start_new_session=True)
    state = {
        "data_dir": str(tmp_path / "data"),
        "kubeconfig": str(cluster_dir / "kubeconfig"),
        "server": "https://127.0.0.1:1",
        "token": "t",
        "bin_dir": {},
        "pids": {"etcd": etcd.pid},
        "started": {"etcd": process_identity(etcd.pid)},
        "owner": "dev",
    }
    (cluster_dir / "state.json").write_text(json.dumps(state))
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "e2e/test_control_plane.py",
            ],
            cwd=ROOT,
            env=env_for(cluster_dir),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        etcd.kill()
        etcd.wait()
    assert run.returncode == 2, run.stdout + run.stderr
    assert "started by `make dev`" in run.stdout + run.stderr
    assert "make dev-down" in run.stdout + run.stderr
    assert json.loads((cluster_dir / "state.json").read_text()) == state


def test_the_e2e_suite_takes_a_stale_state_for_no_cluster(tmp_path: Path) -> None:
    """A `make dev` state none of whose processes runs (after a reboot) is no cluster: the
    suite cleans it up and starts its own (here it gets as far as the build, with no Go),
    instead of refusing it."""
    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    (tmp_path / "data").mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid names no process now
    state = {
        "data_dir": str(tmp_path / "data"),
        "kubeconfig": str(cluster_dir / "kubeconfig"),
        "server": "https://127.0.0.1:1",
        "token": "t",
        "bin_dir": {},
        "pids": {"etcd": gone.pid},
        "started": {"etcd": "a-boot-before/1"},
        "owner": "dev",
    }
    (cluster_dir / "state.json").write_text(json.dumps(state))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "e2e/test_control_plane.py",
        ],
        cwd=ROOT,
        env=env_for(
            cluster_dir,
            PATH=f"{VENV}/bin:/usr/bin:/bin",
            KUBEONNX_CACHE=str(tmp_path / "cache"),
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert "started by `make dev`" not in out, out
    assert "Go is not installed" in out or "or newer is needed" in out, out
    assert not (cluster_dir / "state.json").exists()
