"""``segs-stream run`` as a child process, and the Kafka and PostgreSQL look-ups around it.

One harness for the end-to-end tests (``tests/pipeline.py``), the benchmark suite
(:mod:`segs.bench`) and ``segs-stream demo``: create the topics, start the service, wait
until it is ready, read its metrics, see how far it got (the input topic's end offsets
against the positions stored in the database), stop it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from segs.errors import InfraError
from segs.tools.procfs import worker_pids

SEGS = str(Path(sys.executable).with_name("segs-stream"))
"""The ``segs-stream`` command of this environment."""

_SERVING = re.compile(r"serving /metrics, /health, /ready on [^:]+:(\d+)")


def service_env(bootstrap: str, db_url: str, topics_env: dict[str, str] | None = None,
                **settings: str) -> dict[str, str]:
    """This process's environment without its Kafka, PostgreSQL and Prometheus settings,
    then the given servers, topics and settings; JSON logs at info, and ``PORT=0`` (the
    service picks a free port and logs it: :meth:`Service.http_port`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "POSTGRES_", "PROMETHEUS_"))}
    env.update(topics_env or {})
    env.update({"KAFKA_BROKERS": bootstrap, "POSTGRES_URL": db_url, "PORT": "0",
                "LOG_LEVEL": "info", "LOG_FORMAT": "json"})
    env.update(settings)
    return env


@dataclass
class Service:
    """One ``segs-stream run`` process (a supervisor and its workers), logging to
    ``log_path``."""

    env: dict[str, str]
    log_path: Path
    workers: int = 2
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)
    stop_timeout_s: float = 60.0
    _port: int | None = field(default=None, init=False, repr=False)

    def start(self) -> Service:
        self._port = None
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [SEGS, "--env-file", "/dev/null", "run", "--workers", str(self.workers),
                 *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent)
        return self

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    # ------------------------------------------------------------------ watching

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def exit_code(self) -> int | None:
        """None while it runs (or before it started)."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise :class:`InfraError`, with the end of the log, once the process has ended."""
        if self.proc is not None and self.proc.poll() is not None:
            raise InfraError(f"segs-stream run exited with {self.proc.returncode}: "
                             + self.log_text()[-2000:])

    def worker_pids(self) -> list[int]:
        return [] if self.proc is None else worker_pids(self.proc.pid)

    def wait_workers(self, n: int, timeout_s: float = 60) -> list[int]:
        """Until the service runs ``n`` worker processes; their pids. A loaded machine takes
        seconds to spawn them, so callers wait for this rather than sleep."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if len(pids) == n:
                return pids
            self.check_alive()
            time.sleep(0.1)
        raise InfraError(f"{self.log_path.name}: {n} workers never ran")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_port(self, timeout_s: float = 30) -> int:
        """The port the service's HTTP endpoint bound, as its log says."""
        deadline = time.monotonic() + timeout_s
        while self._port is None and time.monotonic() < deadline:
            m = _SERVING.search(self.log_text())
            if m:
                self._port = int(m.group(1))
                break
            self.check_alive()
            time.sleep(0.1)
        if self._port is None:
            raise InfraError("the service never logged its HTTP port")
        return self._port

    def get(self, path: str) -> tuple[int, str]:
        """``GET`` one of the service's endpoints on loopback: status and text."""
        port = self.http_port()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until ``/ready`` answers 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                if self.get("/ready")[0] == 200:
                    return
            time.sleep(0.2)
        raise InfraError(f"segs-stream run was not ready within {timeout_s:g} s")

    def metric(self, name: str) -> float:
        """The samples of ``name`` on ``/metrics`` added up (over labels and workers); 0
        when the endpoint does not answer."""
        try:
            _, text = self.get("/metrics")
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith((name + " ", name + "{")))

    # ------------------------------------------------------------------ stopping

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float | None = None) -> int:
        """SIGTERM, then wait for the exit code; past ``timeout_s`` (``stop_timeout_s``)
        everything is killed and :class:`InfraError` raised."""
        if self.proc is None:
            return 0
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise InfraError(f"segs-stream run did not stop within {timeout_s:g} s "
                             "of SIGTERM: killed") from exc

    def kill(self) -> None:
        """SIGKILL the supervisor and all its workers (as a power cut would)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = self.worker_pids()
        self.proc.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)


# --------------------------------------------------------------------------- Kafka


def create_topics(bootstrap: str, topics: dict[str, int],
                  config: dict[str, dict[str, str]] | None = None,
                  timeout_s: float = 30.0) -> None:
    """Create topics (name → partitions) that do not exist yet, some with topic settings
    (name → settings)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [NewTopic(name, n, 1, config=(config or {}).get(name, {}))
           for name, n in topics.items() if name not in existing]
    if not new:
        return
    for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            fut.result(timeout_s)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise InfraError(f"could not create topic {name}: {exc}") from exc


def delete_topics(bootstrap: str, names: list[str], timeout_s: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    todo = [n for n in names if n in existing]
    if todo:
        for fut in admin.delete_topics(todo, request_timeout=timeout_s).values():
            with contextlib.suppress(Exception):
                fut.result(timeout_s)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of each partition of ``topic``."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "segs-harness-offsets"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in sorted(parts)}
    finally:
        c.close()


# --------------------------------------------------------------------------- PostgreSQL


def stored_positions(db_url: str, group: str, topic: str) -> dict[int, int]:
    """The next offset per partition the service has stored for ``group`` and ``topic``
    ({} when the database does not answer)."""
    try:
        with psycopg.connect(db_url, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT kafka_partition, next_offset FROM stream_positions "
                "WHERE consumer_group = %s AND topic = %s", (group, topic)).fetchall()
    except psycopg.Error:
        return {}
    return {int(p): int(o) for p, o in rows}


def covered(ends: dict[int, int], positions: dict[int, int]) -> bool:
    """Whether ``positions`` reach every end offset of ``ends``."""
    return all(positions.get(p, 0) >= end for p, end in ends.items() if end > 0)

