"""What every scenario stands on: the servers, fresh databases and topics, pre-loaded input,
and `segs-stream run` as a child process (:mod:`segs.tools.harness`) set up for measuring."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from segs.checkpoint.migrate import migrate
from segs.errors import InfraError
from segs.publish.topics import REGIONAL_RECORD_LIMIT
from segs.tools.harness import Service, create_topics, service_env
from segs.tools.local_servers import (
    LocalKafka,
    LocalPostgres,
    kafka_from_env,
    postgres_from_env,
)
from segs.tools.simulator import SimulatorOptions, SimulatorSummary, produce


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


def service(bootstrap: str, db_url: str, topics: OutputTopics, workers: int, log_path: Path,
            **settings: str) -> Service:
    """``segs-stream run --workers N`` for a measurement: HTTP on loopback, 60 s to shut
    down (90 s before it is killed)."""
    env = service_env(bootstrap, db_url, topics.env(), HOST="127.0.0.1",
                      SHUTDOWN_TIMEOUT="60", **settings)
    return Service(env, log_path, workers, stop_timeout_s=90)


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
