"""Cut-over from the TypeScript service (issue 19, item 5): the first start continues where
the old service's consumer group stopped.

The old service kept its positions only as the group's committed Kafka offsets. Here a
plain confluent-kafka consumer commits offsets under the group for five of the six input
partitions (the sixth has none, like a partition the old service never read); then
`segs-stream run` with that group starts on an empty database. With START_FROM_COMMITTED
on (the default) the stored aggregates must equal the reference of exactly the messages at
or after the committed offsets, plus the whole sixth partition (KAFKA_AUTO_OFFSET_RESET,
earliest); with it off, of every message. The old service's client id is honoured, and its
NODE_ENV is named once as ignored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.conftest import KafkaServer, Topics
from tests.pipeline import (
    Service,
    assert_exact,
    end_offsets,
    expected,
    read_topic,
    service_env,
    simulate,
    stored_positions,
    wait_consumed,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Read(NamedTuple):
    """What :func:`tests.pipeline.expected` needs of a message."""

    value: bytes


def commit_as_old_service(bootstrap: str, group: str, topic: str,
                          offsets: dict[int, int]) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()],
                 asynchronous=False)
        got = c.committed([TopicPartition(topic, p) for p in offsets], timeout=10)
        assert {tp.partition: tp.offset for tp in got} == offsets
    finally:
        c.close()


def group_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(6)], timeout=10)
        return {tp.partition: tp.offset for tp in got if tp.offset >= 0}
    finally:
        c.close()


def member_client_ids(bootstrap: str, group: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return {m.client_id for m in desc.members}


@pytest.mark.parametrize("from_committed", ["on", "off"])
def test_the_first_start_continues_from_the_groups_committed_offsets(
        kafka_server: KafkaServer, db_url: str, topics: Topics, tmp_path: Path,
        from_committed: str) -> None:
    bootstrap = kafka_server.bootstrap
    simulate(bootstrap, topics.input, tmp_path / "sim.jsonl", meters=120, regions=3,
             count=12_000, seed=19, anomaly_fraction=0.002, late_fraction=0.01,
             invalid_fraction=0.01)
    ends = end_offsets(bootstrap, topics.input)
    committed = {p: end * (p + 1) // 8 for p, end in ends.items() if p != 5}
    assert all(0 < o < ends[p] for p, o in committed.items())
    commit_as_old_service(bootstrap, topics.group, topics.input, committed)

    env = service_env(bootstrap, db_url, topics.env(), START_FROM_COMMITTED=from_committed,
                      KAFKA_CLIENT_ID="stream-processor", NODE_ENV="production")
    svc = Service(env, tmp_path / "service.log").start()
    try:
        wait_consumed(db_url, topics.group, topics.input, ends, service=svc)
        assert member_client_ids(bootstrap, topics.group) == {"stream-processor"}
        assert svc.stop() == 0, svc.log_text()[-2000:]
    finally:
        svc.kill()

    start = committed if from_committed == "on" else {}
    after: list[Any] = [Read(m.value()) for m in read_topic(bootstrap, topics.input)
                        if m.offset() >= start.get(m.partition(), 0)]
    assert len(after) < sum(ends.values()) or from_committed == "off"
    want, _ = expected(after, int(time.time() * 1000))
    assert_exact(db_url, want)
    log = svc.log_text()
    assert log.count("ignored, not settings of segs-stream: NODE_ENV") == 1, log[-2000:]
    assert ("start at the group's committed offsets" in log) == (from_committed == "on")
    # rolling back: the old service would continue from the group's offsets, now ours
    assert group_offsets(bootstrap, topics.group, topics.input) == stored_positions(
        db_url, topics.group, topics.input) == {p: e for p, e in ends.items() if e}
