"""The local tools as a newcomer meets them, without a cluster (the make lifecycle itself is in
e2e/test_dev.py): the Go the build needs, named in one line; `make dev-down` signalling only
the processes it started; a second `make dev` refused instead of wiping the first; two builds
of one component taking turns; Ctrl-C during a build leaving no work folder; the demo's
operator command repeatable."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e import cluster as local_cluster
from e2e.demo import operator_commands
from e2e.terminal import as_from_a_terminal

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "e2e" / "build-binaries.sh"
VERSIONS = dict(
    line.split("=", 1)
    for line in (ROOT / "e2e" / "versions.env").read_text().splitlines()
    if "=" in line and not line.startswith("#")
)
GO_VERSION = VERSIONS["GO_VERSION"]
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
)


def fake_go(bin_dir: Path, version: str, log: Path | None = None) -> None:
    """A `go` that only says its version (and logs its arguments and GOMODCACHE)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    record = f'echo "$GOMODCACHE $*" >> {log}\n' if log else ""
    (bin_dir / "go").write_text(
        "#!/bin/sh\n"
        + record
        + f'case "$*" in "env GOVERSION") echo go{version} ;;'
        + f' "version") echo "go version go{version} linux/amd64" ;;'
        + ' "mod download -json "*) echo "{\\"Dir\\": \\"$FAKE_TOOLCHAIN\\"}" ;; esac\n'
    )
    (bin_dir / "go").chmod(0o755)


def build(*args: str, path: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD), *args],
        env={**os.environ, "PATH": path, "KUBEONNX_CACHE": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("found", "enough"),
    [
        ("1.19.8", False),
        ("1.26.0", False),
        ("1.26.6", False),
        (GO_VERSION, True),
        ("1.26.10", True),
        ("1.27.0", True),
    ],
)
def test_the_go_version_is_checked_against_the_pinned_modules(
    tmp_path: Path, found: str, enough: bool
) -> None:
    fake_go(tmp_path / "bin", found)
    run = build("--check-go", path=f"{tmp_path / 'bin'}:/usr/bin:/bin", cache=tmp_path / "cache")
    if enough:
        assert (run.returncode, run.stderr) == (0, ""), run.stderr
        return
    assert run.returncode == 3
    (line,) = run.stderr.splitlines()
    assert f"Go {GO_VERSION} or newer is needed" in line and f"not Go {found}" in line, line
    assert "https://go.dev/dl/" in line, line
    # The way to get it without leaving the shell: this Go fetches the pinned one.
    assert 'export PATH="$(bash e2e/build-binaries.sh --fetch-go)/bin:$PATH"' in line, line


def test_no_go_is_one_line_naming_the_version(tmp_path: Path) -> None:
    if shutil.which("go", path="/usr/bin:/bin"):
        pytest.skip("Go is on the system PATH here")
    run = build("--check-go", path="/usr/bin:/bin", cache=tmp_path / "cache")
    assert run.returncode == 3
    (line,) = run.stderr.splitlines()
    assert f"Go is not installed: install Go {GO_VERSION} or newer" in line, line


def test_a_too_old_go_fetches_the_toolchain_through_the_module_proxy(tmp_path: Path) -> None:
    """What .ci/run does with Debian's Go: the toolchain module of GO_VERSION, downloaded
    with the old `go` into the cache; its folder printed."""
    calls = tmp_path / "calls"
    fake_go(tmp_path / "bin", "1.19.8", log=calls)
    toolchain = tmp_path / "toolchain"
    for program in ("bin/go", "pkg/tool/linux_amd64/compile"):
        (toolchain / program).parent.mkdir(parents=True, exist_ok=True)
        (toolchain / program).write_text("")  # as unpacked: not executable
    run = build(
        "--fetch-go",
        path=f"{tmp_path / 'bin'}:/usr/bin:/bin",
        cache=tmp_path / "cache",
        FAKE_TOOLCHAIN=str(toolchain),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{toolchain}\n"
    assert os.access(toolchain / "bin" / "go", os.X_OK)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    (call,) = calls.read_text().splitlines()
    assert call == (
        f"{tmp_path / 'cache' / 'go' / 'mod'} mod download -json"
        f" golang.org/toolchain@v0.0.1-go{GO_VERSION}.linux-{arch}"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "build-binaries.sh --fetch-go" in ci and "golang-go" in ci


def test_go_version_is_the_newest_go_line_of_the_pinned_modules() -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go here to read the pinned modules")
    modules = {
        "K8S_VERSION": "k8s.io/kubernetes",
        "ETCD_VERSION": "go.etcd.io/etcd/server/v3",
        "KWOK_VERSION": "sigs.k8s.io/kwok",
        "HELM_VERSION": "helm.sh/helm/v3",
        "PROMETHEUS_VERSION": "github.com/prometheus/prometheus",
        "KEDA_VERSION": "github.com/kedacore/keda/v2",
        "METRICS_SERVER_VERSION": "sigs.k8s.io/metrics-server",
    }
    lines = {}
    for var, module in modules.items():
        info = json.loads(
            subprocess.run(
                [go, "mod", "download", "-json", f"{module}@{VERSIONS[var]}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
                env={**os.environ, "GOFLAGS": ""},
            ).stdout
        )
        (line,) = re.findall(r"(?m)^go (\S+)$", Path(info["GoMod"]).read_text())
        lines[module] = line

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    assert max(lines.values(), key=key) == GO_VERSION, lines


# ---- the cluster's state: only its own processes are signalled ----


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process (its own session, as the cluster's are)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def write_state(cluster_dir: Path, owner: str, pids: dict[str, int], **extra: object) -> None:
    cluster_dir.mkdir(exist_ok=True)
    data = cluster_dir.parent / "data"
    data.mkdir(exist_ok=True)
    state = {
        "data_dir": str(data),
        "kubeconfig": str(cluster_dir / "kubeconfig"),
        "server": "https://127.0.0.1:1",
        "token": "t",
        "bin_dir": {},
        "pids": pids,
        "owner": owner,
        **extra,
    }
    (cluster_dir / "state.json").write_text(json.dumps(state))


def cluster_cli(cluster_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.cluster", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "KUBEONNX_CLUSTER_DIR": str(cluster_dir),
            # Should it get as far as building the binaries, it stops there: no Go.
            "KUBEONNX_CACHE": str(cluster_dir.parent / "cache"),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_down_leaves_alone_a_process_that_is_not_the_one_it_started(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """A pid in the state now held by another process (reboot, OOM kill, a crash), or a
    state naming a process it never started: not signalled; the state is removed."""
    cluster_dir = tmp_path / "cluster"
    # A state naming a process it never started (an older state file, a hand-edited one).
    write_state(cluster_dir, "dev", {"etcd": sleeper.pid})
    down = cluster_cli(cluster_dir, "down")
    assert down.returncode == 0, down.stderr
    assert sleeper.poll() is None, "killed"  # still alive: not signalled
    assert "none of its processes was running" in down.stderr, down.stderr
    assert not (cluster_dir / "state.json").exists()
    # The identity recorded is another process's (as after a reboot): same pid, other start.
    write_state(cluster_dir, "dev", {"etcd": sleeper.pid}, started={"etcd": "other-boot/1"})
    down = cluster_cli(cluster_dir, "down")
    assert down.returncode == 0 and sleeper.poll() is None, down.stderr
    assert "nothing to stop" in cluster_cli(cluster_dir, "down").stderr


def test_down_stops_the_process_it_started(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    cluster_dir = tmp_path / "cluster"
    identity = local_cluster.process_identity(sleeper.pid)
    assert identity is not None
    write_state(cluster_dir, "dev", {"etcd": sleeper.pid}, started={"etcd": identity})
    down = cluster_cli(cluster_dir, "down")
    assert down.returncode == 0, down.stderr
    assert "stopped etcd" in down.stderr, down.stderr
    assert sleeper.wait(60) == -signal.SIGTERM


def test_a_second_make_dev_refuses_and_leaves_the_first_running(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """`make dev` (or `make cluster-up`) over a running dev cluster used to stop it and
    everything in it; it refuses, saying how to stop it."""
    cluster_dir = tmp_path / "cluster"
    identity = local_cluster.process_identity(sleeper.pid)
    write_state(cluster_dir, "dev", {"etcd": sleeper.pid}, started={"etcd": identity})
    before = (cluster_dir / "state.json").read_text()
    for command in ("dev", "up"):
        run = cluster_cli(cluster_dir, command)
        assert run.returncode == 1, run.stderr
        (line,) = run.stderr.splitlines()
        assert "a cluster started by `make dev` runs" in line, line
        assert "`make dev-down` stops it" in line, line
        assert sleeper.poll() is None
        assert (cluster_dir / "state.json").read_text() == before


@pytest.mark.parametrize(
    ("args", "shown"),
    [(["dev"], "make dev"), (["down", "dev"], "make dev-down"), (["up"], "make cluster-up")],
)
def test_a_command_while_another_starts_or_stops_the_cluster_refuses_in_one_line(
    tmp_path: Path, args: list[str], shown: str
) -> None:
    """Two `make dev` within a second: the second used to start a control plane of its own
    (both then failed, leaving both running with no state naming them). The first holds the
    cluster directory's lock; the second refuses, touching nothing."""
    import fcntl

    cluster_dir = tmp_path / "cluster"
    cluster_dir.mkdir()
    with (cluster_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a first `make dev` is starting it
        run = cluster_cli(cluster_dir, *args)
    assert run.returncode == 1, run.stderr
    (line,) = run.stderr.splitlines()
    assert "another command is starting or stopping the cluster" in line, line
    assert f"`{shown}` refused" in line, line
    assert sorted(p.name for p in cluster_dir.iterdir()) == ["lock"]
    assert not (tmp_path / "cache").exists()  # no build started


@pytest.mark.parametrize(
    ("owner", "target", "other"),
    [("demo", "dev-down", "demo-down"), ("dev", "demo-down", "dev-down")],
)
def test_make_dev_down_leaves_a_running_demos_cluster_alone(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], owner: str, target: str, other: str
) -> None:
    """`make dev-down` used to stop a running `make demo`'s cluster (the demo went on saying
    it ran); it refuses, naming `make demo-down`, as `make demo-down` refuses a dev one."""
    cluster_dir = tmp_path / "cluster"
    identity = local_cluster.process_identity(sleeper.pid)
    write_state(cluster_dir, owner, {"etcd": sleeper.pid}, started={"etcd": identity})
    venv = Path(sys.executable).parent.parent
    run = subprocess.run(
        ["make", "-s", "-C", str(ROOT), f"VENV={venv}", "-o", f"{venv}/.installed", target],
        env={**os.environ, "KUBEONNX_CLUSTER_DIR": str(cluster_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode != 0, run.stderr
    assert f"was started by `make {owner}`" in run.stderr, run.stderr
    assert f"`make {other}` stops it" in run.stderr, run.stderr
    assert sleeper.poll() is None
    assert (cluster_dir / "state.json").exists()


def test_the_demo_takes_a_stale_state_for_no_cluster(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """A `make dev` state none of whose processes runs (the machine rebooted): the demo goes
    on (here to the build, which has no Go) instead of refusing "a cluster runs"."""
    cluster_dir = tmp_path / "cluster"
    write_state(cluster_dir, "dev", {"etcd": sleeper.pid})  # etcd's pid, now another's
    demo = subprocess.run(
        [sys.executable, "-m", "e2e.demo"],
        cwd=ROOT,
        env={
            **os.environ,
            "KUBEONNX_CLUSTER_DIR": str(cluster_dir),
            "KUBEONNX_CACHE": str(tmp_path / "cache"),  # nothing cached: the build runs
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",  # and finds no Go
            "GOROOT": "",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "a cluster started by" not in demo.stderr, demo.stderr
    (line,) = demo.stderr.splitlines()
    assert "Go is not installed" in line or "or newer is needed" in line, line
    assert sleeper.poll() is None


# ---- the binaries' build ----


def test_a_second_build_of_a_component_waits_for_the_first_then_finds_it_cached(
    tmp_path: Path,
) -> None:
    import fcntl

    cache = tmp_path / "cache"
    (cache / "locks").mkdir(parents=True)
    lock = (cache / "locks" / "etcd.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # a first build of etcd runs
    second = subprocess.Popen(
        ["bash", str(BUILD), "etcd"],
        env={**os.environ, "KUBEONNX_CACHE": str(cache), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert second.stderr is not None
        first_line = second.stderr.readline()
        assert "etcd: another build of it runs" in first_line and "waiting" in first_line, (
            first_line + second.stderr.read()
        )
        assert second.poll() is None
        # The first build ends: its binary in place, the lock released.
        built = cache / "bin" / f"etcd-{VERSIONS['ETCD_VERSION']}"
        built.mkdir(parents=True)
        (built / "etcd").write_text("")
        lock.close()
        out, err = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, err
    assert out == f"ETCD_BIN={built}\n"
    assert "cached" in err


def test_an_interrupted_build_says_so_in_one_line_and_leaves_no_work_folder(
    tmp_path: Path,
) -> None:
    """Ctrl-C (SIGINT to the whole group, as a terminal sends it) during a build: the work
    folders go, one line says so, the cache holds nothing half-built."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # A `go` that blocks until interrupted, as a long build does.
    bin_dir = tmp_path / "bin"
    fake_go(bin_dir, GO_VERSION)
    go = (bin_dir / "go").read_text()
    (bin_dir / "go").write_text(
        go.replace("esac\n", "*) echo building >&2; exec sleep 300 ;; esac\n")
    )
    build = subprocess.Popen(
        ["bash", str(BUILD), "helm"],
        env={
            **os.environ,
            "KUBEONNX_CACHE": str(tmp_path / "cache"),
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "TMPDIR": str(tmp),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        assert build.stderr is not None
        lines: list[str] = []
        while not lines or lines[-1] != "building\n":
            line = build.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert list(tmp.iterdir()) != []  # its work folder
        os.killpg(build.pid, signal.SIGINT)
        _, err = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
    assert build.returncode == 130, err
    (line,) = err.splitlines()
    assert "interrupted" in line, err
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "cache" / "bin").exists()


def test_ctrl_c_during_the_first_build_of_make_dev_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while `make dev` builds the binaries: the build's line, no Python traceback,
    exit 130, no work folder left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Every step of the build blocks until interrupted (the first: `go mod download`).
    (bin_dir / "go").write_text(
        f'#!/bin/sh\n[ "$*" = "env GOVERSION" ] && exec echo go{GO_VERSION}\n'
        "echo building >&2; exec sleep 300\n"
    )
    (bin_dir / "go").chmod(0o755)
    dev = subprocess.Popen(
        [sys.executable, "-m", "e2e.cluster", "dev"],
        cwd=ROOT,
        env={
            **os.environ,
            "KUBEONNX_CLUSTER_DIR": str(tmp_path / "cluster"),
            "KUBEONNX_CACHE": str(tmp_path / "cache"),
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "TMPDIR": str(tmp),
        },
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        assert dev.stderr is not None
        lines: list[str] = []
        while not lines or lines[-1] != "building\n":
            line = dev.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        os.killpg(dev.pid, signal.SIGINT)
        _, err = dev.communicate(timeout=60)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
    assert dev.returncode == 130, err
    # The stand-in go's own "building" (a step started as the signal arrived) is the test's
    # scaffolding; of the build's own output there is one line.
    own = [x for x in err.splitlines() if x != "building"]
    assert len(own) == 1 and "[build-binaries] interrupted" in own[0], err
    assert [p for p in tmp.iterdir() if p.name.startswith("kubeonnx-build")] == []


# ---- the demo ----


def test_the_demos_operator_command_can_be_repeated(tmp_path: Path) -> None:
    """The demo prints `kubeonnx operator --config ...`, whose file is in its temporary
    folder: the lines printed before it write that file again, into a new temporary folder
    (they used to write operator-config.yaml into the current one, the user's clone)."""
    config = tmp_path / "demo" / "operator-config.yaml"
    config.parent.mkdir()
    config.write_text("healthPort: 18081\nresyncSeconds: 5\n")
    shown = operator_commands(config)
    commands = [line.strip().removeprefix("$ ") for line in shown.splitlines()]
    assert commands[-1].startswith('kubeonnx operator --config "$config"'), commands
    repeat, tmp = tmp_path / "repeat", tmp_path / "tmp"
    repeat.mkdir()
    tmp.mkdir()
    written = subprocess.run(
        ["bash", "-c", "\n".join([*commands[:-1], 'echo "$config"'])],
        cwd=repeat,
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert list(repeat.iterdir()) == []
    assert Path(written).parent.parent == tmp and Path(written).name == config.name
    assert Path(written).read_text() == config.read_text()


# ---- the cluster's start ----


@pytest.fixture
def cluster_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`e2e.cluster` in this process, its state and temporary folders under tmp_path."""
    cluster_dir = tmp_path / "cluster"
    monkeypatch.setattr(local_cluster, "STATE_DIR", cluster_dir)
    monkeypatch.setattr(local_cluster, "STATE_FILE", cluster_dir / "state.json")
    monkeypatch.setattr(local_cluster, "KUBECONFIG", cluster_dir / "kubeconfig")
    monkeypatch.setattr(local_cluster, "OPERATOR_KUBECONFIG", cluster_dir / "operator.kubeconfig")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return cluster_dir


@pytest.mark.parametrize("step", ["free_port", "_kubeconfig", "_start"])
def test_ctrl_c_before_the_state_names_the_data_folder_leaves_none(
    cluster_dir: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Ctrl-C after the data folder (the admin token, the keys) is made, before, or just
    after, the state names it: the folder and the kubeconfigs go."""

    calls: list[object] = []

    def interrupted(*args: object, **kwargs: object) -> str:
        calls.append(args)
        if step == "_kubeconfig" and len(calls) == 1:  # the admin's written, not the operator's
            return "admin"
        raise KeyboardInterrupt

    monkeypatch.setattr(local_cluster, step, interrupted)
    tmp = Path(tempfile.gettempdir())
    with pytest.raises(KeyboardInterrupt):
        local_cluster.up(owner="dev", bins={"etcd": tmp / "etcd"})
    assert list(tmp.iterdir()) == []
    assert calls
    left = {p.name for p in cluster_dir.glob("*")}
    assert left & {"state.json", "kubeconfig", "operator.kubeconfig"} == set(), left


def test_make_dev_and_demo_print_no_bare_kubeconfig_line(
    cluster_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`up` for `make dev` and `make demo` wrote the kubeconfig's path alone on stdout after
    "[cluster] up in ..." (a stray line in their output); `make cluster-up` prints it."""
    for step in ("_start", "_wait", "_grant_chart_role"):
        monkeypatch.setattr(local_cluster, step, lambda *args, **kwargs: None)
    monkeypatch.setattr(local_cluster, "kubectl", lambda *args, **kwargs: "")
    monkeypatch.setattr(
        local_cluster, "build_binaries", lambda: dict.fromkeys(BINARIES, Path("bin"))
    )
    for owner in ("dev", "demo"):
        local_cluster.up(owner=owner, bins=dict.fromkeys(BINARIES, Path("bin")))
        out, err = capsys.readouterr()
        assert out == "", out
        assert "[cluster] up in" in err, err
        local_cluster.down()
    assert local_cluster.main(["up"]) == 0
    assert capsys.readouterr().out == f"{cluster_dir / 'kubeconfig'}\n"
    local_cluster.down()


def keda_fake_go(bin_dir: Path, module: Path, log: Path) -> None:
    """A `go` for KEDA's build: `mod download -json` names `module` (its go.mod, its CRDs);
    `build -o FILE` writes FILE saying which package; every call is logged."""
    (module / "config" / "crd" / "bases").mkdir(parents=True)
    (module / "config" / "crd" / "bases" / "keda.sh_scaledobjects.yaml").write_text("new crd\n")
    (module / "go.mod").write_text("module github.com/kedacore/keda/v2\n")
    bin_dir.mkdir(parents=True)
    (bin_dir / "go").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {log}\n'
        f'case "$*" in "env GOVERSION") echo go{GO_VERSION} ;;\n'
        f' "mod download -json "*) echo \'{{"Dir": "{module}", "GoMod": "{module}/go.mod"}}\' ;;\n'
        ' build\\ *) a="$*"; out=${a#*-o }; out=${out%% *}; echo "built ${a##* }" > "$out" ;;\n'
        "esac\n"
    )
    (bin_dir / "go").chmod(0o755)


def test_a_keda_cache_without_the_adapter_builds_only_the_adapter(tmp_path: Path) -> None:
    """A cache of before the adapter (its operator and CRDs): the operator and CRDs are kept
    as they are, only the adapter is built; then everything is cached."""
    cache = tmp_path / "cache"
    keda = cache / "bin" / f"keda-{VERSIONS['KEDA_VERSION']}"
    (keda / "crds").mkdir(parents=True)
    (keda / "keda").write_text("the cached operator\n")
    (keda / "crds" / "keda.sh_scaledobjects.yaml").write_text("cached crd\n")
    log = tmp_path / "go.log"
    keda_fake_go(tmp_path / "bin", tmp_path / "module", log)
    path = f"{tmp_path / 'bin'}:/usr/bin:/bin"

    built = build("keda", path=path, cache=cache, TMPDIR=str(tmp_path))
    assert built.returncode == 0, built.stderr
    assert built.stdout == f"KEDA_BIN={keda}\n"
    assert "building keda-adapter " in built.stderr, built.stderr
    builds = [line for line in log.read_text().splitlines() if line.startswith("build ")]
    (only,) = builds
    assert only.endswith("-o out/keda-adapter github.com/kedacore/keda/v2/cmd/adapter"), only
    assert (keda / "keda-adapter").read_text() == "built github.com/kedacore/keda/v2/cmd/adapter\n"
    assert (keda / "keda").read_text() == "the cached operator\n"
    assert (keda / "crds" / "keda.sh_scaledobjects.yaml").read_text() == "cached crd\n"
    assert not list(keda.glob(".*"))  # no piece left half-moved

    log.unlink()
    again = build("keda", path=path, cache=cache)
    assert again.returncode == 0 and "cached" in again.stderr, again.stderr
    assert not log.exists() or "build " not in log.read_text()


def test_an_empty_keda_cache_builds_the_operator_the_adapter_and_the_crds(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "go.log"
    keda_fake_go(tmp_path / "bin", tmp_path / "module", log)
    built = build(
        "keda", path=f"{tmp_path / 'bin'}:/usr/bin:/bin", cache=cache, TMPDIR=str(tmp_path)
    )
    assert built.returncode == 0, built.stderr
    keda = cache / "bin" / f"keda-{VERSIONS['KEDA_VERSION']}"
    assert (keda / "keda").read_text() == "built github.com/kedacore/keda/v2/cmd/operator\n"
    assert (keda / "keda-adapter").read_text() == "built github.com/kedacore/keda/v2/cmd/adapter\n"
    assert (keda / "crds" / "keda.sh_scaledobjects.yaml").read_text() == "new crd\n"
