"""One worker process: a Kafka consumer in the group, its windows, detector and checkpoints.

The hot loop (:meth:`Worker.run`) is a flat sequence of named steps::

    batch = consume()  →  columns = decode(batch)  →  dead letters  →  windows.add(columns)
    →  detector.check(columns) → alerts  →  maybe_checkpoint()

Only 1-minute windows are kept in memory; at each checkpoint the drained 1-minute partials
are rolled up into the 15-minute partials (:func:`segs.windows.partials.roll_up`), and both are
merged into their tables (see :mod:`segs.checkpoint.sink`).

A checkpoint is cut on the poll loop — the windows drained, the detector's changed baselines
taken, the positions and watermarks fixed — and then written by a thread of its own while the
loop goes on consuming, so alerts keep flowing during the database's seconds (at most one
checkpoint is in flight; the loop books its outcome when it is done: :meth:`Worker._book`).
Revokes and shutdown wait for it and write a last one on the loop itself
(:meth:`Worker.checkpoint`). The written part runs in this order:

0. flush the producer, so every alert and dead letter of the covered messages is delivered;
1. the database transactions: partials of both window sizes merged, changed baselines, and
   the next position of every covered partition (compare-and-set, see :mod:`segs.checkpoint.sink`);
   cut along partitions into transactions that run side by side (:mod:`segs.checkpoint.payload`),
   each a complete checkpoint of its partitions;
2. publish closed windows not yet published (up to the watermarks of the cut: readings
   consumed after it are not stored yet), chunk by chunk: read, produce, flush, mark
   (:meth:`segs.checkpoint.sink.Sink.claim_closed`). A checkpoint publishes for at most one
   checkpoint interval, or until the loop waits for it (revoke, shutdown); one on the loop publishes
   for half the time left before its deadline. The next checkpoint takes up the rest;
   then the regional pass (:mod:`segs.publish.regional`): if this worker wins the group's lock, it
   rolls up the windows every partition has passed and publishes them, in the same time;
3. commit the same offsets to Kafka, for lag monitoring only (the database is the truth).

When step 1 fails for a database reason, the payloads not written are retried verbatim
with jittered back-off while every assigned partition is paused, so memory stays bounded.
When a compare-and-set fails (another worker owns a partition now) all in-memory state is
discarded and every partition still assigned is rewound to its stored position ("rewind").
A cut whose other part was written keeps its stored positions: the rewind re-reads only
what is not stored.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import is_, itemgetter
from typing import Any

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from numpy.typing import NDArray

from segs.checkpoint.payload import MeterPartitions, Payload, WrittenWindows
from segs.checkpoint.pgcopy import TextFields
from segs.checkpoint.sink import TABLES, ClosedRow, CommitStats, Position, Sink, StoredTypes
from segs.config import Settings
from segs.detection.detector import KINDS, AnomalyDetector, BaselineState, DetectorSettings
from segs.errors import DatabaseError, FencedError, SegsError
from segs.intake.decode import Decoder
from segs.intake.readings import Interner
from segs.ops import metrics
from segs.publish.alerts import encode_alerts
from segs.publish.outputs import (
    GRANULARITY,
    dead_letter_headers,
    encode_aggregates,
    fit_dead_letter,
    iso_ms,
)
from segs.publish.regional import GRANULARITY as REGIONAL_GRANULARITY
from segs.publish.regional import PassStats, Regional
from segs.publish.topics import DEFAULT_RECORD_LIMIT, admin_client, output_topics, record_limit
from segs.windows.engine import WindowEngine
from segs.windows.partials import region_ranks

log = logging.getLogger("segs.worker")
_KAFKA_LOG = logging.getLogger("segs.kafka")

# Worker states shared with the supervisor (one int per worker in a shared array).
STARTING, RUNNING, DEGRADED, STOPPING, STOPPED = range(5)
STATE_NAMES = ("starting", "running", "degraded", "stopping", "stopped")
WINDOW_S = 60  # the one window kept in memory; 15-minute partials are rolled up from it
# Consumer prefetch: large fetches and a deep local queue keep the poll loop fed (a quarter
# of these sizes halved the throughput on the benchmark machine: the loop waited on
# fetches); the queue is bounded in bytes for the whole consumer. The user's Kafka
# settings override these. README, "Memory and speed"; benchmarks/prefetch_sweep.py.
PREFETCH: dict[str, int] = {
    "fetch.wait.max.ms": 50,
    "max.partition.fetch.bytes": 8_388_608,
    "fetch.max.bytes": 67_108_864,
    "queued.min.messages": 200_000,  # per partition, within the byte bound below
    "queued.max.messages.kbytes": 131_072,
}

_NEVER = -(2**62)  # "no watermark yet"
_MS = itemgetter(1)  # of Message.timestamp(): -1 when the message has none
_PRODUCER_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes
_SAY_EVERY_S = 60.0  # a lasting failure is logged once a minute
_REGIONAL_LATE_S = 300.0  # regional output this far behind is reported with its cause


@dataclass(frozen=True, slots=True)
class _Refused:
    """A dead letter or alert Kafka refused for good: produced again until delivered."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: str


class Worker:
    def __init__(self, settings: Settings, worker_id: int,
                 report: Callable[[int], None] = lambda state: None) -> None:
        self.s = settings
        self.worker_id = worker_id
        self.report = report
        self.topic = settings.topic_input
        self.stop_requested = False
        self.meters = Interner()
        self.regions = Interner()
        self.meter_fields = TextFields(self.meters.names)  # names encoded for COPY
        self.region_fields = TextFields(self.regions.names)
        self.decoder = Decoder(self.meters, self.regions,
                               max_message_bytes=settings.max_message_bytes,
                               max_future_skew_ms=settings.max_future_skew_ms)
        self.stored_types: StoredTypes | None = None  # of the database: _fit_decoder()
        self.detector_settings = DetectorSettings(
            spike_threshold=settings.spike_threshold, drop_threshold=settings.drop_threshold,
            min_samples=settings.min_samples, cooldown_ms=settings.alert_cooldown_ms)
        self._fresh_state()
        self.sink = Sink(settings.postgres_url.get(), consumer_group=settings.kafka_group_id,
                         topic=self.topic, writers=settings.checkpoint_writers,
                         regional=settings.regional_aggregates)
        self.regional = Regional(
            self.sink.connection, group=settings.kafka_group_id, topic=self.topic,
            capacities=dict(settings.region_capacity_kw),
            meter_list=settings.regional_meter_list == "full",
        ) if settings.regional_aggregates else None
        self.assigned: set[int] = set()
        self.positioned: set[int] = set()  # assigned partitions sought to their position
        self.stored: dict[int, int | None] = {}  # position in the database (CAS value)
        self.consumed: dict[int, int] = {}  # next offset after the last processed message
        self.stored_wm: dict[int, int] = {}
        self.last_seen: dict[int, int] = {}  # wall ms of a partition's last message/position
        self.unwritten: _Cut | None = None  # a cut not (all) written: retried verbatim
        self.job: Future[_Written] | None = None  # the checkpoint being written
        self.settling = False  # the loop waits for self.job
        self._checkpoints = ThreadPoolExecutor(1, thread_name_prefix="segs-checkpoint")
        self.meter_partitions = MeterPartitions()
        self.written = WrittenWindows()  # which drained windows are fresh (new rows)
        self.paused = False
        self.retry_at = 0.0
        self.backoff_s = 0.5
        self.next_checkpoint = time.monotonic() + settings.checkpoint_interval_ms / 1000
        self._refused: list[_Refused] = []  # appended by delivery callbacks on any thread
        self._refused_lock = threading.Lock()
        self.refused_closed = 0  # closed windows Kafka refused (their rows stay unpublished)
        self._closed_topics = {settings.topic_agg_1m, settings.topic_agg_15m}
        if self.regional is not None:  # refused ones stay unpublished in the database too
            self._closed_topics.add(settings.topic_regional_1m)
        self._said_at = self._refusals_said_at = -_SAY_EVERY_S  # when said last (monotonic)
        self._regional_said_at = -_SAY_EVERY_S
        self._regional_newest: dict[str, int] = {}  # region → newest window start published
        common = settings.kafka_common()  # the user's settings override our tuning below
        self.admin = admin_client(settings)
        dlq_limit = self._topic_limit(settings.topic_dlq, DEFAULT_RECORD_LIMIT)
        regional_limit = (self._topic_limit(settings.topic_regional_1m, DEFAULT_RECORD_LIMIT)
                          if settings.regional_aggregates else 0)
        self.consumer = Consumer({
            **PREFETCH,
            **common,
            "group.id": settings.kafka_group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "auto.offset.reset": settings.auto_offset_reset,
            "enable.partition.eof": False,
            "max.poll.interval.ms": settings.kafka_max_poll_interval_ms,
            "session.timeout.ms": settings.kafka_session_timeout_ms,
            "heartbeat.interval.ms": min(3_000, settings.kafka_session_timeout_ms // 3),
            "error_cb": self._on_kafka_error,
            "logger": _KAFKA_LOG,  # librdkafka's own lines, as JSON like ours
        })
        producer_conf: dict[str, Any] = {
            "linger.ms": 5,
            # none by default: the grid system's kafkajs consumers decode no lz4, snappy or
            # zstd batches (README, "Output compression")
            "compression.type": settings.kafka_compression,
            "queue.buffering.max.messages": 100_000,
            # a dead letter is as large as the topic allows (then cut: fit_dead_letter), a
            # regional message too (then without its meter list: segs.publish.regional.encode)
            "message.max.bytes": max(_PRODUCER_MAX_BYTES, dlq_limit, regional_limit),
            **common,
            "enable.idempotence": True,
            "message.timeout.ms": 0,  # never give up on a message: outages are waited out
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
            "error_cb": self._on_kafka_error,
            "logger": _KAFKA_LOG,
        }
        self.producer = Producer(producer_conf)
        metrics.start_series(tuple(output_topics(settings).values()))
        self.producer_max_bytes = int(producer_conf["message.max.bytes"])
        self.dlq_limit = min(dlq_limit, self.producer_max_bytes)
        self.regional_limit = min(regional_limit, self.producer_max_bytes)

    def _pool_gauges(self) -> None:
        total, idle, waiting = self.sink.pool_stats()
        metrics.DB_POOL_SIZE.labels("total").set(total)
        metrics.DB_POOL_SIZE.labels("idle").set(idle)
        metrics.DB_POOL_SIZE.labels("waiting").set(waiting)

    def _fresh_state(self) -> None:
        lateness, idle = self.s.allowed_lateness_ms, self.s.idle_advance_ms
        self.windows = WindowEngine(WINDOW_S, regions=self.regions,
                                    allowed_lateness_ms=lateness, idle_advance_ms=idle)
        self.detector = AnomalyDetector(self.detector_settings)

    # ------------------------------------------------------------------ callbacks

    def _on_kafka_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            metrics.KAFKA_CONSUMER_CONNECTED.set(0)
            metrics.KAFKA_PRODUCER_CONNECTED.set(0)
        log.warning("kafka: %s", err.str())

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """Closed windows' delivery reports (errors only: librdkafka retries the rest
        forever); dead letters and alerts carry their own (:meth:`_produce`)."""
        if err is not None:
            self._refuse(msg.topic() or "", msg.key(), msg.value(), [], err.str())

    def _refuse(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]], reason: str) -> None:
        """Keep a message Kafka refused. Dead letters and alerts are produced again before
        the next checkpoint may store positions (:meth:`_deliver_refused`); a closed window
        stays unpublished in the database and is claimed again."""
        metrics.PUBLISH_ERRORS.labels(topic).inc()
        if topic in self._closed_topics:
            self.refused_closed += 1
            return
        with self._refused_lock:
            self._refused.append(_Refused(topic, key, value, list(headers), reason))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        log.info("assigned partitions %s", parts)
        self.assigned.update(parts)
        tps = self._positions_for(parts)
        if tps is None:
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)
        else:
            consumer.incremental_assign(tps)
            # librdkafka keeps a partition's pause flag across unassign/assign: one lost
            # while intake was paused would come back paused for good after the resume
            (consumer.pause if self.paused else consumer.resume)(tps)
            self.positioned.update(parts)
            self.last_seen.update(dict.fromkeys(parts, int(time.time() * 1000)))
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        log.info("revoking partitions %s", parts)
        if set(parts) & self.positioned and not self._checkpoint_until(
                time.monotonic() + self.s.shutdown_timeout_s / 2):
            log.warning("could not checkpoint before revoke: rewinding to stored positions")
            self._rewind()
        self._forget(parts)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        log.warning("lost partitions %s: discarding unsaved state, rewinding", parts)
        if self.job is not None:
            self._settle()  # what it stored stays stored; the rewind re-reads the rest
        self._rewind()
        self._forget(parts)
        consumer.incremental_unassign(partitions)

    def _forget(self, parts: Sequence[int]) -> None:
        self.windows.drop_partitions(parts)
        self.detector.forget_partitions(parts)
        for p in parts:
            self.assigned.discard(p)
            self.positioned.discard(p)
            self.stored.pop(p, None)
            self.consumed.pop(p, None)
            self.stored_wm.pop(p, None)
            self.last_seen.pop(p, None)
            metrics.forget_partition(p)
        metrics.ASSIGNED_PARTITIONS.set(len(self.assigned))

    def _positions_for(self, parts: Sequence[int]) -> list[TopicPartition] | None:
        """Load positions and baselines of ``parts``; None when the database is away."""
        try:
            self._fit_decoder()
            stored = self.sink.load_positions(parts)
            baselines = self.sink.load_baselines(parts)
        except DatabaseError as exc:
            metrics.DB_WRITE_ERRORS.labels("load_positions").inc()
            log.warning("cannot load positions (%s): partitions %s wait", exc, list(parts))
            metrics.TIMESCALEDB_CONNECTED.set(0)
            return None
        unstored = [p for p in parts if p not in stored]
        committed = self._committed(unstored) if unstored else {}
        if committed is None:
            return None
        self._load_baselines(baselines)
        default = OFFSET_BEGINNING if self.s.auto_offset_reset == "earliest" else OFFSET_END
        tps = []
        for p in parts:
            pos: Position | None = stored.get(p)
            self.stored[p] = pos.next_offset if pos else None
            if pos:
                self.consumed[p] = pos.next_offset
                if pos.watermark_ms is not None:
                    self.stored_wm[p] = pos.watermark_ms
            start = pos.next_offset if pos else committed.get(p, default)
            tps.append(TopicPartition(self.topic, p, start))
        return tps

    def _committed(self, parts: Sequence[int]) -> dict[int, int] | None:
        """The group's committed Kafka offsets of partitions without a stored position, with
        START_FROM_COMMITTED (a cut-over from a service that kept its positions in Kafka);
        None when the coordinator does not answer: the partitions wait rather than start
        from KAFKA_AUTO_OFFSET_RESET, which would re-read (and re-alert) what was done."""
        if not self.s.start_from_committed:
            return {}
        try:
            tps = self.consumer.committed([TopicPartition(self.topic, p) for p in parts],
                                          timeout=10)
            failed = next((tp.error for tp in tps if tp.error is not None), None)
            if failed is not None:
                raise KafkaException(failed)
        except KafkaException as exc:
            log.warning("cannot read the group's committed offsets (%s): partitions %s "
                        "wait (START_FROM_COMMITTED=off starts them without)",
                        exc.args[0].str(), list(parts))
            return None
        found = {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
        if found:
            log.info("partitions %s start at the group's committed offsets %s (no stored "
                     "position)", sorted(found), [found[p] for p in sorted(found)])
        return found

    def _fit_decoder(self) -> None:
        """Give the decoder the name lengths the database's columns hold, once, before any
        message is read: every partition waits for its stored position, read after this."""
        if self.stored_types is None:
            types = self.sink.stored_types()
            self.decoder = Decoder(self.meters, self.regions,
                                   max_message_bytes=self.s.max_message_bytes,
                                   max_future_skew_ms=self.s.max_future_skew_ms,
                                   meter_id_max=types.meter_id_max,
                                   region_max=types.region_max)
            self.stored_types = types

    def _load_baselines(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        slot = self.meters.slot
        self.detector.load(BaselineState(
            meter=np.fromiter((slot(r[0]) for r in rows), np.int32, len(rows)),
            partition=np.array([r[1] for r in rows], np.int32),
            baseline=np.array([r[2] for r in rows], np.float64),
            samples=np.array([r[3] for r in rows], np.int64),
            last_outage_ms=np.array([r[4] for r in rows], np.int64),
            last_spike_ms=np.array([r[5] for r in rows], np.int64),
            last_drop_ms=np.array([r[6] for r in rows], np.int64),
        ))

    def _rewind(self) -> None:
        """Discard everything not yet stored; re-seek assigned partitions to stored positions."""
        self.unwritten = None
        with self._refused_lock:  # re-read, so produced again
            self._refused.clear()
        self._fresh_state()
        self.positioned.clear()
        self.stored.clear()
        self.consumed.clear()

    def _position_waiting(self) -> bool:
        """Seek assigned partitions that still wait for their stored position; False when
        the database could not say where."""
        waiting = sorted(self.assigned - self.positioned)
        if not waiting:
            return True
        tps = self._positions_for(waiting)
        if tps is None:
            return False
        for tp in tps:
            try:
                self.consumer.seek(tp)
            except KafkaException:
                self.consumer.incremental_unassign([TopicPartition(self.topic, tp.partition)])
                self.consumer.incremental_assign([tp])
        if not self.paused:
            self.consumer.resume([TopicPartition(self.topic, p) for p in waiting])
        self.positioned.update(waiting)
        now_ms = int(time.time() * 1000)
        self.last_seen.update(dict.fromkeys(waiting, now_ms))
        log.info("partitions %s resume from their stored positions", waiting)
        return True

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.report(STARTING)
        self._open_sink()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        metrics.KAFKA_CONSUMER_CONNECTED.set(1)
        metrics.KAFKA_PRODUCER_CONNECTED.set(1)
        self.report(RUNNING)
        consume, batch_size = self.consumer.consume, self.s.batch_size
        poll_producer, monotonic = self.producer.poll, time.monotonic
        try:
            while not self.stop_requested:
                poll_producer(0)
                msgs = consume(batch_size, 0.1)
                if msgs:
                    self.process(msgs)
                if (monotonic() >= self.next_checkpoint or self.paused or self.job is not None
                        or len(self.positioned) != len(self.assigned)):
                    self.maybe_checkpoint()
            return self._shutdown()
        finally:
            self._checkpoints.shutdown(wait=True)  # a checkpoint in flight ends first
            self.sink.close()

    def _request_stop(self, signum: int, frame: object) -> None:
        if self.stop_requested:  # second signal: stop now
            os._exit(1)
        self.stop_requested = True

    def _open_sink(self) -> None:
        self.sink.open()
        self._pool_gauges()
        if self.sink.ping():
            metrics.TIMESCALEDB_CONNECTED.set(1)
        else:
            metrics.TIMESCALEDB_CONNECTED.set(0)
            log.warning("database unreachable at start; partitions wait for their positions")

    def process(self, msgs: list[Message]) -> None:
        """Decode, validate, window and check one consumed batch.

        Per-message Python work is limited to reading each message's error, partition,
        offset, value and Kafka timestamp once (``map`` over the unbound methods, no
        per-message bytecode); everything after that is per batch.
        """
        t0 = time.perf_counter()
        # `is`, never `==`: KafkaError's == raises on None (list.count(None) killed a worker)
        if not all(map(is_, map(Message.error, msgs), repeat(None))):
            msgs = self._without_errors(msgs)
        part_arr = np.fromiter(map(Message.partition, msgs), np.int32, len(msgs))
        present = np.unique(part_arr).tolist()
        if not self.positioned.issuperset(present):
            # partitions awaiting their stored position are re-read after the seek
            keep = np.isin(part_arr, list(self.positioned))
            msgs = [m for m, k in zip(msgs, keep.tolist(), strict=True) if k]
            part_arr = part_arr[keep]
            present = [p for p in present if p in self.positioned]
        if not msgs:
            return
        off_arr = np.fromiter(map(Message.offset, msgs), np.int64, len(msgs))
        values = list(map(Message.value, msgs))
        # validity is judged against each message's own timestamp, never the wall clock
        kafka_ts = np.fromiter(map(_MS, map(Message.timestamp, msgs)), np.int64, len(msgs))
        metrics.MESSAGES.inc(len(msgs))
        metrics.BATCH_SIZE.observe(len(msgs))
        now_ms = int(time.time() * 1000)
        readings, rejects = self.decoder.decode(values, part_arr, off_arr, kafka_ts)
        if rejects:
            self._dead_letter(msgs, rejects)
        if len(readings):
            if self.sink.writers > 1:  # only a cut checkpoint needs to know
                self.meter_partitions.note(readings.meter, readings.partition)
            late = self.windows.add(readings, now_ms)
            if late:
                metrics.LATE_READINGS.inc(late)
            if self.s.anomaly_detection:
                det = self.detector.check(readings)
                if len(det):
                    self._alert(det, readings)
            self._lag(readings, now_ms)
        for p in present:
            self.consumed[p] = int(off_arr[part_arr == p].max()) + 1
            self.last_seen[p] = now_ms
        seconds = time.perf_counter() - t0
        metrics.PROCESSING_SECONDS.observe(seconds)
        metrics.observe_each(metrics.MESSAGE_PROCESSING_MS, seconds * 1000 / len(msgs), len(msgs))

    def _without_errors(self, msgs: list[Message]) -> list[Message]:
        for m in msgs:
            err = m.error()
            if err is not None:
                self._consume_error(err)
        return [m for m in msgs if m.error() is None]

    def _consume_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consume: %s", err.str())

    def _dead_letter(self, msgs: list[Message], rejects: Sequence[Any]) -> None:
        dlq, topic, limit = self.s.topic_dlq, self.topic, self.dlq_limit
        by_reason: dict[str, int] = {}
        for index, reason, detail in rejects:
            m = msgs[index]
            headers = dead_letter_headers(reason, detail, topic, m.partition(), m.offset())
            self._produce(dlq, *fit_dead_letter(m.key(), m.value(), headers, limit))
            by_reason[reason] = by_reason.get(reason, 0) + 1
        for reason, count in by_reason.items():
            metrics.INVALID_MESSAGES.labels(reason).inc(count)
        metrics.DLQ_PUBLISHED.inc(len(rejects))

    def _alert(self, det: Any, readings: Any) -> None:
        for key, value, headers in encode_alerts(det, readings, self.meters, self.regions,
                                                 self.topic):
            self._produce(self.s.topic_alerts, key, value, headers)
        kinds = np.bincount(det.kind, minlength=len(KINDS))
        for kind, count in zip(KINDS, kinds.tolist(), strict=True):
            if count:
                metrics.ANOMALIES_DETECTED.labels(kind).inc(count)
        metrics.ALERTS_PUBLISHED.inc(len(det))

    def _lag(self, readings: Any, now_ms: int) -> None:
        newest = {}
        for p in np.unique(readings.partition).tolist():
            newest[p] = int(readings.ts_ms[readings.partition == p].max())
        for p, ts in newest.items():
            metrics.LAG_SECONDS.labels(str(p)).set(max(0.0, (now_ms - ts) / 1000))

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]]) -> None:
        report = None
        if topic not in self._closed_topics:  # a delivery report carries no headers

            def report(err: KafkaError | None, msg: Message) -> None:
                if err is not None:
                    self._refuse(topic, key, value, headers, err.str())

        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers,  # type: ignore[arg-type]
                                      on_delivery=report)
                return
            except BufferError:  # queue full: serve it, never drop
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused at once (e.g. MSG_SIZE_TOO_LARGE)
                self._refuse(topic, key, value, headers, exc.args[0].str())
                return

    def _deliver_refused(self) -> str | None:
        """Produce again what Kafka refused, dead letters cut to the topic's current limit
        (the operator may have changed it); why not all arrived, or None."""
        with self._refused_lock:
            taken, self._refused = self._refused, []
        if taken:
            if time.monotonic() - self._refusals_said_at >= _SAY_EVERY_S:
                log.warning("Kafka refused %d messages for %s (%s); producing them again",
                            len(taken), ", ".join(sorted({r.topic for r in taken})),
                            taken[0].reason)
                self._refusals_said_at = time.monotonic()
            if any(r.topic == self.s.topic_dlq for r in taken):
                self.dlq_limit = min(self._topic_limit(self.s.topic_dlq, self.dlq_limit),
                                     self.producer_max_bytes)
            for r in taken:
                fit = r.topic == self.s.topic_dlq
                self._produce(r.topic, *(fit_dead_letter(r.key, r.value, r.headers,
                                                         self.dlq_limit)
                                         if fit else (r.key, r.value, r.headers)))
            if self.producer.flush(10) > 0:
                return self._stuck()
        with self._refused_lock:
            left = list(self._refused)
        metrics.UNDELIVERED.set(len(left))
        if not left:
            return None
        topics = sorted({r.topic for r in left})
        return (f"Kafka refused {len(left)} messages for {', '.join(topics)} "
                f"({left[0].reason}); their positions are not stored until they are "
                "delivered: check that the topic exists and its max.message.bytes")

    def _stuck(self) -> str:
        """Why the producer could not deliver in time, as far as metadata tells: a missing
        output topic (librdkafka waits for a deleted topic to come back), or Kafka away."""
        why = "Kafka producer could not deliver within 10 s"
        try:
            present = self.producer.list_topics(timeout=5).topics
        except KafkaException as exc:
            return f"{why} ({exc.args[0].str()})"
        missing = [t for t in output_topics(self.s).values() if t not in present]
        if missing:
            return f"{why}: topic {', '.join(missing)} does not exist; create it"
        return why

    def _topic_limit(self, topic: str, fallback: int) -> int:
        try:
            return record_limit(self.admin, topic)
        except SegsError as exc:
            log.warning("%s; assuming %d bytes", exc, fallback)
            return fallback

    # ------------------------------------------------------------------ checkpoints

    def maybe_checkpoint(self) -> None:
        """Book a written checkpoint; position waiting partitions; start the next checkpoint
        on the checkpoint thread when due (not before a retry time)."""
        if self.job is not None:
            if not self.job.done():
                return
            self._settle()
        now = time.monotonic()
        if now < self.retry_at:
            return
        if len(self.positioned) != len(self.assigned) and not self._position_waiting():
            self.retry_at = now + 1.0 + random.random()  # jittered retry
            return
        if now >= self.next_checkpoint or self.paused:
            until = now + self.s.checkpoint_interval_ms / 1000
            self.job = self._checkpoints.submit(
                self._write, self._cut(),
                lambda: self.settling or time.monotonic() >= until)

    def checkpoint(self, deadline: float) -> bool:
        """One whole checkpoint on this thread, after the one in flight if any, publishing
        for half the time left before ``deadline``; False when it must retry (steps in the
        module docstring)."""
        if self.job is not None and not self._settle():
            return False
        until = (time.monotonic() + deadline) / 2
        return self._book(self._write(self._cut(), lambda: time.monotonic() >= until))

    def _settle(self) -> bool:
        """Wait for the checkpoint in flight and book it."""
        assert self.job is not None
        job, self.job = self.job, None
        self.settling = True  # its publishing ends after the chunk it is on
        try:
            out = job.result()
        finally:
            self.settling = False
        return self._book(out)

    def _cut(self) -> _Cut:
        """Fix what the next checkpoint writes: the payloads of the cut not yet written, with
        its watermarks (a retry), or new ones, drained now."""
        self.next_checkpoint = time.monotonic() + self.s.checkpoint_interval_ms / 1000
        names, regions = self.meter_fields.fields(), self.region_fields.fields()
        rank, started = region_ranks(self.regions), time.perf_counter()
        if self.unwritten is not None:
            return replace(self.unwritten, names=names, regions=regions, rank=rank,
                           started=started)
        self.windows.advance_idle(int(time.time() * 1000))
        wms = self._watermarks()
        return _Cut(self._build_payloads(wms), names, regions, rank, wms, started)

    def _write(self, cut: _Cut, stop_publishing: Callable[[], bool]) -> _Written:
        """Steps 0–2 of a checkpoint. Runs on the checkpoint thread (or, for revokes and
        shutdown, on the loop): it uses only ``cut``, the producer and the sink, which are
        thread-safe, and leaves all bookkeeping to :meth:`_book` on the loop.
        ``stop_publishing()`` ends step 2 between chunks."""
        out = _Written(cut)
        # 0. every alert and dead letter of the covered messages is delivered first,
        #    including any Kafka refused before (produced again)
        if self.producer.flush(10) > 0:
            out.failure = self._stuck()
            return out
        out.failure = self._deliver_refused()
        if out.failure:
            return out
        # 1. the database transactions
        t_db = time.perf_counter()
        if cut.payloads:
            out.results = self.sink.commit_all([p.job(cut.names, cut.regions, cut.rank)
                                                for p in cut.payloads])
            out.db_seconds = time.perf_counter() - t_db
            if not all(isinstance(r, CommitStats) for r in out.results):
                return out
        # 2. closed windows to the aggregates topics
        t_pub = time.perf_counter()
        published_at: dict[int, float] = {}

        def deliver(size_s: int, rows: list[ClosedRow]) -> None:
            self._deliver_closed(size_s, rows)
            out.published[size_s] = out.published.get(size_s, 0) + len(rows)
            published_at[size_s] = time.perf_counter()

        try:  # chunks delivered before a failure count as published: they stay marked
            self.sink.claim_closed(cut.watermarks, deliver, stop=stop_publishing)
        except SegsError as exc:
            out.publish_error = str(exc)
            if isinstance(exc, DatabaseError):
                metrics.DB_WRITE_ERRORS.labels("publish").inc()
        done = time.perf_counter()
        out.publish_seconds = done - t_pub
        if not out.publish_error:  # the original's flush: written, then published, per size
            out.flushed = {size: published_at.get(size, done) - t_db for size in TABLES}
        if self.regional is not None and not out.publish_error:
            try:
                out.regional = self.regional.run(self._input_partitions(),
                                                 self._deliver_regional, self.regional_limit,
                                                 stop=stop_publishing)
            except SegsError as exc:
                out.publish_error = f"regional aggregates: {exc}"
                if isinstance(exc, DatabaseError):
                    metrics.DB_WRITE_ERRORS.labels("publish").inc()
        return out

    def _input_partitions(self) -> int:
        """The input topic's partition count, from Kafka's metadata (thread-safe)."""
        try:
            md = self.producer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        except KafkaException as exc:
            raise SegsError(f"cannot read the partitions of {self.topic}: {exc}") from exc
        if md is None or md.error is not None or not md.partitions:
            raise SegsError(f"cannot read the partitions of {self.topic}")
        return len(md.partitions)

    def _deliver_regional(self, messages: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
                          ) -> None:
        self._deliver_rows(self.s.topic_regional_1m, messages, "regional aggregates")

    def _book(self, out: _Written) -> bool:
        """On the loop: what a written checkpoint changes; False when it must retry."""
        cut = out.cut
        if out.failure:
            self.unwritten = cut
            self._fail(out.failure, database=False)
            return False
        if cut.payloads:
            metrics.DB_WRITE_LATENCY_MS.observe(out.db_seconds * 1000)
        failed = []
        for payload, result in zip(cut.payloads, out.results, strict=True):
            if isinstance(result, CommitStats):
                self._stored(payload, result)
            else:
                failed.append((payload, result))
        self.unwritten = replace(cut, payloads=[p for p, _ in failed]) if failed else None
        fenced = [exc for _, exc in failed if isinstance(exc, FencedError)]
        if fenced:
            log.warning("%s: rewinding to stored positions", fenced[0])
            self._rewind()
            self._resume()
            return False
        if failed:
            metrics.DB_WRITE_ERRORS.labels("checkpoint").inc(len(failed))
            self._fail(f"checkpoint failed: {failed[0][1]}")
            return False
        metrics.TIMESCALEDB_CONNECTED.set(1)
        self._pool_gauges()
        if out.publish_error:
            log.warning("publishing closed windows postponed: %s", out.publish_error)
        for size, count in out.published.items():
            if count:
                metrics.AGGREGATES_PUBLISHED.labels(GRANULARITY[size], GRANULARITY[size]).inc(
                    count)
        if out.regional is not None:
            self._book_regional(out.regional)
        metrics.FLUSH_DURATION.observe(out.publish_seconds)
        for size, seconds in out.flushed.items():
            metrics.FLUSH_DURATION_MS.labels(GRANULARITY[size]).observe(seconds * 1000)
        # 3. offsets to Kafka, for lag monitoring only
        self._commit_kafka_offsets()
        self._offset_lag()
        self._resume()
        metrics.WINDOWED_READINGS.set(self.windows.pending_readings())
        metrics.WINDOW_BUCKETS.set(self.windows.pending_windows())
        metrics.CHECKPOINT_DURATION.observe(time.perf_counter() - cut.started)
        return True

    def _book_regional(self, r: PassStats) -> None:
        if r.published:
            metrics.AGGREGATES_PUBLISHED.labels(REGIONAL_GRANULARITY, REGIONAL_GRANULARITY).inc(
                r.published)
        metrics.REGIONAL_WAITING_SECONDS.set(r.waiting_s)
        for region, (start, load) in r.loads.items():
            if start >= self._regional_newest.get(region, start):
                self._regional_newest[region] = start
                metrics.REGIONAL_LOAD.labels(region).set(load)
        if r.windows or r.published:
            log.debug("regional: %d windows computed (%d region-windows), %d published "
                      "(%d without their meter list)", r.windows, r.rows, r.published,
                      r.omitted)
        now = time.monotonic()
        if (r.computer and r.waiting_s >= _REGIONAL_LATE_S
                and now - self._regional_said_at >= _SAY_EVERY_S):
            self._regional_said_at = now
            why = ("have no stored watermark yet" if r.horizon_ms is None
                   else f"hold the lowest stored watermark, {iso_ms(r.horizon_ms)}")
            log.warning("regional aggregates wait %.0f s: a window is rolled up once every "
                        "partition of %s has passed its end; partitions %s %s (their owner "
                        "is stopped, or they are assigned to no worker)", r.waiting_s,
                        self.topic, r.holding[:10], why)

    def _build_payloads(self, wms: dict[int, int]) -> list[Payload]:
        """Everything to store, cut along partitions unless a meter's readings came from
        two partitions since the last checkpoint (then one transaction holds it all).

        With regional aggregates on, a partition whose watermark rose is stored even when
        its offset did not move, and an empty partition gets its first position: the
        regional roll-up waits for the stored watermark of every partition."""
        positions = {p: (self.stored.get(p), nxt, wms.get(p))
                     for p, nxt in self.consumed.items()
                     if p in self.positioned and nxt != self.stored.get(p)}
        if self.regional is not None:
            for p in self.positioned - positions.keys():
                wm = wms.get(p)
                if wm is None or wm <= self.stored_wm.get(p, _NEVER):
                    continue
                nxt = self.consumed.get(p)
                if nxt is None:
                    nxt = self._empty_partition_end(p)
                if nxt is not None:
                    positions[p] = (self.stored.get(p), nxt, wm)
        partials = self.windows.drain()
        payload = Payload(partials, self.detector.take_dirty(), positions,
                          self.written.fresh(partials))
        parts = self.sink.writers
        if self.meter_partitions.take_mixed():
            log.debug("a meter's readings came from two partitions: one checkpoint transaction")
            parts = 1
        return payload.split(parts)

    def _empty_partition_end(self, p: int) -> int | None:
        """The end offset of partition ``p`` when it holds no message (its next offset
        then), else None: a partition never read has no position of its own."""
        try:
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=1, cached=False)
        except KafkaException:
            return None
        return high if 0 <= low == high else None

    def _stored(self, payload: Payload, stats: CommitStats) -> None:
        """Book a written payload: its positions are the stored ones now."""
        for p, (_, nxt, wm) in payload.positions.items():
            self.stored[p] = nxt
            if p in self.positioned:
                self.consumed.setdefault(p, nxt)
            if wm is not None:
                self.stored_wm[p] = max(wm, self.stored_wm.get(p, _NEVER))
        for size, table in TABLES.items():
            granularity = GRANULARITY[size]
            metrics.AGGREGATES_WRITTEN.labels(granularity, granularity).inc(
                stats.new_rows[table])
            metrics.DB_WRITE_ROWS.labels(table).inc(stats.rows[table])
        metrics.DB_WRITE_ROWS.labels("meter_baselines").inc(stats.baselines)
        log.debug("checkpoint: %s rows, %d baselines, %d positions in %.3f s",
                  stats.rows, stats.baselines, len(payload.positions), stats.seconds)

    def _watermarks(self) -> dict[int, int]:
        """Watermark per positioned partition: the newest of the stored one, the engine's,
        and — for a partition silent for IDLE_ADVANCE — wall clock minus lateness."""
        engine = self.windows.watermarks()
        now_ms = int(time.time() * 1000)
        idle_wm = now_ms - self.s.allowed_lateness_ms
        wms = {}
        for p in self.positioned:
            wm = max(self.stored_wm.get(p, _NEVER), engine.get(p, _NEVER))
            if now_ms - self.last_seen.get(p, now_ms) >= self.s.idle_advance_ms:
                wm = max(wm, idle_wm)
            if wm > _NEVER:
                wms[p] = wm
        return wms

    def _deliver_closed(self, size_s: int, rows: list[ClosedRow]) -> None:
        topic = self.s.topic_agg_1m if size_s == 60 else self.s.topic_agg_15m
        self._deliver_rows(topic, encode_aggregates(size_s, rows), "closed windows")

    def _deliver_rows(self, topic: str,
                      messages: Sequence[tuple[bytes, bytes, list[tuple[str, bytes]]]],
                      what: str) -> None:
        """Produce messages of stored rows and wait until Kafka has them; raises when it
        does not (the rows stay unpublished and are claimed again)."""
        refused = self.refused_closed
        for key, value, headers in messages:
            self._produce(topic, key, value, headers)
        if self.producer.flush(10) > 0:
            raise SegsError(f"{what}: {self._stuck()}")
        if self.refused_closed != refused:
            raise SegsError(f"Kafka refused {what} for {topic}: check that the topic exists")

    def _commit_kafka_offsets(self) -> None:
        """The stored positions as the group's Kafka offsets: for lag monitoring, and so
        that a service keeping its positions only in Kafka (the TypeScript one, rolled back
        to) continues where this one stopped (the consumer's close delivers the last)."""
        tps = [TopicPartition(self.topic, p, off) for p, off in self.stored.items()
               if off is not None and p in self.positioned]
        if tps:
            try:
                self.consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as exc:
                log.debug("offset commit to Kafka skipped: %s", exc)

    def _offset_lag(self) -> None:
        """Consumer offset lag per partition from the high watermarks of recent fetches."""
        for p, nxt in self.consumed.items():
            try:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                metrics.CONSUMER_OFFSET_LAG.labels(str(p)).set(max(0, high - nxt))

    def _fail(self, why: str, *, database: bool = True) -> None:
        """Pause intake and schedule a retry with jittered exponential back-off; say why
        when it starts and once a minute while it lasts."""
        now = time.monotonic()
        if not self.paused or now - self._said_at >= _SAY_EVERY_S:
            log.warning("%s; %s", why, "intake stays paused, retrying" if self.paused
                        else "pausing intake, retrying")
            self._said_at = now
        if not self.paused:
            self.report(DEGRADED)
            if database:
                metrics.TIMESCALEDB_CONNECTED.set(0)
            self.consumer.pause(self._tps(self.assigned))
            self.paused = True
        self.retry_at = time.monotonic() + self.backoff_s * random.uniform(0.5, 1.5)
        self.backoff_s = min(self.backoff_s * 2, 10.0)

    def _resume(self) -> None:
        self.backoff_s = 0.5
        if self.paused:
            log.info("checkpoint succeeded; resuming intake")
            self.report(RUNNING)
            self.consumer.resume(self._tps(self.positioned))
            self.paused = False

    def _checkpoint_until(self, deadline: float) -> bool:
        while True:
            if self.checkpoint(deadline):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(self.retry_at - time.monotonic(), deadline - time.monotonic())))

    def _tps(self, parts: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    def _shutdown(self) -> int:
        """Final checkpoint, then close the clients; 0 when everything was stored."""
        self.report(STOPPING)
        deadline = time.monotonic() + self.s.shutdown_timeout_s * 0.8
        if self.job is not None:
            self._settle()  # a failure here is retried by the final checkpoint below
        ok = not self.positioned or self._checkpoint_until(deadline)
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
        remaining = self.producer.flush(max(0.1, deadline - time.monotonic()))
        self.report(STOPPED)
        if not ok or remaining:
            log.error("shutdown without final checkpoint: the restart re-reads from the "
                      "last stored positions")
            return 1
        log.info("worker %d stopped after its final checkpoint", self.worker_id)
        return 0


@dataclass(slots=True)
class _Cut:
    """One checkpoint as fixed on the loop: what the checkpoint thread may read."""

    payloads: list[Payload]
    names: list[bytes]  # encoded meter names by slot (append-only: safe to read)
    regions: list[bytes]  # encoded region names by slot
    rank: NDArray[np.int64]  # order of the region names (segs.windows.partials.region_ranks)
    watermarks: dict[int, int]  # closed windows up to these are published once stored
    started: float  # perf_counter at the cut


@dataclass(slots=True)
class _Written:
    """What the checkpoint thread reports back for :meth:`Worker._book`."""

    cut: _Cut  # what was written
    failure: str | None = None  # why it stopped before the database (producer flush)
    results: list[CommitStats | SegsError] = field(default_factory=list)  # per payload
    db_seconds: float = 0.0
    published: dict[int, int] = field(default_factory=dict)  # window size → rows
    regional: PassStats | None = None  # the regional pass, when it ran
    publish_error: str | None = None  # publishing is postponed, not failed
    publish_seconds: float = 0.0
    flushed: dict[int, float] = field(default_factory=dict)  # window size → s, write+publish


def worker_main(settings: Settings, worker_id: int, status: Any) -> None:
    """Entry point of a spawned worker process."""
    from segs.ops.logs import setup_logging

    setup_logging(settings.log_level, json_lines=_json_logs(settings))

    def report(state: int) -> None:
        status[worker_id] = state

    try:
        worker = Worker(settings, worker_id, report)
        code = worker.run()
    except SegsError as exc:
        log.error("worker %d failed: %s", worker_id, exc)
        code = 1
    except KafkaException as exc:
        log.error("worker %d failed: kafka: %s", worker_id, exc)
        code = 1
    raise SystemExit(code)


def _json_logs(settings: Settings) -> bool | None:
    return {"json": True, "text": False}.get(settings.log_format)
