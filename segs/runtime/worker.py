"""One worker process: a Kafka consumer in the group, its windows, detector and checkpoints.

The hot loop (:meth:`Worker.run`) only calls collaborators::

    batch = consume()  →  process(batch)  →  checkpoint_step()

where :meth:`Worker.process` is ``columns = decode(batch)`` → dead letters →
``windows.add(columns)`` → ``detector.check(columns)`` → alerts. Per-message Python work is
the budget: everything after reading each message's fields is per batch.

Only 1-minute windows are kept in memory; at each checkpoint the drained 1-minute partials
are rolled up into the 15-minute partials (:func:`segs.windows.partials.roll_up`), and both are
merged into their tables (see :mod:`segs.checkpoint.sink`).

Collaborators: :mod:`~segs.runtime.partitions` (what is known of each assigned partition),
:mod:`~segs.runtime.checkpointer` (the checkpoint cycle, its order and its failures),
:mod:`~segs.runtime.eviction` (idle meters given back at a cut, read back when they return),
:mod:`~segs.runtime.outbox` (what is produced to Kafka), :mod:`~segs.runtime.kafka_clients`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import is_, itemgetter
from typing import Protocol

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from segs.checkpoint.payload import MeterPartitions, Payload, WrittenWindows
from segs.checkpoint.pgcopy import TextFields
from segs.checkpoint.sink import Position, Sink, StoredTypes
from segs.config import Settings
from segs.detection.detector import AnomalyDetector, DetectorSettings
from segs.errors import DatabaseError, SegsError
from segs.intake.decode import Decoder
from segs.intake.readings import Interner, Readings, meter_interner
from segs.ops import metrics
from segs.publish.regional import PassStats, Regional
from segs.runtime.checkpointer import Checkpointer, Drained, Encodings, StopPublishing
from segs.runtime.eviction import TRIM_AFTER, evict_idle, load_baselines, recall
from segs.runtime.heap import give_back_heap, limit_arenas
from segs.runtime.kafka_clients import make_consumer
from segs.runtime.outbox import Outbox
from segs.runtime.partitions import PartitionBook
from segs.runtime.state import WorkerState
from segs.times import NEVER
from segs.windows.engine import WindowEngine
from segs.windows.partials import region_ranks
from segs.windows.sizes import ONE_MINUTE

log = logging.getLogger("segs.worker")

_MS = itemgetter(1)  # of Message.timestamp(): -1 when the message has none


def _now_ms() -> int:
    return int(time.time() * 1000)


class Worker:
    def __init__(self, settings: Settings, worker_id: int,
                 report: Callable[[WorkerState], None] = lambda state: None) -> None:
        self.s = settings
        self.worker_id = worker_id
        self.report = report
        self.topic = settings.topic_input
        self.stop_requested = False
        self._stop_by: float | None = None  # monotonic deadline of the shutdown under way
        self.meters = meter_interner()
        self.regions = Interner()
        self.meter_fields = TextFields.of(self.meters)  # for COPY
        self.region_fields = TextFields(self.regions.names)
        self.decoder = Decoder(self.meters, self.regions,
                               max_message_bytes=settings.max_message_bytes,
                               max_future_skew_ms=settings.max_future_skew_ms)
        self.stored_types: StoredTypes | None = None  # of the database: _fit_decoder()
        self.detector_settings = DetectorSettings(
            spike_threshold=settings.spike_threshold, drop_threshold=settings.drop_threshold,
            min_samples=settings.min_samples, cooldown_ms=settings.alert_cooldown_ms)
        self._fresh_state()
        self.meter_partitions = MeterPartitions()
        self.written = WrittenWindows()  # which drained windows are fresh (new rows)
        self.book = PartitionBook()
        self.sink = Sink(settings.postgres_url.get(), consumer_group=settings.kafka_group_id,
                         topic=self.topic, writers=settings.checkpoint_writers,
                         regional=settings.regional_aggregates)
        self.regional = Regional(
            self.sink.connection, group=settings.kafka_group_id, topic=self.topic,
            capacities=dict(settings.region_capacity_kw),
            meter_list=settings.regional_meter_list == "full",
        ) if settings.regional_aggregates else None
        self.outbox = Outbox(settings, meters=self.meters, regions=self.regions)
        self.consumer = make_consumer(settings)
        self.checkpointer = Checkpointer(
            book=self.book, memory=self, sink=self.sink, consumer=self.consumer,
            deliveries=self.outbox, topic=self.topic,
            interval_s=settings.checkpoint_interval_ms / 1000,
            regional=self._regional_pass if self.regional is not None else None,
            report=report)

    def _fresh_state(self) -> None:
        lateness, idle = self.s.allowed_lateness_ms, self.s.idle_advance_ms
        self.windows = WindowEngine(ONE_MINUTE.seconds, regions=self.regions,
                                    allowed_lateness_ms=lateness, idle_advance_ms=idle,
                                    deduplicate=self.s.deduplicate)
        self.detector = AnomalyDetector(self.detector_settings)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Consume until asked to stop; returns the process exit code."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        self.report(WorkerState.STARTING)
        self._open_sink()
        self.consumer.subscribe([self.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        metrics.KAFKA_CONSUMER_CONNECTED.set(1)
        metrics.KAFKA_PRODUCER_CONNECTED.set(1)
        self.report(WorkerState.RUNNING)
        consume, batch_size = self.consumer.consume, self.s.batch_size
        poll_producer, monotonic = self.outbox.producer.poll, time.monotonic
        checkpoint_due, book = self.checkpointer.due, self.book
        try:
            while not self.stop_requested:
                poll_producer(0)
                batch = consume(batch_size, 0.1)
                if batch:
                    self.process(batch)
                if checkpoint_due(monotonic()) or book.waiting:
                    self.checkpoint_step()
            return self._shutdown()
        finally:
            self.checkpointer.close()
            self.sink.close()

    def _request_stop(self, signum: int, frame: object) -> None:
        if self.stop_requested:  # second signal: stop now
            os._exit(1)
        self.stop_requested = True

    def _open_sink(self) -> None:
        self.sink.open()
        self.checkpointer.pool_gauges()
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
        # `is`, never `==`: KafkaError's == raises when compared with None
        if not all(map(is_, map(Message.error, msgs), repeat(None))):
            msgs = self._without_errors(msgs)
        part_arr = np.fromiter(map(Message.partition, msgs), np.int32, len(msgs))
        present, keep = self.book.admit(part_arr)
        if keep is not None:  # partitions awaiting their stored position are re-read
            msgs = [m for m, k in zip(msgs, keep.tolist(), strict=True) if k]
            part_arr = part_arr[keep]
        if not msgs:
            return
        off_arr = np.fromiter(map(Message.offset, msgs), np.int64, len(msgs))
        values = list(map(Message.value, msgs))
        # validity is judged against each message's own timestamp, never the wall clock
        kafka_ts = np.fromiter(map(_MS, map(Message.timestamp, msgs)), np.int64, len(msgs))
        metrics.MESSAGES.inc(len(msgs))
        metrics.BATCH_SIZE.observe(len(msgs))
        now_ms = _now_ms()
        readings, rejects = self.decoder.decode(values, part_arr, off_arr, kafka_ts)
        metrics.METERS_HELD.set(self.meters.held())  # new meters here, evictions at a cut
        if not self._recall(readings):
            return
        if rejects:
            self.outbox.dead_letters(msgs, rejects)
        if len(readings):
            if self.sink.writers > 1:  # only a cut checkpoint needs to know
                self.meter_partitions.note(readings.meter, readings.partition)
            if self.s.deduplicate:
                late, distinct = self._add_distinct(readings, now_ms)
            else:
                late, distinct = self.windows.add(readings, now_ms), readings
            if late:
                metrics.LATE_READINGS.inc(late)
            if self.s.anomaly_detection and len(distinct):
                det = self.detector.check(distinct)
                if len(det):
                    self.outbox.alerts(det, distinct)
            self._lag(readings, now_ms)
        self.book.processed(present, part_arr, off_arr, now_ms)
        seconds = time.perf_counter() - t0
        metrics.PROCESSING_SECONDS.observe(seconds)
        metrics.observe_each(metrics.MESSAGE_PROCESSING_MS, seconds * 1000 / len(msgs), len(msgs))

    def _recall(self, readings: Readings) -> bool:
        """The stored baselines of the batch's meters the detector does not hold
        (:func:`segs.runtime.eviction.recall`). False when the database is away: then
        everything not stored is discarded and the partitions wait for their positions, as
        after a lost partition, rather than check readings against a wrong baseline."""
        if not (self.s.meter_idle_evict_ms and self.s.anomaly_detection) or not len(readings):
            return True
        try:
            recall(readings, meters=self.meters, detector=self.detector, windows=self.windows,
                   lookup=self.sink.baselines_of, threshold=self.windows.threshold)
        except DatabaseError as exc:
            metrics.DB_WRITE_ERRORS.labels("load_baselines").inc()
            metrics.TIMESCALEDB_CONNECTED.set(0)
            log.warning("cannot read the baselines of returning meters (%s): rewinding, "
                        "partitions wait for the database", exc)
            cp = self.checkpointer
            if cp.in_flight is not None:
                cp.settle()
            cp.rewind()
            return False
        return True

    def _evict_idle(self, payload: Payload) -> None:
        after = self.s.meter_idle_evict_ms
        if after:
            evicted = evict_idle(after, payload.meters(), meters=self.meters,
                                 fields=self.meter_fields, windows=self.windows,
                                 detector=self.detector, written=self.written,
                                 homes=self.meter_partitions,
                                 recalled=self.s.anomaly_detection)
            if evicted:
                metrics.METERS_EVICTED.inc(evicted)
                metrics.METERS_HELD.set(self.meters.held())
            if evicted >= TRIM_AFTER:
                give_back_heap()

    def _add_distinct(self, readings: Readings, now_ms: int) -> tuple[int, Readings]:
        """Window a batch counting each identity once; returns the late readings and the
        readings for the detector: those counted now, and undecided ones it cannot have
        folded before (:meth:`AnomalyDetector.unseen`: newer than the meter's baseline)."""
        added = self.windows.add_distinct(readings, now_ms)
        if added.duplicates:
            metrics.DUPLICATE_READINGS.inc(added.duplicates)
        chosen = added.counted
        if added.undecided.any():
            undecided = np.flatnonzero(added.undecided)
            chosen = chosen.copy()
            chosen[undecided[self.detector.unseen(readings.take(undecided))]] = True
        return added.late, readings if chosen.all() else readings.take(chosen)

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

    def _lag(self, readings: Readings, now_ms: int) -> None:
        newest = {}
        for p in np.unique(readings.partition).tolist():
            newest[p] = int(readings.ts_ms[readings.partition == p].max())
        for p, ts in newest.items():
            metrics.LAG_SECONDS.labels(str(p)).set(max(0.0, (now_ms - ts) / 1000))

    def checkpoint_step(self) -> None:
        """Book a written checkpoint; position waiting partitions; start the next checkpoint
        on the checkpoint thread when due (not before a retry time)."""
        cp = self.checkpointer
        if not cp.collect():
            return
        now = time.monotonic()
        if now < cp.retry_at:
            return
        if self.book.waiting and not self._position_waiting():
            cp.retry_later(now)
            return
        cp.start_if_due(now)

    # ------------------------------------------------------------------ what a checkpoint drains

    def encodings(self) -> Encodings:
        return Encodings(self.meter_fields.fields(), self.region_fields.fields(),
                         region_ranks(self.regions))

    def drain(self) -> Drained:
        """Everything to store, cut along partitions unless a meter's readings came from
        two partitions since the last checkpoint (then one transaction holds it all).

        With regional aggregates on, a partition whose watermark rose is stored even when
        its offset did not move, and an empty partition gets its first position: the
        regional roll-up waits for the stored watermark of every partition."""
        now_ms = _now_ms()
        self.windows.advance_idle(now_ms)
        wms = self.book.watermarks(self.windows.watermarks(), now_ms,
                                   lateness_ms=self.s.allowed_lateness_ms,
                                   idle_advance_ms=self.s.idle_advance_ms)
        positions = self.book.to_store(wms, rising_watermarks=self.regional is not None,
                                       empty_end=self._empty_partition_end)
        partials = self.windows.drain()
        payload = Payload(partials, self.detector.take_dirty(), positions,
                          self.written.fresh(partials),
                          newest_ms={p: self.windows.newest(p) for p in positions})
        if self.s.deduplicate:
            payload.identities = self.windows.take_identities()
            payload.undecided = self.windows.take_undecided()
        self._evict_idle(payload)
        parts = self.sink.writers
        if self.meter_partitions.take_mixed():
            log.debug("a meter's readings came from two partitions: one checkpoint transaction")
            parts = 1
        return Drained(payload.split(parts, consume=True), wms)

    def discard(self) -> None:
        """The rewind: what is not stored is read again, its messages produced again."""
        self.outbox.forget_refused()
        self._fresh_state()
        self.book.rewind()

    def gauges(self) -> None:
        metrics.WINDOWED_READINGS.set(self.windows.pending_readings())
        metrics.WINDOW_BUCKETS.set(self.windows.pending_windows())

    def _empty_partition_end(self, p: int) -> int | None:
        """The end offset of partition ``p`` when it holds no message (its next offset
        then), else None: a partition never read has no position of its own."""
        try:
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=1, cached=False)
        except KafkaException:
            return None
        return high if 0 <= low == high else None

    def _regional_pass(self, stop: StopPublishing) -> PassStats:
        assert self.regional is not None
        out = self.outbox
        return self.regional.run(out.input_partitions(), out.deliver_regional,
                                 out.regional_limit, stop=stop)

    # ------------------------------------------------------------------ rebalances

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        log.info("assigned partitions %s", parts)
        self.book.assign(parts)
        found = self._positions_for(parts)
        if found is None:
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)
        else:
            tps, stored = found
            consumer.incremental_assign(tps)
            # librdkafka keeps a partition's pause flag across unassign/assign: one lost
            # while intake was paused would come back paused for good after the resume
            (consumer.pause if self.checkpointer.paused else consumer.resume)(tps)
            self.book.position(stored, _now_ms())
        metrics.ASSIGNED_PARTITIONS.set(len(self.book))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        log.info("revoking partitions %s", parts)
        cp = self.checkpointer
        # the revoke of the shutdown's own close() keeps within the shutdown's deadline: the
        # supervisor kills a worker that outlasts SHUTDOWN_TIMEOUT
        deadline = time.monotonic() + self.s.shutdown_timeout_s / 2
        if self._stop_by is not None:
            deadline = min(deadline, self._stop_by)
        if any(map(self.book.is_positioned, parts)) and not cp.checkpoint_until(deadline):
            log.warning("could not checkpoint before revoke: rewinding to stored positions")
            cp.rewind()
        self._forget(parts)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        log.warning("lost partitions %s: discarding unsaved state, rewinding", parts)
        cp = self.checkpointer
        if cp.in_flight is not None:
            cp.settle()  # what it stored stays stored; the rewind re-reads the rest
        cp.rewind()
        self._forget(parts)
        consumer.incremental_unassign(partitions)

    def _forget(self, parts: Sequence[int]) -> None:
        self.windows.drop_partitions(parts)
        self.detector.forget_partitions(parts)
        self.book.forget(parts)
        for p in parts:
            metrics.forget_partition(p)
        metrics.ASSIGNED_PARTITIONS.set(len(self.book))

    def _position_waiting(self) -> bool:
        """Seek assigned partitions that still wait for their stored position; False when
        the database could not say where."""
        waiting = self.book.waiting_partitions()
        if not waiting:
            return True
        found = self._positions_for(waiting)
        if found is None:
            return False
        tps, stored = found
        for tp in tps:
            try:
                self.consumer.seek(tp)
            except KafkaException:
                self.consumer.incremental_unassign([TopicPartition(self.topic, tp.partition)])
                self.consumer.incremental_assign([tp])
        if not self.checkpointer.paused:
            self.consumer.resume(self.checkpointer.partitions(waiting))
        self.book.position(stored, _now_ms())
        log.info("partitions %s resume from their stored positions", waiting)
        return True

    def _positions_for(self, parts: Sequence[int]
                       ) -> tuple[list[TopicPartition], dict[int, Position | None]] | None:
        """Where ``parts`` start, and their stored positions; their baselines loaded. None
        when the database (or, for a partition it has no position of, the group
        coordinator) is away: then they wait."""
        try:
            self._fit_decoder()
            stored = self.sink.load_positions(parts)
            lateness = self.s.allowed_lateness_ms
            thresholds = {p: NEVER if p not in stored else stored[p].stored_newest(lateness)
                          for p in parts}
            baselines = self.sink.stored_baselines(parts, self._recent(thresholds))
        except DatabaseError as exc:
            metrics.DB_WRITE_ERRORS.labels("load_positions").inc()
            log.warning("cannot load positions (%s): partitions %s wait", exc, list(parts))
            metrics.TIMESCALEDB_CONNECTED.set(0)
            return None
        unstored = [p for p in parts if p not in stored]
        committed = self._committed(unstored) if unstored else {}
        if committed is None:
            return None
        for p, newest in thresholds.items():
            self.windows.set_threshold(p, newest)
            self.written.stored_through(p, newest)
        load_baselines(baselines, meters=self.meters, detector=self.detector,
                       threshold=lambda p: thresholds.get(p, NEVER))
        default = OFFSET_BEGINNING if self.s.auto_offset_reset == "earliest" else OFFSET_END
        tps, positions = [], {}
        for p in parts:
            pos = stored.get(p)
            positions[p] = pos
            start = pos.next_offset if pos else committed.get(p, default)
            tps.append(TopicPartition(self.topic, p, start))
        return tps, positions

    def _recent(self, thresholds: dict[int, int]) -> int | None:
        """With eviction, baselines loaded on assign are those of meters read within
        METER_IDLE_EVICT of the oldest stored newest event time (``thresholds``); the
        others are looked up when they return. None (all) without eviction, or when a
        partition has no stored position."""
        after = self.s.meter_idle_evict_ms
        if not after or not thresholds or NEVER in thresholds.values():
            return None
        return min(thresholds.values()) - after

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

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> int:
        """Final checkpoint, then close the clients; 0 when everything was stored."""
        self.report(WorkerState.STOPPING)
        deadline = self._stop_by = time.monotonic() + self.s.shutdown_timeout_s * 0.8
        cp = self.checkpointer
        if cp.in_flight is not None:
            cp.settle()  # a failure here is retried by the final checkpoint below
        ok = not self.book.positioned() or cp.checkpoint_until(deadline)
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)
        remaining = self.outbox.producer.flush(max(0.1, deadline - time.monotonic()))
        self.report(WorkerState.STOPPED)
        if not ok or remaining:
            log.error("shutdown without final checkpoint: the restart re-reads from the "
                      "last stored positions")
            return 1
        log.info("worker %d stopped after its final checkpoint", self.worker_id)
        return 0


class _Status(Protocol):
    """The supervisor's shared array of worker states."""

    def __setitem__(self, index: int, value: int) -> None: ...


def worker_main(settings: Settings, worker_id: int, status: _Status) -> None:
    """Entry point of a spawned worker process."""
    from segs.ops.logs import setup_logging

    limit_arenas()  # before any thread starts
    setup_logging(settings.log_level, json_lines=_json_logs(settings))

    def report(state: WorkerState) -> None:
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
