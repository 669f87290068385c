"""Alerts end to end on the real servers: every injected anomaly once, stable ids on replay,
baselines that survive a restart."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import KafkaServer, Topics
from tests.pipeline import (
    Service,
    process_all,
    read_topic,
    service_env,
    simulate,
    stored_positions,
)
from tests.reference import detect, parse_reading

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alerts(kafka: KafkaServer, topic: str) -> list[dict[str, Any]]:
    out = []
    for m in read_topic(kafka.bootstrap, topic):
        v = msgspec.json.decode(m.value())
        h = dict(m.headers())
        assert h["type"] == b"ANOMALY" and h["severity"] == v["severity"].encode()
        assert h["region"] == v["region"].encode() and m.key() == v["meter_id"].encode()
        out.append(v)
    return out


def _key(a: dict[str, Any]) -> tuple[str, str, str, str]:
    return (a["meter_id"], a["timestamp"], a["metadata"]["kind"], a["severity"])


def _valid(messages: list[Any]) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    return [r for m in messages if isinstance(r := parse_reading(m.value, now), dict)]


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def test_each_injected_anomaly_alerts_once_and_normal_meters_stay_quiet(
        kafka_server: KafkaServer, db_url: str, topics: Topics, tmp_path: Path) -> None:
    messages = simulate(kafka_server.bootstrap, topics.input, tmp_path / "sim.jsonl",
                        meters=300, count=30_000, seed=3, anomaly_fraction=0.003)
    injected = collections.Counter(m.anomaly for m in messages if m.anomaly)
    assert sum(injected.values()) > 10
    process_all(kafka_server.bootstrap, db_url, topics, tmp_path / "service.log")
    alerts = _alerts(kafka_server, topics.alerts)
    got = collections.Counter(_key(a) for a in alerts)
    assert max(got.values()) == 1
    # exactly the readings the simulator made anomalous, nothing for normal load
    by_reading = {(m.key.decode(), parse_reading(m.value, int(time.time() * 1000))["ts_ms"]):
                  m.anomaly for m in messages if m.anomaly}
    assert {(a["meter_id"], a["metadata"]["kind"]) for a in alerts} == {
        (meter, kind) for (meter, _), kind in by_reading.items()}
    assert len(alerts) == len(by_reading)
    # and exactly what the reference detector says, severities included
    want = collections.Counter((m, _iso(ts), k, s) for m, ts, k, s in detect(_valid(messages)))
    assert got == want


def test_replayed_alerts_keep_their_ids_and_baselines_survive_a_restart(
        kafka_server: KafkaServer, db_url: str, topics: Topics, tmp_path: Path) -> None:
    # both runs of readings (80 s of event time each, 60 s apart) lie in the past: the
    # simulator holds back readings ahead of the clock, which would cost the test 80 s
    first = simulate(kafka_server.bootstrap, topics.input, tmp_path / "a.jsonl",
                     meters=100, count=8_000, seed=5, anomaly_fraction=0.004,
                     start_ms=int(time.time() * 1000) - 300_000)
    # 1. no checkpoint before a power cut: everything is replayed after it (one worker, so
    #    no rebalance — whose revoke would checkpoint — happens before the cut)
    env = service_env(kafka_server.bootstrap, db_url, topics.env(), FLUSH_INTERVAL_1M="600000")
    svc = Service(env, tmp_path / "s1.log", workers=1).start()
    try:
        deadline = time.monotonic() + 60
        while len(read_topic(kafka_server.bootstrap, topics.alerts)) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(2)
    finally:
        svc.kill()
    assert not stored_positions(db_url, topics.group, topics.input)
    before = {a["id"]: a for a in _alerts(kafka_server, topics.alerts)}
    process_all(kafka_server.bootstrap, db_url, topics, tmp_path / "s2.log")
    after = _alerts(kafka_server, topics.alerts)
    counts = collections.Counter(a["id"] for a in after)
    assert set(before) <= set(counts)
    assert all(counts[i] == 2 for i in before)  # the replay repeated them, same id, same body
    for a in after:
        if a["id"] in before:
            assert a == before[a["id"]]
    # 2. a clean restart continues from the stored baselines
    second = simulate(kafka_server.bootstrap, topics.input, tmp_path / "b.jsonl",
                      meters=100, count=8_000, seed=6, anomaly_fraction=0.004,
                      start_ms=_valid(first)[-1]["ts_ms"] + 60_000)
    process_all(kafka_server.bootstrap, db_url, topics, tmp_path / "s3.log")
    final = {_key(a) for a in _alerts(kafka_server, topics.alerts)}
    everything = detect(_valid(first) + _valid(second))
    assert final == {(m, _iso(ts), k, s) for m, ts, k, s in everything}
