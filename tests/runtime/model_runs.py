"""What tests need to see and hold the model runs of a real `kubeonnx serve` process: the
environment that loads `model_hooks/sitecustomize.py` into it, its run log, and its hold."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np

from tests.runtime.conftest import Served

HOOKS = Path(__file__).parent / "model_hooks"
T = TypeVar("T")


def hooked_env(
    folder: Path, *, hold_run: int | None = None, run_seconds: float = 0.0
) -> dict[str, str]:
    """Environment for a server whose model runs are logged under `folder` (and run number
    `hold_run` held until `release(folder)`)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
        "TEST_HOOK_DIR": str(folder),
        "TEST_HOOK_RUN_SECONDS": str(run_seconds),
    }
    if hold_run is not None:
        env["TEST_HOOK_HOLD_RUN"] = str(hold_run)
    return env


def row_digest(row: np.ndarray) -> str:
    """What the hook logs of one row of a run's first input."""
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Run:
    pid: int
    number: int
    rows: list[str]  # row digests


def runs(folder: Path) -> list[Run]:
    """The model runs that returned, in the order they were logged."""
    path = folder / "runs"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        pid, number, rows = line.split(" ")
        found.append(Run(int(pid), int(number), rows.split(",")))
    return found


def wait_for(check: Callable[[], T], what: str, timeout: float = 120) -> T:
    """Poll `check` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_held(folder: Path, served: Served, timeout: float = 120) -> None:
    """Wait until the server's held run has begun (and is now waiting for `release`)."""

    def held() -> bool:
        assert served.proc.poll() is None, f"the server exited:\n{served.logs()[-3000:]}"
        return (folder / f"held-{served.proc.pid}").exists()

    wait_for(held, "the held model run", timeout)


def release(folder: Path) -> None:
    (folder / "release").touch()


def metric(served: Served, name: str) -> float:
    """The value of a metric line starting with `name` (labels included), 0 if absent."""
    for line in httpx.get(f"{served.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
