"""The checkpoint state machine with a fake sink that fails per transaction and a fake
consumer: what a failure keeps, pauses, rewinds and retries, so that no position is lost or
stored twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from segs.checkpoint.payload import Payload
from segs.checkpoint.sink import ClosedRow, CommitJob, CommitStats, PoolStats
from segs.detection.detector import BaselineState
from segs.errors import DatabaseError, FencedError, SegsError
from segs.publish.regional import PassStats
from segs.runtime.checkpointer import Checkpointer, Drained, Encodings
from segs.runtime.partitions import PartitionBook
from segs.runtime.state import WorkerState
from segs.windows.partials import Partials

NOW = 1_795_759_200_000
_STATS = CommitStats(rows={"aggregates_1m": 0, "aggregates_15m": 0},
                     new_rows={"aggregates_1m": 0, "aggregates_15m": 0}, baselines=0,
                     seconds=0.0)


class FakeSink:
    """Commits a transaction unless one of its partitions is set to fail; records every
    position it stores, as the database's compare-and-set would."""

    def __init__(self) -> None:
        self.fail: dict[int, SegsError] = {}  # partition → the error of its transaction
        self.stored: dict[int, int] = {}
        self.writes: list[dict[int, tuple[int | None, int, int | None]]] = []
        self.gate: threading.Event | None = None  # set: commit_all may go on
        self.claims = 0

    def commit_all(self, jobs: Sequence[CommitJob]) -> list[CommitStats | SegsError]:
        if self.gate is not None:
            assert self.gate.wait(5)
        out: list[CommitStats | SegsError] = []
        for job in jobs:
            positions = job.positions
            failed = next((self.fail[p] for p in positions if p in self.fail), None)
            if failed is not None:
                out.append(failed)
                continue
            for p, (prev, nxt, _) in positions.items():
                assert self.stored.get(p) == prev, f"partition {p}: compare-and-set"
                self.stored[p] = nxt
            self.writes.append(dict(positions))
            out.append(_STATS)
        return out

    def claim_closed(self, watermarks: dict[int, int],
                     deliver: Callable[[int, list[ClosedRow]], None], *,
                     stop: Callable[[], bool] = lambda: False) -> dict[int, int]:
        self.claims += 1
        return {}

    def pool_stats(self) -> PoolStats:
        return PoolStats(size=3, idle=3, waiting=0)


class FakeConsumer:
    def __init__(self) -> None:
        self.paused: set[int] = set()
        self.committed: dict[int, int] = {}

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update(tp.partition for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.partition for tp in partitions)

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.committed.update((tp.partition, tp.offset) for tp in offsets)

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        return 0, 1_000


class FakeDeliveries:
    def __init__(self) -> None:
        self.stuck: str | None = None

    def deliver_pending(self) -> str | None:
        return self.stuck

    def deliver_closed(self, size_s: int, rows: list[ClosedRow]) -> None:
        raise AssertionError("no closed windows in these tests")


class FakeMemory:
    """Drains the book's positions into one payload cut along partitions, ``writers`` ways."""

    def __init__(self, book: PartitionBook, writers: int = 2) -> None:
        self.book, self.writers = book, writers
        self.drains = self.discards = 0

    def encodings(self) -> Encodings:
        return Encodings([], [], np.empty(0, np.int64))

    def drain(self) -> Drained:
        self.drains += 1
        payload = Payload(Partials.empty(60), _no_baselines(), self.book.to_store({}))
        return Drained(payload.split(self.writers), {})

    def discard(self) -> None:
        self.discards += 1
        self.book.rewind()

    def gauges(self) -> None:
        pass


def _no_baselines() -> BaselineState:
    i, f = np.empty(0, np.int64), np.empty(0, np.float64)
    return BaselineState(meter=np.empty(0, np.int32), partition=np.empty(0, np.int32),
                         baseline=f, samples=i, last_outage_ms=i, last_spike_ms=i,
                         last_drop_ms=i)


class Rig:
    def __init__(self, partitions: int = 2, writers: int = 2) -> None:
        self.book = PartitionBook()
        parts = range(partitions)
        self.book.assign(parts)
        self.book.position(dict.fromkeys(parts), NOW)
        self.sink, self.consumer = FakeSink(), FakeConsumer()
        self.deliveries, self.memory = FakeDeliveries(), FakeMemory(self.book, writers)
        self.states: list[WorkerState] = []
        self.cp = Checkpointer(book=self.book, memory=self.memory, sink=self.sink,
                               consumer=self.consumer, deliveries=self.deliveries,
                               topic="readings", interval_s=60.0, report=self.states.append)

    def consume(self, p: int, upto: int) -> None:
        """Process messages of partition ``p`` up to offset ``upto`` - 1."""
        self.book.processed([p], np.array([p], np.int32), np.array([upto - 1], np.int64), NOW)

    def checkpoint(self) -> bool:
        return self.cp.checkpoint(time.monotonic() + 5)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_a_written_checkpoint_stores_positions_and_commits_them_to_kafka(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.consume(1, 20)
    assert rig.checkpoint()
    assert rig.sink.writes == [{0: (None, 10, None)}, {1: (None, 20, None)}]  # side by side
    assert rig.book[0].stored == 10 and rig.book[1].stored == 20
    assert rig.consumer.committed == {0: 10, 1: 20}
    assert rig.cp.unwritten is None and not rig.cp.paused and rig.states == []
    assert rig.sink.claims == 1
    assert rig.checkpoint() and len(rig.sink.writes) == 2  # nothing new: nothing written


def test_one_of_two_transactions_failing_keeps_only_its_payload_for_the_retry(
        rig: Rig) -> None:
    rig.consume(0, 10)
    rig.consume(1, 20)
    rig.sink.fail[1] = DatabaseError("connection lost")
    before = time.monotonic()
    assert not rig.checkpoint()
    # the other transaction's positions are booked; the failed one waits
    assert rig.book[0].stored == 10 and rig.book[1].stored is None
    assert rig.cp.unwritten is not None
    assert [p.positions for p in rig.cp.unwritten.payloads] == [{1: (None, 20, None)}]
    # intake paused on every assigned partition, with a back-off; no offsets to Kafka
    assert rig.cp.paused and rig.consumer.paused == {0, 1}
    assert rig.states == [WorkerState.DEGRADED]
    assert rig.cp.retry_at > before and rig.consumer.committed == {}
    assert rig.sink.claims == 0  # closed windows wait for the database
    # consumed meanwhile (the loop goes on until the pause takes effect)
    rig.consume(1, 25)
    del rig.sink.fail[1]
    assert rig.checkpoint()
    assert rig.memory.drains == 1  # the retry wrote the kept payload verbatim
    assert rig.sink.writes == [{0: (None, 10, None)}, {1: (None, 20, None)}]
    assert not rig.cp.paused and rig.consumer.paused == set()
    assert rig.states == [WorkerState.DEGRADED, WorkerState.RUNNING]
    # what came after the cut is the next checkpoint's, stored once
    assert rig.checkpoint()
    assert rig.sink.writes[2:] == [{1: (20, 25, None)}]
    assert rig.sink.stored == {0: 10, 1: 25}


def test_a_fenced_transaction_rewinds_but_keeps_what_the_other_stored(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.consume(1, 20)
    rig.sink.fail[1] = FencedError("position moved: another worker owns it now")
    assert not rig.checkpoint()
    assert rig.memory.discards == 1
    assert rig.cp.unwritten is None  # nothing is retried: it is read again
    assert rig.book.waiting_partitions() == [0, 1]
    assert rig.sink.stored == {0: 10}
    assert not rig.cp.paused and rig.states == []  # a rewind is no outage


def test_a_fenced_transaction_after_an_outage_resumes_intake(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.sink.fail[0] = DatabaseError("down")
    assert not rig.checkpoint() and rig.cp.paused
    rig.sink.fail[0] = FencedError("moved")
    assert not rig.checkpoint()
    assert not rig.cp.paused and rig.cp.unwritten is None
    assert rig.states == [WorkerState.DEGRADED, WorkerState.RUNNING]


def test_database_down_backs_off_exponentially_then_resumes(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.sink.fail[0] = DatabaseError("down")
    backoffs = []
    for _ in range(6):
        assert not rig.checkpoint()
        backoffs.append(rig.cp.backoff_s)
    assert backoffs == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert rig.states == [WorkerState.DEGRADED]  # said once
    assert rig.memory.drains == 1 and rig.sink.writes == []
    del rig.sink.fail[0]
    assert rig.checkpoint()
    assert rig.cp.backoff_s == 0.5 and not rig.cp.paused
    assert rig.sink.writes == [{0: (None, 10, None)}]


def test_an_undelivered_producer_keeps_the_cut_and_writes_nothing(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.deliveries.stuck = "Kafka producer could not deliver within 10 s"
    assert not rig.checkpoint()
    assert rig.sink.writes == [] and rig.cp.paused and rig.cp.unwritten is not None
    rig.deliveries.stuck = None
    assert rig.checkpoint()
    assert rig.sink.writes == [{0: (None, 10, None)}] and rig.memory.drains == 1


def test_a_revoke_deadline_ends_the_retries(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.sink.fail[0] = DatabaseError("down")
    assert not rig.cp.checkpoint_until(time.monotonic() + 0.3)
    assert rig.cp.paused and rig.cp.unwritten is not None


def test_checkpoint_until_succeeds_once_the_database_is_back(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.sink.fail[0] = DatabaseError("down")
    threading.Timer(0.2, rig.sink.fail.clear).start()
    assert rig.cp.checkpoint_until(time.monotonic() + 5)
    assert rig.sink.stored == {0: 10} and not rig.cp.paused


def test_the_thread_writes_while_the_loop_goes_on_and_the_loop_books(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.sink.gate = threading.Event()
    now = time.monotonic()
    assert not rig.cp.due(now)
    rig.cp.start_if_due(now)
    assert rig.cp.in_flight is None  # not due yet
    rig.cp.start_if_due(now + 61)
    assert rig.cp.in_flight is not None and rig.cp.due(now)
    assert not rig.cp.collect()  # still written
    rig.consume(0, 15)  # the loop goes on
    rig.sink.gate.set()
    rig.cp.in_flight.result(5)
    assert rig.book[0].stored is None  # booked on the loop only
    assert rig.cp.collect()
    assert rig.cp.in_flight is None and rig.book[0].stored == 10
    assert rig.book.to_store({}) == {0: (10, 15, None)}
    rig.cp.close()


def test_settle_waits_for_the_checkpoint_in_flight(rig: Rig) -> None:
    rig.consume(1, 7)
    rig.sink.gate = threading.Event()
    rig.cp.start_if_due(time.monotonic() + 61)
    threading.Timer(0.1, rig.sink.gate.set).start()
    assert rig.cp.settle()
    assert rig.sink.stored == {1: 7}
    rig.cp.close()


def test_a_retry_waits_for_its_back_off(rig: Rig) -> None:
    rig.consume(0, 10)
    rig.sink.fail[0] = DatabaseError("down")
    assert not rig.checkpoint()
    rig.cp.start_if_due(rig.cp.retry_at - 0.01)
    assert rig.cp.in_flight is None
    del rig.sink.fail[0]
    rig.cp.start_if_due(rig.cp.retry_at)  # paused: due at once after the back-off
    assert rig.cp.in_flight is not None and rig.cp.settle()
    assert rig.sink.stored == {0: 10}
    rig.cp.close()


def test_a_single_writer_stores_all_partitions_in_one_transaction() -> None:
    rig = Rig(partitions=3, writers=1)
    for p in range(3):
        rig.consume(p, 5 + p)
    assert rig.checkpoint()
    assert rig.sink.writes == [{0: (None, 5, None), 1: (None, 6, None), 2: (None, 7, None)}]


def test_publishing_that_fails_postpones_it_but_the_checkpoint_stands(rig: Rig) -> None:
    def claim_fails(*args: object, **kwargs: object) -> dict[int, int]:
        raise DatabaseError("publishing connection lost")

    rig.sink.claim_closed = claim_fails  # type: ignore[method-assign]
    rig.consume(0, 10)
    assert rig.checkpoint()
    assert rig.sink.stored == {0: 10} and rig.cp.unwritten is None and not rig.cp.paused
    assert rig.consumer.committed == {0: 10}


def test_a_regional_pass_runs_after_publishing_and_its_failure_is_postponed() -> None:
    rig = Rig()
    calls: list[bool] = []

    def regional(stop: Callable[[], bool]) -> PassStats:
        calls.append(stop())
        raise SegsError("cannot read the partitions of readings")

    rig.cp.regional = regional
    rig.consume(1, 3)
    assert rig.checkpoint() and calls == [False] and rig.sink.stored == {1: 3}
