"""Waiting for a local process (runtime, operator, benchmark server) to answer over HTTP."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import httpx


def wait_serving(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout: float,
    *,
    what: str,
    logs: Callable[[], str] = lambda: "",
    ok: Callable[[int], bool] = lambda status: 200 <= status < 400,
) -> float:
    """Poll `url` until its status is `ok`; return the seconds it took. Raise RuntimeError,
    with the process's `logs`, if the process exits first or `timeout` passes."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} before {url} answered:\n{logs()}"
            )
        try:
            if ok(httpx.get(url, timeout=2).status_code):
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} in {timeout:g}s:\n{logs()}")
