"""The test bed's own servers: ports no other test is given meanwhile, and a LocalRedis or
LocalPostgres that answers only once its own process does (not a server that took its
port first). Needs redis-server and PostgreSQL, no control plane."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from e2e.cluster import PORT_LOCKS, _ephemeral_range, free_port
from e2e.postgres_server import LocalPostgres
from e2e.redis_server import LocalRedis


def test_ports_are_outside_the_ephemeral_range_and_claimed_for_the_process() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    # The kernel never gives these to a port-0 bind or an outgoing connection.
    assert all(not low <= p <= high for p in ports)
    # Another process cannot claim a port this one holds.
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
    )
    for port in ports[:3]:
        proc = subprocess.run([sys.executable, "-c", probe, str(PORT_LOCKS / str(port))])
        assert proc.returncode == 3, port


def test_local_redis_does_not_take_another_server_for_its_own() -> None:
    squatter = LocalRedis().start()
    ours = LocalRedis()
    ours.port, ours.url = squatter.port, squatter.url  # taken before ours could bind it
    try:
        ours.start()
        assert ours.proc is not None
        answering = int(ours.client().info("server")["process_id"])
        assert answering == ours.proc.pid != squatter.proc.pid  # type: ignore[union-attr]
        assert ours.port != squatter.port
        # A restart keeps its port (clients know it) and is its own process again.
        ours.kill()
        ours.start()
        assert int(ours.client().info("server")["process_id"]) == ours.proc.pid
    finally:
        ours.kill()
        squatter.kill()


def test_local_postgres_does_not_take_another_server_for_its_own() -> None:
    squatter = LocalPostgres().start()
    ours = LocalPostgres()
    ours.port, ours.dsn = squatter.port, squatter.dsn
    try:
        ours.start()
        assert ours.port != squatter.port
        answered = ours.data_directory()
        assert answered is not None and Path(answered).resolve() == ours.data.resolve()
    finally:
        ours.remove()
        squatter.remove()
