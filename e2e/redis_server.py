"""A real redis-server on loopback for the quota tests: started, paused, killed, restarted."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time

import redis

from e2e.cluster import free_port


class LocalRedis:
    def __init__(self, password: str | None = None) -> None:
        self.password = password  # required of every client (redis-server --requirepass)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="kubeonnx-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False  # once started, restarts keep the port its clients know

    def start(self) -> LocalRedis:
        """Start (or restart, on the same port) and wait until this process answers. A first
        start whose port someone else took meanwhile moves to another port."""
        for _ in range(1 if self._started else 5):
            if self._start_once():
                self._started = True
                return self
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
        raise RuntimeError(f"redis-server did not answer as its own process on port {self.port}")

    def _start_once(self) -> bool:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.proc = proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                pid = int(self.client().info("server")["process_id"])
            except redis.ConnectionError:
                time.sleep(0.05)
                continue
            if pid == proc.pid:
                return True
            break  # another server answers on the port: ours cannot bind it
        self.kill()
        return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=self.password, socket_timeout=2)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    stop = kill
