"""Issue 16, case 8: whether a reading is valid depends on the message alone, so a replay
decides the same.

The future rule compares a reading's timestamp with its message's Kafka timestamp
(CreateTime here, set by the producer) + ``MAX_FUTURE_SKEW``, not with the worker's clock.
The input mixes three kinds of readings whose verdict the two rules disagree on or not:

- ``plain``: a few minutes old, produced now: valid under both;
- ``ahead``: a few minutes old, but 2 h ahead of its CreateTime: the wall clock would let it
  through, the message's own timestamp does not (``future_timestamp``);
- ``early``: 31 min ahead of the wall clock, 1 min ahead of its CreateTime (a producer whose
  clock runs ahead, or a broker that stamps late): valid.

The service consumes a first round and checkpoints it; a second round is consumed and its
dead letters are out, then both workers are SIGKILLed before the next checkpoint and replay
it. The tables and the dead-letter topic must be exactly the message-only verdicts, and each
replayed dead letter identical to the one before the crash.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time

import pytest
from confluent_kafka import Producer

from segs.tools.simulator import SimMessage
from tests.fault.conftest import Fault
from tests.pipeline import TABLES, end_offsets, read_topic, stored_positions
from tests.reference import aggregate, distinct, parse_reading

pytestmark = [pytest.mark.fault]

SKEW_MS = 300_000
METERS = 12
HOUR = 3_600_000


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def readings(round_no: int, now_ms: int) -> list[tuple[bytes, bytes, int]]:
    """(key, value, CreateTime) of one round: every meter, every kind, 20 readings each."""
    base = now_ms - now_ms % 60_000 - 8 * 60_000 + round_no * 200_000
    out = []
    for i in range(20):
        for m in range(METERS):
            ts = base + i * 10_000 + m
            kinds = {"plain": (ts, now_ms), "ahead": (ts, ts - 2 * HOUR),
                     "early": (now_ms + 31 * 60_000 + i * 1000 + m, now_ms + 30 * 60_000)}
            for kind, (event_ms, create_ms) in kinds.items():
                key = f"{kind}-{m}".encode()
                value = json.dumps({"meterId": key.decode(), "region": "r1",
                                    "timestamp": iso(event_ms), "powerKw": 1 + i % 5,
                                    "energyKwh": 0.01}).encode()
                out.append((key, value, create_ms))
    return out


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes, int]]) -> None:
    failed: list[str] = []
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True,
                  "on_delivery": lambda err, _m: failed.append(str(err)) if err else None})
    for key, value, create_ms in messages:
        p.produce(topic, value, key, timestamp=create_ms)
    assert p.flush(30) == 0 and not failed, failed[:3]


def dead_letters(fault: Fault) -> collections.Counter[str]:
    """How often each source offset was dead-lettered."""
    return collections.Counter(dict(m.headers())["segs.source"].decode()
                               for m in read_topic(fault.kafka.bootstrap, fault.topics.dlq))


def test_validity_is_decided_by_the_message_and_replays_the_same(fault: Fault) -> None:
    bootstrap, topic = fault.kafka.bootstrap, fault.topics.input
    now_ms = int(time.time() * 1000)
    first, second = readings(0, now_ms), readings(1, now_ms)
    produce(bootstrap, topic, first)
    svc = fault.service(workers=2, FLUSH_INTERVAL_1M="12000",
                        MAX_FUTURE_SKEW=f"{SKEW_MS}ms").start()
    pids = fault.wait_workers(svc, 2)
    fault.wait_progress(at_least=len(first), timeout_s=90)
    checkpointed = end_offsets(bootstrap, topic)
    produce(bootstrap, topic, second)
    ends = end_offsets(bootstrap, topic)
    round_two = {f"{topic}/{p}/{o}" for p in ends for o in range(checkpointed[p], ends[p])}
    deadline = time.monotonic() + 30
    while not round_two & set(dead_letters(fault)):  # consumed and judged once
        assert time.monotonic() < deadline, "the second round was never dead-lettered"
        time.sleep(0.3)
    positions = stored_positions(fault.db_url, fault.topics.group, topic)
    assert sum(positions.values()) < sum(ends.values()), "checkpointed before the kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    fault.inject("worker SIGKILL", len(pids))
    fault.wait_log(svc, "restarting worker", count=len(pids))

    messages, valid, invalid = [], [], []
    for key, value, create_ms in first + second:
        m = SimMessage(key, value, "raw", None)  # type: ignore[arg-type]
        messages.append(m)
        verdict = parse_reading(value, create_ms, SKEW_MS)
        if isinstance(verdict, str):
            invalid.append((m, verdict))
        else:
            valid.append(verdict)
    assert {m.key.decode().split("-")[0] for m, _ in invalid} == {"ahead"}
    assert {reason for _, reason in invalid} == {"future_timestamp"}
    want = {size: aggregate(distinct(valid), size) for size in TABLES}
    fault.verify(messages, svc, want=want, invalid=invalid, replays=True)
    counts = dead_letters(fault)
    assert any(counts[s] > 1 for s in round_two), "no dead letter was replayed"
    assert svc.stop() == 0
