"""What every scenario stands on: the servers, fresh databases and topics, pre-loaded input,
and `segs-stream run` as a child process whose workers we can measure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from segs.checkpoint.migrate import migrate
from segs.errors import InfraError
from segs.publish.topics import REGIONAL_RECORD_LIMIT
from segs.tools.local_servers import (
    LocalKafka,
    LocalPostgres,
    free_port,
    kafka_from_env,
    postgres_from_env,
)
from segs.tools.simulator import SimulatorOptions, SimulatorSummary, produce

SEGS = str(Path(sys.executable).with_name("segs-stream"))


@dataclass
class Servers:
    """Kafka bootstrap and the URL of a maintenance database, local or the user's own."""

    bootstrap: str
    postgres_url: str
    local: bool


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    """Start local Kafka and PostgreSQL, unless SEGS_TEST_KAFKA / SEGS_TEST_POSTGRES_URL."""
    with contextlib.ExitStack() as stack:
        bootstrap = kafka_from_env()
        if bootstrap is None:
            bootstrap = stack.enter_context(LocalKafka(heap_mb=1024)).bootstrap
        url = postgres_from_env()
        if url is None:
            url = stack.enter_context(LocalPostgres()).url
        yield Servers(bootstrap, url, local=kafka_from_env() is None)


def tag() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def fresh_database(maintenance_url: str, *, migrated: bool = True) -> Iterator[str]:
    """A new empty database (with the schema unless told otherwise), dropped afterwards."""
    name = f"segs_bench_{tag()}"
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{maintenance_url.rpartition('/')[0]}/{name}"
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(maintenance_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_topics(bootstrap: str, topics: dict[str, int],
                  config: dict[str, dict[str, str]] | None = None) -> None:
    """Create topics (name → partitions), some with topic settings (name → settings)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(name, n, 1, config=(config or {}).get(name, {}))
           for name, n in topics.items()]
    for name, fut in admin.create_topics(new, request_timeout=30).items():
        try:
            fut.result(30)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise InfraError(f"could not create topic {name}: {exc}") from exc


@dataclass
class OutputTopics:
    """The topics one service run writes to, and its consumer group."""

    input: str
    suffix: str = field(default_factory=tag)

    @property
    def group(self) -> str:
        return f"segs-bench-{self.suffix}"

    @property
    def alerts(self) -> str:
        return f"alerts.{self.suffix}"

    def env(self) -> dict[str, str]:
        s = self.suffix
        return {"KAFKA_TOPIC_INPUT": self.input, "KAFKA_TOPIC_AGG_1M": f"aggregates_1m.{s}",
                "KAFKA_TOPIC_AGG_15M": f"aggregates_15m.{s}", "KAFKA_TOPIC_ALERTS": self.alerts,
                "KAFKA_TOPIC_DLQ": f"raw_readings.dlq.{s}", "KAFKA_GROUP_ID": self.group,
                "KAFKA_TOPIC_REGIONAL_AGG_1M": f"aggregates_1m_regional.{s}"}

    def create(self, bootstrap: str) -> None:
        """Output topics; alerts stamped by the broker (LogAppendTime) for latency."""
        outs = {t: 3 for k, t in self.env().items() if k.startswith("KAFKA_TOPIC_")
                and t != self.input}
        regional = self.env()["KAFKA_TOPIC_REGIONAL_AGG_1M"]
        create_topics(bootstrap, outs,
                      {self.alerts: {"message.timestamp.type": "LogAppendTime"},
                       # as the service creates it: room for a large region's meter list
                       regional: {"max.message.bytes": str(REGIONAL_RECORD_LIMIT)}})


def preload(bootstrap: str, topic: str, opts: SimulatorOptions,
            partitions: int = 6) -> SimulatorSummary:
    """Create ``topic`` and fill it with the simulator; fails on any delivery error."""
    create_topics(bootstrap, {topic: partitions})
    summary = produce(opts, {"bootstrap.servers": bootstrap}, topic, progress=False,
                      flush_timeout_s=120)
    if summary.delivery_errors:
        raise InfraError(f"pre-loading {topic}: {summary.delivery_errors} messages failed "
                         f"({summary.last_error})")
    return summary


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "segs-bench-offsets"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in sorted(parts)}
    finally:
        c.close()


def stored_positions(db_url: str, group: str, topic: str) -> dict[int, int]:
    with psycopg.connect(db_url, connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT kafka_partition, next_offset FROM stream_positions "
            "WHERE consumer_group = %s AND topic = %s", (group, topic)).fetchall()
    return {int(p): int(o) for p, o in rows}


# --------------------------------------------------------------------------- processes


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


@dataclass
class Service:
    """`segs-stream run --workers N` as a child process, with its HTTP port."""

    bootstrap: str
    db_url: str
    topics: OutputTopics
    workers: int
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KAFKA_", "POSTGRES_", "PROMETHEUS_"))}
        env.update(self.topics.env())
        env.update({"KAFKA_BROKERS": self.bootstrap, "POSTGRES_URL": self.db_url,
                    "PORT": str(self.port), "HOST": "127.0.0.1", "LOG_LEVEL": "info",
                    "LOG_FORMAT": "json", "SHUTDOWN_TIMEOUT": "60"})
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [SEGS, "--env-file", "/dev/null", "run", "--workers", str(self.workers)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def worker_pids(self) -> list[int]:
        return [] if self.proc is None else worker_pids(self.proc.pid)

    def messages_total(self) -> float:
        """``stream_messages_total`` summed over workers, from /metrics (0 when not up)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("stream_messages_total"))

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise InfraError(f"segs-stream run exited with {self.proc.returncode}: {tail}")

    def stop(self, timeout_s: float = 90) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            for pid in self.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_quiet(limit: float = 1.0, budget_s: float = 600,
                   say: Any = print) -> tuple[float, float, float]:
    """Wait (up to ``budget_s``) until the 1-minute load average is below ``limit``."""
    deadline = time.monotonic() + budget_s
    load = load_average()
    while load[0] >= limit and time.monotonic() < deadline:
        say(f"load average {load[0]:.2f} ≥ {limit}: waiting for a quieter machine")
        time.sleep(30)
        load = load_average()
    return load
