"""The two images, built by e2e/build-images.sh, and their processes run without a container
runtime: an image's filesystem is exported from podman and its ENTRYPOINT and CMD (or a pod's
command and args) run chrooted into it, as the image's user, in a mount namespace of their own
holding what a pod's container gets (/proc, a minimal /dev, /dev/termination-log, emptyDirs)
on a read-only root. The network is the host's (ports are chosen free, not 8080)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUILD_IMAGES = ROOT / "e2e" / "build-images.sh"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class Built:
    """What build-images.sh printed: the images' names and the podman command with its storage."""

    base: str
    operator: str
    runtime: str
    podman: list[str]

    def inspect(self, image: str) -> dict[str, Any]:
        out = subprocess.run(
            [*self.podman, "image", "inspect", image], capture_output=True, text=True, check=True
        ).stdout
        config: dict[str, Any] = json.loads(out)[0]["Config"]
        return config


def build_images(timeout: float = 1800) -> Built:
    """Build (or take from the caches) the base and both images."""
    proc = subprocess.run(
        ["bash", str(BUILD_IMAGES)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{BUILD_IMAGES.name} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return Built(
        base=lines["BASE_IMAGE"],
        operator=lines["OPERATOR_IMAGE"],
        runtime=lines["RUNTIME_IMAGE"],
        podman=lines["PODMAN"].split(),
    )


def export_rootfs(built: Built, image: str, dest: Path) -> Path:
    """The image's filesystem, unpacked into `dest` (podman create + podman export)."""
    dest.mkdir(parents=True)
    cid = subprocess.run(
        [*built.podman, "create", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        export = subprocess.Popen([*built.podman, "export", cid], stdout=subprocess.PIPE)
        untar = subprocess.run(
            ["tar", "-x", "--numeric-owner", "-C", str(dest)], stdin=export.stdout
        )
        assert export.stdout is not None
        export.stdout.close()
        assert export.wait() == 0 and untar.returncode == 0, f"podman export {image} failed"
    finally:
        subprocess.run([*built.podman, "rm", cid], capture_output=True, check=True)
    return dest


@dataclass
class Container:
    """A process of an image as a pod's container would run it. `command` and `args` replace
    the image's ENTRYPOINT and CMD as Kubernetes' do; `env` comes after the image's ENV."""

    rootfs: Path
    config: dict[str, Any]  # the image's Config (podman image inspect)
    command: list[str] | None = None
    args: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    empty_dirs: list[str] = field(default_factory=lambda: ["/tmp"])
    user: str | None = None  # default: the image's USER

    def argv(self) -> list[str]:
        entrypoint = self.command if self.command is not None else self.config["Entrypoint"]
        cmd = self.args if self.args is not None or self.command is not None else self.config["Cmd"]
        return [*(entrypoint or []), *(cmd or [])]

    def spec(self) -> dict[str, Any]:
        image_env = dict(e.split("=", 1) for e in self.config.get("Env") or [])
        user = self.user or self.config.get("User") or "0:0"
        uid, _, gid = user.partition(":")
        return {
            "root": str(self.rootfs),
            "workdir": self.config.get("WorkingDir") or "/",
            "uid": int(uid),
            "gid": int(gid or uid),
            "env": {**image_env, **self.env},
            "argv": self.argv(),
            "empty_dirs": self.empty_dirs,
        }

    def popen(self, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start it: `unshare` execs this file's `enter`, which execs the container's process,
        so the returned process is the container's own (signals reach it directly)."""
        return subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                "-I",
                __file__,
                json.dumps(self.spec()),
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            **kwargs,
        )

    def run(
        self, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """Run it to completion, `input` on its stdin; killed if it outlasts `timeout`."""
        proc = self.popen(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.wait(), out, err)


def remove_rootfs(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def enter(spec: dict[str, Any]) -> None:
    """In the new mount namespace: mount what a container gets, make the root read-only,
    chroot, take the user and exec. Runs as root; nothing of it outlives the process."""
    root = spec["root"]

    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True)

    mount("--bind", root, root)  # a mount of its own, to be made read-only below
    mount("-t", "proc", "proc", f"{root}/proc")
    mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", f"{root}/dev")
    for name in DEVICES:
        Path(f"{root}/dev/{name}").touch()
        mount("--bind", f"/dev/{name}", f"{root}/dev/{name}")
    log = Path(f"{root}/dev/termination-log")
    log.touch()
    log.chmod(0o666)
    for path in spec["empty_dirs"]:
        Path(root + path).mkdir(parents=True, exist_ok=True)
        mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", root + path)
    # As runc does, a WORKDIR missing from the image is made before the process starts.
    Path(root + spec["workdir"]).mkdir(parents=True, exist_ok=True)
    mount("-o", "remount,bind,ro", root)
    os.chroot(root)
    os.chdir(spec["workdir"])
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    argv = spec["argv"]
    os.execvpe(argv[0], argv, spec["env"])


if __name__ == "__main__":
    enter(json.loads(sys.argv[1]))
