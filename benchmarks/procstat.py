"""What the benchmarks read of a process from /proc: CPU time (whole or per thread), peak RSS."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _cpu(stat: Path) -> tuple[str, float]:
    """(name, utime + stime in seconds) from a /proc/.../stat file."""
    text = stat.read_text()
    fields = text.rsplit(")", 1)[1].split()
    return text[text.index("(") + 1 : text.rindex(")")], (int(fields[11]) + int(fields[12])) / TICK


def cpu_seconds(pid: int) -> float:
    return _cpu(Path(f"/proc/{pid}/stat"))[1]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread, keyed by 'tid name'."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name, seconds = _cpu(task / "stat")
        out[f"{task.name} {name}"] = seconds
    return out


def peak_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
