"""What ``/proc`` says about a process: its workers, resident memory and CPU time (Linux)."""

from __future__ import annotations

import os
from pathlib import Path


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def worker_pids(supervisor_pid: int) -> list[int]:
    """Worker processes of a ``segs-stream run`` supervisor (not the spawn method's
    resource tracker); [] when it is gone."""
    path = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children")
    try:
        pids = [int(p) for p in path.read_text().split()]
    except OSError:
        return []
    return [p for p in pids
            if b"spawn_main" in _cmdline(p) and b"resource_tracker" not in _cmdline(p)]


def status_kb(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
