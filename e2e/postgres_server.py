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
        self._started = False  # once started, restarts keep the port its clients know
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
        for _ in range(1 if self._started else 5):
            if self._start_once(bindir):
                self._started = True
                return self
            self.port = free_port()
            self.dsn = f"postgresql://kubeonnx@127.0.0.1:{self.port}/postgres"
        raise RuntimeError(f"PostgreSQL did not answer as its own server on port {self.port}")

    def _start_once(self, bindir: Path) -> bool:
        self.proc = proc = subprocess.Popen(
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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            answered = self.data_directory()
            if answered is None:
                time.sleep(0.1)
                continue
            if Path(answered).resolve() == self.data.resolve():
                return True
            break  # another server answers on the port: ours cannot bind it
        self.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        return False

    def data_directory(self) -> str | None:
        """The data directory of the server answering on the port: ours is self.data."""
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=1) as conn:
                row = conn.execute("SHOW data_directory").fetchone()
            return str(row[0]) if row else None
        except psycopg.OperationalError:
            return None

    def ready(self) -> bool:
        return self.data_directory() is not None

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
