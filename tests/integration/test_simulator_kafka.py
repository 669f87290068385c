"""The simulator against the real broker: keys, fields and the file match what was produced."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import msgspec
import pytest

from tests.conftest import KafkaServer, Topics
from tests.pipeline import read_topic, simulate
from tests.reference import parse_reading

pytestmark = pytest.mark.integration

FIELDS = {"readingId", "meterId", "userId", "timestamp", "powerKw", "energyKwh", "voltage",
          "region", "seq", "status", "metadata"}


def test_messages_round_trip_with_keys_fields_and_file(kafka_server: KafkaServer,
                                                       topics: Topics, tmp_path: Path) -> None:
    produced = simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl",
                        meters=50, count=5_000, seed=9, duplicate_fraction=0.01,
                        invalid_fraction=0.01)
    consumed = read_topic(kafka_server.bootstrap, topics.input)
    assert len(consumed) == len(produced) == 5_000
    assert collections.Counter((m.key(), m.value()) for m in consumed) == collections.Counter(
        (m.key, m.value) for m in produced)
    per_key_order = collections.defaultdict(list)
    for m in produced:
        per_key_order[m.key].append(m.value)
    for key, values in per_key_order.items():  # a meter's messages keep their order
        assert [m.value() for m in consumed if m.key() == key] == values
    now = int(time.time() * 1000)
    valid = [m for m in consumed if isinstance(parse_reading(m.value(), now), dict)]
    assert len(valid) >= 4_900
    for m in valid:
        v = msgspec.json.decode(m.value())
        assert v.keys() >= FIELDS
        assert m.key() == v["meterId"].encode()
        assert v["meterId"].startswith("MTR-") and len(v["meterId"]) == 12
        assert v["userId"] == "USR-" + v["meterId"][4:]
        assert v["timestamp"].endswith("Z")
