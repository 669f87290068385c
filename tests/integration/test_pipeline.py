"""`segs-stream run` end to end on the real Kafka and PostgreSQL: exact under disruption.

Each test streams simulated readings (duplicates, out-of-order, late and invalid ones
included) through the service while something happens to it, then checks that the
database equals the reference aggregates of the simulator's file exactly, that the
dead-letter topic holds exactly the invalid messages, and that closed windows were
published.
"""

from __future__ import annotations

import collections
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psycopg
import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from segs.tools.simulator import SimulatorOptions, generate
from tests.conftest import KafkaServer, PostgresServer, Topics
from tests.pipeline import (
    Service,
    assert_exact,
    end_offsets,
    expected,
    read_topic,
    rss_kb,
    service_env,
    simulate,
    stored,
    stored_positions,
    wait_consumed,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIM = dict(meters=200, regions=4, seed=7, anomaly_fraction=0.002, duplicate_fraction=0.01,
           out_of_order_fraction=0.01, late_fraction=0.01, invalid_fraction=0.01)


@dataclass
class Run:
    kafka: KafkaServer
    db_url: str
    topics: Topics
    tmp: Path

    def service(self, workers: int = 2, name: str = "service", **env: str) -> Service:
        return Service(service_env(self.kafka.bootstrap, self.db_url, self.topics.env(), **env),
                       self.tmp / f"{name}.log", workers=workers)

    def stream(self, count: int, rate: float, **overrides: object) -> Callable[[], list]:
        """Simulate in the background; the returned call joins and gives the messages."""
        result: list = []
        opts = {**SIM, **overrides, "count": count, "rate": rate}
        t = threading.Thread(target=lambda: result.extend(
            simulate(self.kafka.bootstrap, self.topics.input, self.tmp / "sim.jsonl", **opts)))
        t.start()

        def join() -> list:
            t.join(300)
            return result

        return join

    def verify(self, messages: list, service: Service | None = None, *,
               deduplicate: bool = True) -> None:
        ends = end_offsets(self.kafka.bootstrap, self.topics.input)
        assert sum(ends.values()) == len(messages)
        wait_consumed(self.db_url, self.topics.group, self.topics.input, ends, service=service)
        want, invalid = expected(messages, int(time.time() * 1000), deduplicate=deduplicate)
        assert_exact(self.db_url, want)
        dlq = read_topic(self.kafka.bootstrap, self.topics.dlq)
        # at-least-once like every output topic: partitions re-read after a kill, or after a
        # revoke the database could not checkpoint, repeat their dead letters; the source
        # header (topic/partition/offset) identifies the repeats
        letters = {dict(m.headers())["segs.source"]: (m.value(),
                                                      dict(m.headers())["segs.error"].decode())
                   for m in dlq}
        got = collections.Counter(letters.values())
        assert got == collections.Counter((m.value, reason) for m, reason in invalid)


def test_exact_with_two_workers_and_closed_windows_published(run: Run,
                                                             cleanup: list[Service]) -> None:
    messages = run.stream(20_000, 0)()
    svc = run.service()
    cleanup.append(svc)
    svc.start()
    run.verify(messages, svc)
    time.sleep(4)  # idle advance closes the newest windows; the next checkpoint publishes
    assert svc.stop() == 0
    topic_of = {60: run.topics.agg_1m, 900: run.topics.agg_15m}
    cutoff_ms = int(time.time() * 1000) - 10_000  # closed by idle advance + lateness
    for size, topic in topic_of.items():
        published = {}
        for m in read_topic(run.kafka.bootstrap, topic):
            v = msgspec.json.decode(m.value())
            assert dict(m.headers())["type"] == f"{v['granularity']}_aggregate".encode()
            assert m.key() == v["meterId"].encode()
            published[(v["meterId"], iso_to_ms(v["windowStart"]))] = v  # latest wins
        rows = stored(run.db_url, size)
        closed = {k for k in rows if k[1] + size * 1000 <= cutoff_ms}
        assert closed, "the stream should have closed windows"
        assert closed <= published.keys() <= rows.keys()
        for key, v in published.items():
            count, avg, mx, mn, energy, region, _ = rows[key]
            assert (v["readingCount"], v["maxPowerKw"], v["minPowerKw"], v["region"]) == (
                count, mx, mn, region)
            assert v["avgPowerKw"] == pytest.approx(avg, rel=1e-12)
            assert v["energyKwhSum"] == pytest.approx(energy, rel=1e-12)


def iso_to_ms(text: str) -> int:
    from tests.reference import timestamp_ms

    ms = timestamp_ms(text)
    assert ms is not None
    return ms


def test_exact_when_a_worker_is_killed(run: Run, cleanup: list[Service]) -> None:
    join = run.stream(40_000, 8_000)
    svc = run.service()
    cleanup.append(svc)
    svc.start()
    pids = svc.wait_workers(2)
    time.sleep(1)  # the kill lands mid-stream
    victim = random.choice(pids)
    signal_kill(victim)
    messages = join()
    run.verify(messages, svc)
    assert "exited with code" in svc.log_text()
    assert svc.stop() == 0


def test_exact_when_a_second_service_joins_and_the_first_leaves(run: Run,
                                                              cleanup: list[Service]) -> None:
    join = run.stream(40_000, 8_000)
    first = run.service(workers=1, name="first")
    second = run.service(workers=1, name="second")
    cleanup += [first, second]
    first.start().wait_workers(1)
    time.sleep(1)
    second.start().wait_workers(1)
    time.sleep(2.5)
    assert first.stop() == 0
    messages = join()
    run.verify(messages, second)
    assert second.stop() == 0
    assert "assigned partitions" in second.log_text()


def test_sigterm_exits_zero_and_a_restart_finishes_exactly(run: Run,
                                                          cleanup: list[Service]) -> None:
    join = run.stream(30_000, 8_000)
    svc = run.service()
    cleanup.append(svc)
    svc.start().wait_workers(2)
    time.sleep(1)
    t0 = time.monotonic()
    assert svc.stop(timeout_s=25) == 0
    assert time.monotonic() - t0 < 20  # SHUTDOWN_TIMEOUT
    messages = join()
    again = run.service(name="again")
    cleanup.append(again)
    again.start()
    run.verify(messages, again)
    assert again.stop() == 0


def test_exact_through_a_database_outage(run: Run, cleanup: list[Service],
                                         postgres_server: PostgresServer) -> None:
    if postgres_server.local is None:
        pytest.skip("needs the local PostgreSQL server to stop and start it")
    # 25 s of input: still flowing through the 15 s outage however long the group join
    # takes (at 8,000/s the stream was over and checkpointed before the outage began once)
    join = run.stream(40_000, 1_600)
    svc = run.service()
    cleanup.append(svc)
    svc.start()
    wait_started(run)
    postgres_server.local.stop()
    rss: list[int] = []
    try:
        for _ in range(15):
            time.sleep(1)
            rss.append(sum(rss_kb(p) for p in svc.worker_pids()))
    finally:
        postgres_server.local.start()
    messages = join()
    run.verify(messages, svc)
    assert "pausing intake" in svc.log_text()
    assert max(rss) < 2 * 400_000  # kB for both workers: intake pauses, memory stays bounded
    assert svc.stop() == 0


def wait_started(run: Run, timeout_s: float = 60) -> None:
    """Until the service has stored a first position (it is consuming)."""
    deadline = time.monotonic() + timeout_s
    while not stored_positions(run.db_url, run.topics.group, run.topics.input):
        assert time.monotonic() < deadline, "service stored no position"
        time.sleep(0.2)


def signal_kill(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)


def test_exact_when_meters_send_on_every_partition(run: Run, cleanup: list[Service]) -> None:
    """A producer that ignores the meter key and spreads every meter over all partitions.
    A worker then cannot cut its checkpoint along partitions (segs/checkpoint/payload.py) and writes
    it whole; results stay exact, also when a worker is killed mid-stream. Both workers
    write every meter's windows, so windows one takes for fresh are often stored by the
    other already: the plain insert falls back to the merge, and that too is exact.

    It runs with ``DEDUPLICATE=off``: a re-send is recognised by the worker holding its
    meter's window, or in a checkpoint's transaction for a stored one, so one that two
    workers hold side by side for a meter spread over their partitions counts twice
    (docs/contract.md, "Re-sent readings")."""
    opts = SimulatorOptions(**{**SIM, "count": 30_000})
    messages = [m for batch in generate(opts) for m in batch]

    def produce_round_robin() -> None:
        producer = Producer({"bootstrap.servers": run.kafka.bootstrap, "linger.ms": 5})
        for i, m in enumerate(messages):
            producer.produce(run.topics.input, m.value, m.key, partition=i % 6)
            if i % 1_000 == 999:
                producer.poll(0)
                time.sleep(0.2)  # about 5,000 messages/s: the kill lands mid-stream
        assert producer.flush(30) == 0

    feeder = threading.Thread(target=produce_round_robin)
    feeder.start()
    svc = run.service(LOG_LEVEL="debug", DEDUPLICATE="off")
    cleanup.append(svc)
    svc.start()
    time.sleep(3)
    signal_kill(random.choice(svc.worker_pids()))
    feeder.join(120)
    run.verify(messages, svc, deduplicate=False)
    assert svc.stop() == 0
    assert "readings came from two partitions: one checkpoint transaction" in svc.log_text()
    assert "partials were stored already: merged instead" in svc.log_text()


def messages_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    return sum(s.value for family in text_string_to_metric_families(body)
               for s in family.samples if s.name == "stream_messages_total")


def test_the_loop_consumes_while_a_checkpoint_waits_on_the_database(
        run: Run, cleanup: list[Service]) -> None:
    """Checkpoints are written by a thread of their own (segs/runtime/checkpointer.py): while
    the database holds one up, the poll loop goes on consuming (and alerting); results stay
    exact."""
    join = run.stream(45_000, 3_000)
    svc = run.service()
    cleanup.append(svc)
    svc.start()
    port = svc.http_port()
    wait_started(run)
    with psycopg.connect(run.db_url) as conn:  # one transaction, held open
        conn.execute("LOCK TABLE stream_positions IN ACCESS EXCLUSIVE MODE")
        time.sleep(2)  # FLUSH_INTERVAL_1M is 1 s: both workers' checkpoints wait by now
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                           "'Lock' AND datname = current_database()").fetchone()
        before = messages_total(port)
        time.sleep(3)
        after = messages_total(port)
        conn.rollback()
    assert row is not None and row[0] >= 1, "no checkpoint waited on the lock"
    assert after - before >= 3_000  # about 9,000 were produced; a stalled loop took none
    messages = join()
    run.verify(messages, svc)
    assert svc.stop() == 0
