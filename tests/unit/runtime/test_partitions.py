"""The partition book: a partition's messages count only once it is positioned, a checkpoint
stores exactly what was consumed past the stored position, and a rewind forgets what is not
stored but keeps the stored watermark."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segs.checkpoint.sink import Position
from segs.runtime.partitions import NEVER, PartitionBook

NOW = 1_795_759_200_000


def _book(stored: dict[int, Position | None]) -> PartitionBook:
    book = PartitionBook()
    book.assign(stored)
    book.position(stored, NOW)
    return book


def test_messages_of_a_partition_waiting_for_its_position_are_not_processed() -> None:
    book = PartitionBook()
    book.assign([0, 1])
    assert book.waiting and book.waiting_partitions() == [0, 1]
    book.position({0: Position(10, None)}, NOW)
    parts = np.array([0, 1, 0, 2], np.int32)  # 2: not assigned at all
    present, keep = book.admit(parts)
    assert present == [0]
    assert keep is not None and keep.tolist() == [True, False, True, False]
    book.position({1: None}, NOW)
    assert not book.waiting
    assert book.admit(np.array([1, 0], np.int32)) == ([0, 1], None)


def test_a_checkpoint_stores_what_was_consumed_past_the_stored_position() -> None:
    book = _book({0: Position(10, 5), 1: None, 2: Position(7, None)})
    assert book.to_store({}) == {}  # nothing consumed past the stored positions
    parts = np.array([0, 0, 1], np.int32)
    book.processed([0, 1], parts, np.array([10, 11, 3], np.int64), NOW + 1)
    assert book.to_store({0: 99}) == {0: (10, 12, 99), 1: (None, 4, None)}
    book.stored_now({0: (10, 12, 99), 1: (None, 4, None)})
    assert book.to_store({}) == {}
    assert book[0].stored == 12 and book[0].stored_wm == 99 and book[1].stored == 4
    assert book.committable() == [(0, 12), (1, 4), (2, 7)]
    assert book.consumed_offsets() == [(0, 12), (1, 4), (2, 7)]


def test_a_stored_watermark_only_rises() -> None:
    book = _book({0: Position(10, 50)})
    book.stored_now({0: (10, 10, 40)})
    assert book[0].stored_wm == 50


def test_stored_positions_of_a_partition_no_longer_assigned_are_ignored() -> None:
    book = _book({0: Position(10, None)})
    book.forget([0])
    book.stored_now({0: (10, 20, 5)})
    assert 0 not in book and len(book) == 0


def test_a_stored_position_becomes_the_consumed_one_of_a_partition_never_read() -> None:
    book = _book({0: None})
    assert book[0].consumed is None
    book.stored_now({0: (None, 30, 5)})  # an empty partition's first position
    assert book[0].consumed == 30 and book.to_store({}) == {}


def test_with_rising_watermarks_a_partition_is_stored_when_only_its_watermark_rose() -> None:
    book = _book({0: Position(10, 100), 1: None, 2: None, 3: Position(4, 100)})
    ends = {1: 8, 2: None}  # 1 is empty at offset 8, 2 holds messages never read
    wms = {0: 200, 1: 200, 2: 200, 3: 100}
    assert book.to_store(wms) == {}
    assert book.to_store(wms, rising_watermarks=True, empty_end=ends.get) == {
        0: (10, 10, 200), 1: (None, 8, 200)}


def test_the_watermark_is_the_newest_of_stored_engine_and_idle_advance() -> None:
    book = _book({0: Position(1, 500), 1: None, 2: None})
    book.processed([2], np.array([2], np.int32), np.array([0], np.int64), NOW - 10_000)
    book.assign([3])  # not positioned: no watermark
    wms = book.watermarks({0: 400, 1: 700, 3: 900}, NOW, lateness_ms=1_000,
                          idle_advance_ms=5_000)
    assert wms == {0: 500, 1: 700, 2: NOW - 1_000}


def test_a_rewind_forgets_what_is_not_stored_but_keeps_the_watermark() -> None:
    book = _book({0: Position(10, 50), 1: None})
    book.processed([0, 1], np.array([0, 1], np.int32), np.array([20, 3], np.int64), NOW)
    book.rewind()
    assert book.waiting_partitions() == [0, 1] and book.positioned() == []
    assert book[0].stored is None and book[0].consumed is None and book[0].stored_wm == 50
    assert book.to_store({}) == {} and book.committable() == []
    assert book.admit(np.array([0], np.int32))[0] == []
    book.position({0: Position(10, None), 1: None}, NOW)
    assert book[0].consumed == 10 and book[0].stored_wm == 50 and not book.waiting


def test_forget_drops_the_record_whatever_its_state() -> None:
    book = _book({0: Position(1, None)})
    book.assign([1, 2])
    book.forget([0, 1, 9])
    assert list(book) == [2] and book.waiting_partitions() == [2] and book.waiting
    book.forget([2])
    assert not book.waiting and len(book) == 0
    book.assign([0])  # assigned again: a fresh record
    assert book[0].stored_wm == NEVER and book[0].stored is None and book.waiting


_op = st.one_of(
    st.tuples(st.just("assign"), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("position"), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("forget"), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("rewind"), st.just([])),
)


@settings(deadline=None, max_examples=200)
@given(ops=st.lists(_op, max_size=30))
def test_waiting_says_whether_some_assigned_partition_is_not_positioned(
        ops: list[tuple[str, list[int]]]) -> None:
    book = PartitionBook()
    for op, parts in ops:
        if op == "assign":
            book.assign(parts)
        elif op == "position":
            book.position({p: None for p in parts if p in book}, NOW)
        elif op == "forget":
            book.forget(parts)
        else:
            book.rewind()
        unpositioned = [p for p in book if not book[p].positioned]
        assert book.waiting == bool(unpositioned)
        assert book.waiting_partitions() == sorted(unpositioned)
        assert sorted([*book.positioned(), *unpositioned]) == sorted(book)
