"""Publishing closed windows at high cardinality, against PostgreSQL's idle-in-transaction
timeout (issue 16, case 3).

A claim that kept one transaction open while it delivered every closed window to Kafka was
ended by the server once delivery outlasted ``idle_in_transaction_session_timeout``: nothing
was marked published and every checkpoint sent the same windows again. Here the timeout is
short and the claim long:

- in process: a :class:`~segs.checkpoint.sink.Sink` whose sessions have a 1 s timeout publishes
  40,000 closed windows through a throttled delivery to the real broker;
- the service: 2 workers close 100,000 meters' windows at once while the test plays the
  server's timeout at 0.5 s (it terminates any session of the database idle in a
  transaction for longer; the service sets its own timeout per session, so the database
  setting would not reach it). Every closed window must be marked published, the topics
  must hold each window with the table's values last, with few repeats, and the stored
  aggregates must be exact.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import pytest
from confluent_kafka import Producer

import segs.checkpoint.sink
from segs.checkpoint.migrate import migrate
from segs.checkpoint.sink import ClosedRow, Sink
from segs.publish.outputs import encode_aggregates
from tests.fault.conftest import Fault
from tests.pipeline import read_topic

pytestmark = pytest.mark.fault

MINUTE = 60_000
QUARTER = 15 * MINUTE
IDLE_S = 0.5  # the idle-in-transaction timeout the test plays for the service


def iso_ms(ms: int) -> str:
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def start_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def latest(fault: Fault, topic: str) -> tuple[dict[tuple[str, int], tuple[Any, ...]], int]:
    """The last message per (meterId, windowStart ms) of ``topic`` as a table row's values
    (sample_count, avg, max, min, energy, region), and the number of messages."""
    out: dict[tuple[str, int], tuple[Any, ...]] = {}
    msgs = read_topic(fault.kafka.bootstrap, topic, timeout_s=120)
    for m in msgs:
        v = msgspec.json.decode(m.value())
        out[(v["meterId"], start_ms(v["windowStart"]))] = (
            v["readingCount"], v["avgPowerKw"], v["maxPowerKw"], v["minPowerKw"],
            v["energyKwhSum"], v["region"])
    return out, len(msgs)


def table(db_url: str, name: str) -> dict[tuple[str, int], tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            f"SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, sample_count, "
            f"avg_power, max_power, min_power, total_energy, region FROM {name}").fetchall()
    return {(r[0], int(r[1])): tuple(r[2:]) for r in rows}


# rows not published by either path (segs.checkpoint.sink.Sink.claim_closed): flagged for
# the catch-up, or after the cursor of their partition's position
_UNPUBLISHED = """
SELECT count(*) FROM {table} AS a
LEFT JOIN stream_positions AS s ON s.kafka_partition = a.source_partition
WHERE NOT a.published OR (s.kafka_partition IS NOT NULL AND (a.window_end, a.meter_id)
    > (COALESCE('epoch'::timestamptz + s.published_{size}_ms * interval '1 ms', '-infinity'),
       COALESCE(s.published_{size}_meter, '')))
"""


def unpublished(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return sum(int(conn.execute(_UNPUBLISHED.format(table=t, size=size).encode())
                       .fetchone()[0])  # type: ignore[index]
                   for t, size in (("aggregates_1m", "1m"), ("aggregates_15m", "15m")))


class IdleTimeout:
    """PostgreSQL's ``idle_in_transaction_session_timeout`` at ``limit_s``, played from
    outside: terminates every other session of the database idle in a transaction for
    longer, as the server does at its timeout."""

    def __init__(self, db_url: str, limit_s: float) -> None:
        self.db_url, self.limit_s = db_url, limit_s
        self.terminated = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idle-timeout", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self._stop.wait(0.05):
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND state = 'idle in transaction' "
                    "AND clock_timestamp() - state_change > %s * interval '1 second'",
                    (self.limit_s,)).fetchall()
                self.terminated += sum(1 for (ok,) in rows if ok)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def idle_timeout(fault: Fault) -> Iterator[IdleTimeout]:
    migrate(fault.db_url)  # the tables exist before the service's first session
    watch = IdleTimeout(fault.db_url, IDLE_S)
    yield watch
    watch.stop()


@pytest.mark.parametrize("owned", [True, False], ids=["cursor", "catch-up"])
def test_a_claim_longer_than_the_idle_timeout_is_delivered_and_marked(
        fault: Fault, monkeypatch: pytest.MonkeyPatch, owned: bool) -> None:
    """Written by the partitions' owner the rows are published through the cursor, written
    without positions by the catch-up path; either way chunk by chunk."""
    migrate(fault.db_url)
    monkeypatch.setattr(segs.checkpoint.sink, "IDLE_IN_TXN_MS", 1_000)  # read by the Sink's pool
    sink = Sink(fault.db_url, consumer_group="g", topic="t")
    sink.open()
    producer = Producer({"bootstrap.servers": fault.kafka.bootstrap, "linger.ms": 5})
    topic = fault.topics.agg_1m
    meters = 40_000
    rows = [(f"m{i:05d}", "north", 0, 2, 3.0, 2.0, 1.0, 0.5, 1_000, i % 2)
            for i in range(meters)]
    try:
        sink.commit({60: rows}, [], {0: (None, 1, 0), 1: (None, 1, 0)} if owned else {})

        def deliver(size_s: int, got: list[ClosedRow]) -> None:
            for key, value, headers in encode_aggregates(size_s, got):
                producer.produce(topic, value, key, headers=headers)
            assert producer.flush(10) == 0
            time.sleep(0.4)  # a slow broker: the whole claim takes longer than 1 s

        fault.inject("claim longer than idle_in_transaction_session_timeout")
        done = sink.claim_closed({0: MINUTE, 1: MINUTE}, deliver)
        assert done == {60: meters, 900: 0}
        assert sink.claim_closed({0: MINUTE, 1: MINUTE}, deliver) == {60: 0, 900: 0}
    finally:
        sink.close()
    assert unpublished(fault.db_url) == 0
    got, count = latest(fault, topic)
    assert count == meters, f"{count - meters} windows delivered twice"
    assert got == table(fault.db_url, "aggregates_1m")


def test_closed_windows_of_many_meters_are_published_once(fault: Fault,
                                                          idle_timeout: IdleTimeout) -> None:
    meters = 100_000
    now = int(time.time() * 1000)
    at = now // QUARTER * QUARTER - 20 * MINUTE  # both of its windows ended minutes ago
    messages = fault.produce(
        (f"meter-{i}".encode(),
         msgspec.json.encode({"meterId": f"meter-{i}", "region": f"r{i % 7}",
                              "timestamp": iso_ms(at + i % 50_000), "powerKw": 1 + i % 13,
                              "energyKwh": 0.01 * (i % 5)}),
         None) for i in range(meters))
    fault.inject("closed windows in one claim", 2 * meters)
    svc = fault.service(workers=2).start()
    fault.verify(messages, svc, timeout_s=120)
    deadline = time.monotonic() + 90
    while (left := unpublished(fault.db_url)) > 0:  # the partitions fall idle: all close
        assert svc.proc is not None and svc.proc.poll() is None, svc.log_text()[-3000:]
        assert time.monotonic() < deadline, (
            f"{left} closed windows never marked published; the idle timeout ended "
            f"{idle_timeout.terminated} sessions")
        time.sleep(0.5)
    t0 = time.monotonic()
    assert svc.stop() == 0, svc.log_text()[-3000:]
    stop_s = time.monotonic() - t0
    fault.entry.notes.append(f"sessions ended by the idle timeout: {idle_timeout.terminated}; "
                             f"stopped in {stop_s:.1f} s")
    repeats = collections.Counter[str]()
    for name, topic in (("aggregates_1m", fault.topics.agg_1m),
                        ("aggregates_15m", fault.topics.agg_15m)):
        want = table(fault.db_url, name)
        got, count = latest(fault, topic)
        assert got.keys() == want.keys(), f"{name}: {len(want.keys() - got.keys())} unpublished"
        wrong = [k for k in want if got[k][:5] != want[k][:5] or got[k][5] != want[k][5]]
        assert not wrong, f"{name}: the topic's last value differs for {len(wrong)} windows"
        repeats[name] = count - len(want)
    fault.entry.notes.append(f"repeated messages: {dict(repeats)}")
    assert sum(repeats.values()) <= meters // 100, f"too many repeats: {dict(repeats)}"
    fault.assert_no_crash(svc)
