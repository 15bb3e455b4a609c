"""A real PostgreSQL on loopback for the usage-ledger tests: started, stopped, restarted on
the same data directory. Uses the Debian package's binaries (postgresql); as root, runs them
as the postgres user, since PostgreSQL refuses to run as root."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from e2e.cluster import free_port


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    return Path(found[-1]).parent


class LocalPostgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kubeonnx-pg-"))
        self.data = self.dir / "data"
        self.dsn = f"postgresql://kubeonnx@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    def start(self) -> LocalPostgres:
        bindir = _bindir()
        if not self.data.exists():
            subprocess.run(
                [
                    *self._as,
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "kubeonnx",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
            )
        self.proc = subprocess.Popen(
            [
                *self._as,
                str(bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ready():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not answer on port {self.port}")

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=1) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def query(self, sql: str) -> list[tuple]:  # type: ignore[type-arg]
        import psycopg

        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            return conn.execute(sql).fetchall()

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster); the data directory stays."""
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(
                [*self._as, str(_bindir() / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast"],
                capture_output=True,
            )
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
