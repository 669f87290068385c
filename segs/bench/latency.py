"""Latency at a steady produced rate (half the measured maximum), with the simulator's
anomalies, against `segs-stream run` on a fresh topic.

* **alert**: from a reading's produce timestamp (its Kafka ``CreateTime``) to its alert being
  in the alerts topic (that topic is created with ``LogAppendTime``, so the broker stamps it);
* **window row**: from the produce timestamp of a 1-minute window's last reading to the
  commit of the transaction that stored it. The row's ``updated_at`` is that transaction's
  ``now()``; a poller sees each new ``stream_positions.updated_at`` (same transaction) within
  0.1 s of its commit and records when, so the commit time is observed, not assumed.

Readings are matched exactly (meter id and event time) by scanning the input topic once.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from segs.bench.infra import OutputTopics, Servers, fresh_database, service, tag
from segs.errors import InfraError
from segs.intake.decode import parse_timestamp_ms
from segs.tools.harness import Service, covered, create_topics, end_offsets, stored_positions
from segs.tools.simulator import SimulatorOptions, produce

ROW_SAMPLE = 3000
_TS_FIELD = b'"timestamp":"'


class _CommitWatcher(threading.Thread):
    """Records when each new transaction timestamp appears in ``stream_positions``."""

    def __init__(self, db_url: str, group: str) -> None:
        super().__init__(daemon=True)
        self.db_url, self.group = db_url, group
        self.seen: dict[datetime, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute("SELECT DISTINCT updated_at FROM stream_positions "
                                    "WHERE consumer_group = %s", (self.group,)).fetchall()
                now = time.time()
                for (ts,) in rows:
                    self.seen.setdefault(ts, now)
                time.sleep(0.1)


def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every message of a (small) topic."""
    ends = end_offsets(bootstrap, topic)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"segs-bench-{tag()}",
                  "enable.auto.commit": False})
    out: list[Any] = []
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        todo = {p: e for p, e in ends.items() if e > 0}
        deadline = time.monotonic() + 120
        while todo and time.monotonic() < deadline:
            for m in c.consume(10_000, 0.5):
                if m.error() is None:
                    out.append(m)
                    p, off = m.partition() or 0, m.offset() or 0
                    if off + 1 >= todo.get(p, 0):
                        todo.pop(p, None)
    finally:
        c.close()
    return out


def _produce_times(bootstrap: str, topic: str,
                   wanted: set[tuple[bytes, int]]) -> dict[tuple[bytes, int], int]:
    """Kafka CreateTime (ms) of the input messages with these (meter key, event time ms)."""
    keys = {k for k, _ in wanted}
    ends = end_offsets(bootstrap, topic)
    total = sum(ends.values())
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"segs-bench-{tag()}",
                  "enable.auto.commit": False})
    found: dict[tuple[bytes, int], int] = {}
    seen = 0
    try:
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + 300
        while seen < total and time.monotonic() < deadline:
            msgs = c.consume(10_000, 0.5)
            seen += len(msgs)
            for m in msgs:
                key = m.key()
                if key not in keys:
                    continue
                value = m.value() or b""
                at = value.find(_TS_FIELD) + len(_TS_FIELD)
                ts = parse_timestamp_ms(value[at:value.find(b'"', at)].decode())
                if ts is not None and (key, ts) in wanted:
                    found.setdefault((key, ts), m.timestamp()[1])
    finally:
        c.close()
    return found


def _percentiles(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(ms)
    return {"count": len(ms), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def run_latency(srv: Servers, *, rate: float, meters: int, duration_s: float, workers: int,
                workdir: Path, flush_interval_ms: int, time_speedup: float = 1.0
                ) -> dict[str, Any]:
    """Produce ``rate`` readings/s for ``duration_s`` while the service runs; measure.

    The simulator's interval is ``meters / rate × time_speedup`` seconds, so event time runs
    ``time_speedup`` times as fast as the wall clock (1.0: as in production; more lets a
    short run close 1-minute windows)."""
    topic = f"raw_readings.latency.{tag()}"
    create_topics(srv.bootstrap, {topic: 6})
    topics = OutputTopics(topic)
    topics.create(srv.bootstrap)
    opts = SimulatorOptions(meters=meters, rate=rate, duration_s=duration_s,
                            interval_s=max(0.001, meters / rate * time_speedup),
                            anomaly_fraction=0.001)
    with fresh_database(srv.postgres_url) as db:
        svc = service(srv.bootstrap, db, topics, workers, workdir / f"latency-{topic}.log",
                      FLUSH_INTERVAL_1M=str(flush_interval_ms))
        watcher = _CommitWatcher(db, topics.group)
        with svc:
            _wait_assigned(svc)
            watcher.start()
            summary = produce(opts, {"bootstrap.servers": srv.bootstrap}, topic,
                              progress=False)
            ends = end_offsets(srv.bootstrap, topic)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                svc.check_alive()
                if covered(ends, stored_positions(db, topics.group, topic)):
                    break
                time.sleep(0.2)
            time.sleep(0.3)
        watcher.stop.set()
        watcher.join(5)
        last_event_ms = summary.last_event_ms or 0
        with psycopg.connect(db) as conn:
            rows = conn.execute(
                "SELECT meter_id, (extract(epoch FROM last_reading_at) * 1000)::int8, "
                "updated_at FROM aggregates_1m WHERE window_end <= %s "
                "ORDER BY random() LIMIT %s",
                (datetime.fromtimestamp((last_event_ms - 5000) / 1000).astimezone(),
                 ROW_SAMPLE)).fetchall()
    alerts = []
    for m in _read_all(srv.bootstrap, topics.alerts):
        alert = msgspec.json.decode(m.value())
        ts = parse_timestamp_ms(alert["timestamp"])
        if ts is not None:
            alerts.append((alert["meter_id"].encode(), ts, m.timestamp()[1]))
    wanted = {(a[0], a[1]) for a in alerts} | {(r[0].encode(), int(r[1])) for r in rows}
    produced = _produce_times(srv.bootstrap, topic, wanted)
    alert_ms = [appended - produced[(k, ts)] for k, ts, appended in alerts
                if (k, ts) in produced]
    row_ms = []
    unseen = 0
    for meter, last_ms, updated in rows:
        sent = produced.get((meter.encode(), int(last_ms)))
        if sent is None:
            continue
        commit_s = watcher.seen.get(updated)
        if commit_s is None:
            unseen += 1
            commit_s = updated.timestamp()
        row_ms.append(commit_s * 1000 - sent)
    if not alerts and summary.anomalies and sum(summary.anomalies.values()) > 0:
        raise InfraError("the simulator injected anomalies but no alert reached the topic")
    return {
        "rate_target": rate, "rate_produced": summary.rate, "messages": summary.messages,
        "meters": meters, "duration_s": duration_s, "workers": workers,
        "flush_interval_ms": flush_interval_ms, "event_time_speedup": time_speedup,
        "anomalies_injected": sum(summary.anomalies.values()),
        "alert": _percentiles(alert_ms),
        "window_row": {**_percentiles(row_ms), "commit_time_unobserved": unseen},
    }


def _wait_assigned(svc: Service) -> None:
    """Until the service answers /ready and its consumers had time to join the group."""
    svc.wait_ready(timeout_s=60)
    time.sleep(3)  # group join and assignment
