"""Fixtures shared by every test tier.

Integration and fault tests get a real Kafka broker and a real PostgreSQL server, started
once per test session by :mod:`segs.tools.local_servers` (or the servers named by
``SEGS_TEST_KAFKA`` / ``SEGS_TEST_POSTGRES_URL``). Each test gets its own database and its
own topic names, so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from segs.tools.harness import create_topics
from segs.tools.local_servers import LocalKafka, LocalPostgres, kafka_from_env, postgres_from_env


@dataclass
class KafkaServer:
    bootstrap: str
    local: LocalKafka | None  # None when the user's own broker is used


@dataclass
class PostgresServer:
    url: str  # of the maintenance database
    local: LocalPostgres | None


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[KafkaServer]:
    external = kafka_from_env()
    if external:
        yield KafkaServer(external, None)
        return
    local = LocalKafka().start()
    try:
        yield KafkaServer(local.bootstrap, local)
    finally:
        local.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    external = postgres_from_env()
    if external:
        yield PostgresServer(external, None)
        return
    local = LocalPostgres().start()
    try:
        yield PostgresServer(local.url, local)
    finally:
        local.close()


@pytest.fixture
def db_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = f"segs_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_server.url.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Topics:
    input: str
    agg_1m: str
    agg_15m: str
    alerts: str
    dlq: str
    group: str
    regional: str = ""  # the service's default name when empty

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_TOPIC_INPUT": self.input, "KAFKA_TOPIC_AGG_1M": self.agg_1m,
            "KAFKA_TOPIC_AGG_15M": self.agg_15m, "KAFKA_TOPIC_ALERTS": self.alerts,
            "KAFKA_TOPIC_DLQ": self.dlq, "KAFKA_GROUP_ID": self.group,
            **({"KAFKA_TOPIC_REGIONAL_AGG_1M": self.regional} if self.regional else {}),
        }


@pytest.fixture
def topics(kafka_server: KafkaServer) -> Topics:
    """Fresh topic names (input with 6 partitions) and a fresh consumer group."""
    tag = uuid.uuid4().hex[:10]
    t = Topics(f"raw_readings.{tag}", f"aggregates_1m.{tag}", f"aggregates_15m.{tag}",
               f"alerts.{tag}", f"raw_readings.dlq.{tag}", f"segs-{tag}",
               f"aggregates_1m_regional.{tag}")
    create_topics(kafka_server.bootstrap, {t.input: 6, t.agg_1m: 3, t.agg_15m: 3,
                                           t.alerts: 3, t.dlq: 3, t.regional: 3})
    return t
