"""The checkpoint cycle of one worker: cut on the loop, write on a thread, book on the loop.

A checkpoint is *cut* on the poll loop: the windows drained, the detector's changed baselines
taken, the positions and watermarks fixed (:class:`Cut`). It is then *written* by a thread
of its own while the loop goes on consuming, so alerts keep flowing during the database's
seconds; at most one is in flight. The loop *books* its outcome when it is done
(:meth:`Checkpointer.collect`). Revokes and shutdown wait for it and write a last one on the
loop itself (:meth:`Checkpointer.checkpoint`). The written part runs in this order:

0. flush the producer, so every alert and dead letter of the covered messages is delivered,
   those Kafka refused produced again first;
1. the database transactions: partials of both window sizes merged, changed baselines, and
   the next position of every covered partition (compare-and-set, see
   :mod:`segs.checkpoint.sink`); cut along partitions into transactions that run side by
   side (:mod:`segs.checkpoint.payload`), each a complete checkpoint of its partitions;
2. publish closed windows not yet published, up to the watermarks of the cut (readings
   consumed after it are not stored yet), chunk by chunk: read, produce, flush, mark
   (:meth:`segs.checkpoint.sink.Sink.claim_closed`). One on the thread publishes for at most
   one checkpoint interval, or until the loop waits for it; one on the loop for half the
   time left before its deadline. The next checkpoint takes up the rest. Then the regional
   pass (:mod:`segs.publish.regional`), in the same time;
3. commit the same offsets to Kafka, for lag monitoring only (the database is the truth).

Outcomes, as booked:

* all written: the positions are the stored ones; intake resumes if it was paused;
* step 0 or a database failure: the payloads not written are kept (the *unwritten* cut) and
  retried verbatim, with jittered exponential back-off, while every assigned partition is
  paused, so memory stays bounded; the payloads that were written keep their positions;
* a compare-and-set fails (another worker owns a partition now): everything in memory is
  discarded and every partition still assigned is rewound to its stored position. What the
  cut's other transactions stored stays stored: the rewind re-reads only what is not.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, Protocol

import numpy as np
from confluent_kafka import KafkaException, TopicPartition
from numpy.typing import NDArray

from segs.checkpoint.payload import Payload
from segs.checkpoint.sink import ClosedRow, CommitJob, CommitStats, PoolStats
from segs.errors import DatabaseError, FencedError, SegsError
from segs.ops import metrics
from segs.ops.logs import SAY_EVERY_S
from segs.publish.regional import PassStats
from segs.runtime.partitions import PartitionBook
from segs.runtime.state import WorkerState
from segs.times import iso_ms
from segs.windows.sizes import BY_SECONDS, REGIONAL_GRANULARITY, SIZES

log = logging.getLogger("segs.worker")
_REGIONAL_LATE_S = 300.0  # regional output this far behind is reported with its cause
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 10.0

StopPublishing = Callable[[], bool]


class Encodings(NamedTuple):
    """The names a checkpoint encodes, as of its cut. Safe to read later: a slot changes
    name only after its meter was evicted, and an evicted meter is in no cut."""

    names: Sequence[bytes]  # encoded meter names by slot
    regions: Sequence[bytes]  # encoded region names by slot
    rank: NDArray[np.int64]  # order of the region names (segs.windows.partials.region_ranks)


class Drained(NamedTuple):
    payloads: list[Payload]
    watermarks: dict[int, int]  # closed windows up to these are published once stored


@dataclass(slots=True)
class Cut:
    """One checkpoint as fixed on the loop: what the checkpoint thread may read."""

    payloads: list[Payload]
    encodings: Encodings
    watermarks: dict[int, int]  # closed windows up to these are published once stored
    started: float  # perf_counter at the cut


@dataclass(slots=True)
class Written:
    """What writing a cut reports back for :meth:`Checkpointer.book_outcome`."""

    cut: Cut  # what was written
    failure: str | None = None  # why it stopped before the database (step 0)
    results: list[CommitStats | SegsError] = field(default_factory=list)  # per payload
    db_seconds: float = 0.0
    published: dict[int, int] = field(default_factory=dict)  # window size → rows
    regional: PassStats | None = None  # the regional pass, when it ran
    publish_error: str | None = None  # publishing is postponed, not failed
    publish_seconds: float = 0.0
    flushed: dict[int, float] = field(default_factory=dict)  # window size → s, write+publish


class CheckpointSink(Protocol):
    def commit_all(self, jobs: Sequence[CommitJob]) -> list[CommitStats | SegsError]: ...

    def claim_closed(self, watermarks: dict[int, int],
                     deliver: Callable[[int, list[ClosedRow]], None], *,
                     stop: Callable[[], bool] = ...) -> dict[int, int]: ...

    def pool_stats(self) -> PoolStats: ...


class CheckpointConsumer(Protocol):
    def pause(self, partitions: list[TopicPartition]) -> None: ...

    def resume(self, partitions: list[TopicPartition]) -> None: ...

    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True]) -> None: ...

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = ...,
                              cached: bool = ...) -> tuple[int, int]: ...


class Deliveries(Protocol):
    def deliver_pending(self) -> str | None:
        """Step 0: why not everything produced so far was delivered, or None."""

    def deliver_closed(self, size_s: int, rows: list[ClosedRow]) -> None:
        """Produce closed-window rows and wait for Kafka; raises SegsError when it fails."""


class Memory(Protocol):
    """The worker's in-memory state, which a checkpoint drains and a rewind discards."""

    def encodings(self) -> Encodings: ...

    def drain(self) -> Drained:
        """Everything to store now: payloads, and the watermarks they publish up to."""

    def discard(self) -> None:
        """Discard what is not stored: windows, baselines, positions, refused messages."""

    def gauges(self) -> None:
        """Set the gauges of what is held in memory."""


RegionalPass = Callable[[StopPublishing], PassStats]


class Checkpointer:
    """Cuts, writes and books checkpoints; pauses intake and backs off while they fail."""

    def __init__(self, *, book: PartitionBook, memory: Memory, sink: CheckpointSink,
                 consumer: CheckpointConsumer, deliveries: Deliveries, topic: str,
                 interval_s: float, regional: RegionalPass | None = None,
                 report: Callable[[WorkerState], None] = lambda state: None) -> None:
        self.book, self.memory, self.sink = book, memory, sink
        self.consumer, self.deliveries, self.topic = consumer, deliveries, topic
        self.interval_s = interval_s
        self.regional = regional
        self.report = report
        self.unwritten: Cut | None = None  # a cut not (all) written: retried verbatim
        self.in_flight: Future[Written] | None = None  # the checkpoint being written
        self.settling = False  # the loop waits for the one in flight
        self.paused = False  # intake paused until a checkpoint succeeds
        self.retry_at = 0.0  # monotonic: nothing is tried before
        self.backoff_s = _BACKOFF_FIRST_S
        self.next_at = time.monotonic() + interval_s  # the next checkpoint is due
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="segs-checkpoint")
        self._said_at = -SAY_EVERY_S  # when a failure was said last (monotonic)
        self._regional_said_at = -SAY_EVERY_S
        self._regional_newest: dict[str, int] = {}  # region → newest window start published

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # a checkpoint in flight ends first

    # ------------------------------------------------------------------ on the loop

    def due(self, now: float) -> bool:
        """The loop's cheap test: something to start, book or retry."""
        return now >= self.next_at or self.paused or self.in_flight is not None

    def collect(self) -> bool:
        """Book the checkpoint in flight if it is done; False while it is still written."""
        if self.in_flight is None:
            return True
        if not self.in_flight.done():
            return False
        self.settle()
        return True

    def start_if_due(self, now: float) -> None:
        """Start the next checkpoint on the thread when due (or to retry while paused);
        not before the retry time. Call after :meth:`collect` said True."""
        assert self.in_flight is None
        if now < self.retry_at or not (now >= self.next_at or self.paused):
            return
        until = now + self.interval_s
        self.in_flight = self._thread.submit(
            self.write, self.cut(), lambda: self.settling or time.monotonic() >= until)

    def retry_later(self, now: float) -> None:
        """Something before the checkpoint failed (positioning): retry in a jittered second."""
        self.retry_at = now + 1.0 + random.random()

    def checkpoint(self, deadline: float) -> bool:
        """One whole checkpoint on the loop, after the one in flight if any, publishing for
        half the time left before ``deadline``; False when it must retry."""
        if self.in_flight is not None and not self.settle():
            return False
        until = (time.monotonic() + deadline) / 2
        return self.book_outcome(self.write(self.cut(), lambda: time.monotonic() >= until))

    def checkpoint_until(self, deadline: float) -> bool:
        """Checkpoint on the loop, retrying after each back-off until ``deadline``."""
        while True:
            if self.checkpoint(deadline):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(self.retry_at - time.monotonic(),
                                    deadline - time.monotonic())))

    def settle(self) -> bool:
        """Wait for the checkpoint in flight and book it; False when it must retry."""
        assert self.in_flight is not None
        in_flight, self.in_flight = self.in_flight, None
        self.settling = True  # its publishing ends after the chunk it is on
        try:
            out = in_flight.result()
        finally:
            self.settling = False
        return self.book_outcome(out)

    def rewind(self) -> None:
        """Discard everything not stored, the unwritten cut too; the partitions wait for
        their stored positions."""
        self.unwritten = None
        self.memory.discard()

    def cut(self) -> Cut:
        """Fix what the next checkpoint writes: the unwritten cut, verbatim (a retry), or
        new payloads, drained now."""
        self.next_at = time.monotonic() + self.interval_s
        encodings, started = self.memory.encodings(), time.perf_counter()
        if self.unwritten is not None:
            return replace(self.unwritten, encodings=encodings, started=started)
        payloads, watermarks = self.memory.drain()
        return Cut(payloads, encodings, watermarks, started)

    # ------------------------------------------------------------------ on the thread

    def write(self, cut: Cut, stop_publishing: StopPublishing) -> Written:
        """Steps 0–2 (module docstring). Runs on the checkpoint thread, or on the loop for
        revokes and shutdown: it uses only ``cut``, the deliveries, the sink and the
        regional pass, which are thread-safe, and leaves all bookkeeping to :meth:`book_outcome`.
        ``stop_publishing()`` ends step 2 between chunks."""
        out = Written(cut)
        # 0. every alert and dead letter of the covered messages is delivered first
        out.failure = self.deliveries.deliver_pending()
        if out.failure:
            return out
        # 1. the database transactions
        t_db = time.perf_counter()
        if cut.payloads:
            names, regions, rank = cut.encodings
            out.results = self.sink.commit_all([p.commit_job(names, regions, rank)
                                                for p in cut.payloads])
            out.db_seconds = time.perf_counter() - t_db
            if not all(isinstance(r, CommitStats) for r in out.results):
                return out
        # 2. closed windows to the aggregates topics, then the regional pass
        t_pub = time.perf_counter()
        published_at: dict[int, float] = {}

        def deliver(size_s: int, rows: list[ClosedRow]) -> None:
            self.deliveries.deliver_closed(size_s, rows)
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
            out.flushed = {size: published_at.get(size, done) - t_db for size in BY_SECONDS}
        if self.regional is not None and not out.publish_error:
            try:
                out.regional = self.regional(stop_publishing)
            except SegsError as exc:
                out.publish_error = f"regional aggregates: {exc}"
                if isinstance(exc, DatabaseError):
                    metrics.DB_WRITE_ERRORS.labels("publish").inc()
        return out

    # ------------------------------------------------------------------ booking

    def book_outcome(self, out: Written) -> bool:
        """On the loop: what a written checkpoint changes; False when it must retry."""
        cut = out.cut
        if out.failure:
            self.unwritten = cut
            self.fail(out.failure, database=False)
            return False
        if cut.payloads:
            metrics.DB_WRITE_LATENCY_MS.observe(out.db_seconds * 1000)
        failed: list[tuple[Payload, SegsError]] = []
        for payload, result in zip(cut.payloads, out.results, strict=True):
            if isinstance(result, CommitStats):
                self._stored(payload, result)
            else:
                failed.append((payload, result))
        self.unwritten = replace(cut, payloads=[p for p, _ in failed]) if failed else None
        fenced = [exc for _, exc in failed if isinstance(exc, FencedError)]
        if fenced:
            log.warning("%s: rewinding to stored positions", fenced[0])
            self.rewind()
            self.resume()
            return False
        if failed:
            metrics.DB_WRITE_ERRORS.labels("checkpoint").inc(len(failed))
            self.fail(f"checkpoint failed: {failed[0][1]}")
            return False
        metrics.TIMESCALEDB_CONNECTED.set(1)
        self.pool_gauges()
        if out.publish_error:
            log.warning("publishing closed windows postponed: %s", out.publish_error)
        for size, count in out.published.items():
            if count:
                label = BY_SECONDS[size].granularity
                metrics.AGGREGATES_PUBLISHED.labels(label, label).inc(count)
        if out.regional is not None:
            self._book_regional(out.regional)
        metrics.FLUSH_DURATION.observe(out.publish_seconds)
        for size, seconds in out.flushed.items():
            metrics.FLUSH_DURATION_MS.labels(BY_SECONDS[size].granularity).observe(seconds * 1000)
        # 3. offsets to Kafka, for lag monitoring only
        self._commit_kafka_offsets()
        self._offset_lag()
        self.resume()
        self.memory.gauges()
        metrics.CHECKPOINT_DURATION.observe(time.perf_counter() - cut.started)
        return True

    def _stored(self, payload: Payload, stats: CommitStats) -> None:
        """Book a written payload: its positions are the stored ones now."""
        self.book.stored_now(payload.positions)
        if stats.duplicates:
            metrics.DUPLICATE_READINGS.inc(stats.duplicates)
        for size in SIZES:
            metrics.AGGREGATES_WRITTEN.labels(size.granularity, size.granularity).inc(
                stats.new_rows[size.table])
            metrics.DB_WRITE_ROWS.labels(size.table).inc(stats.rows[size.table])
        metrics.DB_WRITE_ROWS.labels("meter_baselines").inc(stats.baselines)
        log.debug("checkpoint: %s rows, %d baselines, %d positions in %.3f s",
                  stats.rows, stats.baselines, len(payload.positions), stats.seconds)

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
                and now - self._regional_said_at >= SAY_EVERY_S):
            self._regional_said_at = now
            why = ("have no stored watermark yet" if r.horizon_ms is None
                   else f"hold the lowest stored watermark, {iso_ms(r.horizon_ms)}")
            log.warning("regional aggregates wait %.0f s: a window is rolled up once every "
                        "partition of %s has passed its end; partitions %s %s (their owner "
                        "is stopped, or they are assigned to no worker)", r.waiting_s,
                        self.topic, r.holding[:10], why)

    def _commit_kafka_offsets(self) -> None:
        """The stored positions as the group's Kafka offsets: for lag monitoring, and so
        that a service keeping its positions only in Kafka (the TypeScript one, rolled back
        to) continues where this one stopped (the consumer's close delivers the last)."""
        tps = [TopicPartition(self.topic, p, off) for p, off in self.book.committable()]
        if tps:
            try:
                self.consumer.commit(offsets=tps, asynchronous=True)
            except KafkaException as exc:
                log.debug("offset commit to Kafka skipped: %s", exc)

    def _offset_lag(self) -> None:
        """Consumer offset lag per partition from the high watermarks of recent fetches."""
        for p, nxt in self.book.consumed_offsets():
            try:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                metrics.CONSUMER_OFFSET_LAG.labels(str(p)).set(max(0, high - nxt))

    def pool_gauges(self) -> None:
        pool = self.sink.pool_stats()
        metrics.DB_POOL_SIZE.labels("total").set(pool.size)
        metrics.DB_POOL_SIZE.labels("idle").set(pool.idle)
        metrics.DB_POOL_SIZE.labels("waiting").set(pool.waiting)

    # ------------------------------------------------------------------ back-off

    def fail(self, why: str, *, database: bool = True) -> None:
        """Pause intake and schedule a retry with jittered exponential back-off; say why
        when it starts and once a minute while it lasts."""
        now = time.monotonic()
        if not self.paused or now - self._said_at >= SAY_EVERY_S:
            log.warning("%s; %s", why, "intake stays paused, retrying" if self.paused
                        else "pausing intake, retrying")
            self._said_at = now
        if not self.paused:
            self.report(WorkerState.DEGRADED)
            if database:
                metrics.TIMESCALEDB_CONNECTED.set(0)
            self.consumer.pause(self.partitions(sorted(self.book)))
            self.paused = True
        self.retry_at = time.monotonic() + self.backoff_s * random.uniform(0.5, 1.5)
        self.backoff_s = min(self.backoff_s * 2, _BACKOFF_MAX_S)

    def resume(self) -> None:
        self.backoff_s = _BACKOFF_FIRST_S
        if self.paused:
            log.info("checkpoint succeeded; resuming intake")
            self.report(WorkerState.RUNNING)
            self.consumer.resume(self.partitions(self.book.positioned()))
            self.paused = False

    def partitions(self, parts: Sequence[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in parts]
