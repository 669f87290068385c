"""Peer: the same windowed job written with Quix Streams (:mod:`segs.bench.quix_job`), on the
same pre-loaded topic, one or more instances in one consumer group.

Quix Streams 3.x pins ``confluent-kafka < 2.13`` while the service uses a newer one, so the
peer runs in its own virtual environment under the cache folder (made on first use with
``pip install quixstreams==QUIX_VERSION``; ``SEGS_BENCH_PEER_INSTALL=0`` forbids that).
Readings/s is measured from its first Kafka offset commit to the first commit covering
``target`` messages (``commit_interval`` 5 s, its default); the messages of the first
commit are left out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from segs.bench.infra import Servers, tag
from segs.tools.local_servers import cache_dir
from segs.tools.procfs import cpu_seconds, status_kb

QUIX_VERSION = "3.28.1"
JOB = Path(__file__).with_name("quix_job.py")


class PeerUnavailable(Exception):
    """Quix Streams could not be installed or started here (the reason is the message)."""


def peer_python() -> Path:
    """The interpreter of the peer's environment, made when missing."""
    venv = cache_dir() / f"quixstreams-{QUIX_VERSION}"
    python = venv / "bin" / "python"
    probe = [str(python), "-W", "ignore", "-c", "import quixstreams"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    if os.environ.get("SEGS_BENCH_PEER_INSTALL", "1") == "0":
        raise PeerUnavailable(f"no Quix Streams environment at {venv} and "
                              "SEGS_BENCH_PEER_INSTALL=0")
    shutil.rmtree(venv, ignore_errors=True)
    base = shutil.which("python3.11") or sys.executable
    steps = [[base, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", f"quixstreams=={QUIX_VERSION}"]]
    for argv in steps:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PeerUnavailable(f"{' '.join(argv[:3])} timed out") from exc
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:]
            raise PeerUnavailable(f"{' '.join(argv[:4])} failed: {' '.join(tail)}")
    return python


def _committed(consumer: Consumer, topic: str, parts: list[int]) -> int:
    tps = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=5)
    return sum(max(tp.offset, 0) for tp in tps)


def run_peer(srv: Servers, topic: str, ends: dict[int, int], *, instances: int, target: int,
             workdir: Path, timeout_s: float = 600) -> dict[str, Any]:
    python = peer_python()
    group = f"segs-bench-quix-{tag()}"
    output = f"quix-windows-{tag()}"
    parts = sorted(ends)
    target = min(target, sum(ends.values()))
    state = Path(tempfile.mkdtemp(prefix="segs-bench-quix-"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs: list[subprocess.Popen[bytes]] = []
    log_path = workdir / f"peer-{group}.log"
    watcher = Consumer({"bootstrap.servers": srv.bootstrap, "group.id": group})
    peak_kb: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        with log_path.open("ab") as log:
            for i in range(instances):
                procs.append(subprocess.Popen(
                    [str(python), str(JOB), srv.bootstrap, topic, group, str(state / str(i)),
                     output], env=env, stdout=log, stderr=subprocess.STDOUT))
        start_t = time.perf_counter()
        first_t: float | None = None
        first_n = n = 0
        deadline = time.monotonic() + timeout_s
        while n < target:
            for p in procs:
                if p.poll() is not None:
                    raise PeerUnavailable(f"Quix Streams exited with {p.returncode}: "
                                          + log_path.read_text(errors="replace")[-800:])
                peak_kb[p.pid] = max(peak_kb.get(p.pid, 0), status_kb(p.pid, "VmHWM"))
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), cpu_seconds(p.pid))
            if time.monotonic() > deadline:
                raise PeerUnavailable(f"Quix Streams committed {n} of {target} in {timeout_s} s")
            n = _committed(watcher, topic, parts)
            if first_t is None and n > 0:
                first_t, first_n = time.perf_counter(), n
            time.sleep(0.1)
        done_t = time.perf_counter()
    finally:
        watcher.close()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        shutil.rmtree(state, ignore_errors=True)
    assert first_t is not None
    counted, since = n - first_n, first_t
    if counted <= 0:  # the first commit already covered the target (tiny runs)
        counted, since = n, start_t
    return {
        "framework": f"quixstreams {QUIX_VERSION}", "instances": instances,
        "messages": counted, "seconds": done_t - since,
        "includes_startup": since == start_t,
        "readings_per_s": counted / (done_t - since),
        "peak_rss_mb": sorted(round(kb / 1024, 1) for kb in peak_kb.values()),
        "cpu_us_per_reading": sum(cpu.values()) * 1e6 / max(n, 1),
    }
