"""The regional roll-up against the real PostgreSQL server (segs.publish.regional).

Checkpoints (Sink.commit) record the windows they write; a pass computes the windows every
partition's stored watermark has passed, exactly from the stored aggregates_1m rows, and
publishes them by claim. These tests write partials the way checkpoints do and check the
table and the delivered messages against tests.reference.regional of the stored rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.checkpoint.migrate import migrate
from segs.checkpoint.sink import Sink
from segs.publish.regional import WINDOW_MS, Message, Regional
from segs.tools.local_servers import LocalPostgres
from tests.reference import RefAgg, RefRegional, regional

pytestmark = pytest.mark.integration

T0 = 1_795_500_000_000 - 1_795_500_000_000 % WINDOW_MS
CAPS = {"North": 50.0}


@pytest.fixture
def sink(db_url: str) -> Iterator[Sink]:
    migrate(db_url)
    s = Sink(db_url, consumer_group="g", topic="t", regional=True)
    s.open()
    yield s
    s.close()


def _regional(sink: Sink, group: str = "g") -> Regional:
    return Regional(sink.connection, group=group, topic="t", capacities=CAPS,
                    meter_list=True)


class Topic:
    """What the passes delivered, in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def deliver(self, messages: list[Message]) -> None:
        for key, value, headers in messages:
            msg = json.loads(value)
            assert key == msg["region"].encode() and dict(headers)["region"] == key
            self.messages.append(msg)

    def latest(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(m["region"], m["timestamp"]): m for m in self.messages}


def _commit(sink: Sink, rows: list[tuple[str, str, int, int, float, float]],
            positions: dict[int, tuple[int | None, int, int | None]]) -> None:
    """Partials (meter, region, window start ms, count, power sum, max) as a checkpoint
    writes them, with the positions (and watermarks) of partitions 0 and 1."""
    partials = [(m, r, s, n, total, mx, min(mx, total / n), 0.0, s + 1, 0)
                for m, r, s, n, total, mx in rows]
    sink.commit({60: partials}, [], positions, windows=sorted({r[2] for r in rows}))


def _expected(url: str) -> dict[tuple[str, int], RefRegional]:
    """The reference computed from the stored aggregates_1m rows."""
    with psycopg.connect(url) as conn:
        stored = conn.execute(
            "SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, sample_count,"
            " power_sum, max_power, region FROM aggregates_1m").fetchall()
    per_meter = {(m, int(s)): RefAgg(n, ps, ps / n, mx, 0.0, 0.0, region, None)
                 for m, s, n, ps, mx, region in stored}
    return regional(per_meter, CAPS)


def _table(url: str) -> dict[tuple[str, int], tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT region, (extract(epoch FROM window_start) * 1000)::int8, meter_count,"
            " total_consumption, avg_consumption, max_consumption, min_consumption,"
            " load_percentage, published,"
            " (extract(epoch FROM window_end - window_start))::int FROM aggregates_1m_regional"
        ).fetchall()
    return {(r[0], int(r[1])): r[2:] for r in rows}


def assert_regional(url: str, topic: Topic, *, published: bool = True) -> None:
    """Table and topic (latest per region and window) equal the reference exactly."""
    want = _expected(url)
    got = _table(url)
    # a region whose last meter of a window moved to another region keeps an emptied row
    emptied = {k for k, row in got.items() if k not in want}
    assert want.keys() <= got.keys()
    assert all(got[k][:6] == (0, 0.0, 0.0, 0.0, 0.0, 0.0) for k in emptied), emptied
    latest = topic.latest()
    for key, ref in want.items():
        n, total, avg, mx, mn, load, done, span = got[key]
        assert (n, total, avg, mx, mn, load, span) == (
            ref.meter_count, ref.total, ref.avg, ref.max, ref.min, ref.load, 60), key
        if published:
            assert done, key
            from segs.times import iso_ms

            msg = latest[(key[0], iso_ms(key[1]))]
            assert msg["windowEnd"] == iso_ms(key[1] + WINDOW_MS)
            assert (msg["meter_count"], msg["total_consumption"], msg["avg_consumption"],
                    msg["max_consumption"], msg["min_consumption"], msg["load_percentage"],
                    tuple(msg["active_meters"]), msg["active_meters_omitted"]) == (
                ref.meter_count, ref.total, ref.avg, ref.max, ref.min, ref.load, ref.meters,
                False), key
    if published:
        assert len(latest) == len(got)
        for region, start in emptied:
            from segs.times import iso_ms

            msg = latest[(region, iso_ms(start))]
            assert msg["meter_count"] == 0 and msg["active_meters"] == []


def _reset(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE aggregates_1m, aggregates_15m, aggregates_1m_regional, "
                     "regional_dirty, stream_positions")


meter = st.sampled_from([f"m{i}" for i in range(12)] + ["ü-1", "Z", "a b"])
finite = st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=1e12))
partial_row = st.tuples(meter, st.sampled_from(["North", "South", "Zürich"]),
                        st.integers(0, 3).map(lambda k: T0 + k * WINDOW_MS),
                        st.integers(1, 30), finite, finite)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(partial_row, min_size=1, max_size=25), min_size=1,
                        max_size=3))
def test_the_roll_up_equals_the_reference_of_the_stored_rows(
        sink: Sink, db_url: str, batches: list[list[tuple[str, str, int, int, float, float]]],
) -> None:
    """Any partials, in one to three checkpoints (later ones merge into the rows of the
    earlier ones, as late readings do), each followed by a pass: the table and the latest
    message of every region-window equal the reference of what is stored."""
    _reset(db_url)
    topic = Topic()
    pos: dict[int, int | None] = {0: None, 1: None}
    closed = T0 + 10 * WINDOW_MS  # every window is closed
    for i, batch in enumerate(batches):
        # distinct (meter, window) per checkpoint, as a drain gives
        rows = list({(m, s): (m, r, s, n, total, max(mx, total / n))
                     for m, r, s, n, total, mx in batch}.values())
        _commit(sink, rows, {p: (pos[p], i + 1, closed) for p in (0, 1)})
        pos = {0: i + 1, 1: i + 1}
        stats = _regional(sink).run(2, topic.deliver, 1_048_588)
        assert stats.computer and stats.windows == len({r[2] for r in rows})
    assert_regional(db_url, topic)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM regional_dirty").fetchone() == (0,)


def test_a_window_waits_for_every_partition(sink: Sink, db_url: str) -> None:
    """Nothing is computed while a partition has no stored watermark or one short of the
    window's end; the pass names the partition, and the gauge's age grows."""
    topic = Topic()
    rows = [("a", "North", T0, 2, 6.0, 4.0), ("b", "South", T0, 1, 1.0, 1.0)]
    _commit(sink, rows, {0: (None, 5, T0 + WINDOW_MS)})
    r = _regional(sink)
    stats = r.run(2, topic.deliver, 1_048_588)
    assert stats.computer and stats.windows == 0 and stats.horizon_ms is None
    assert stats.holding == [1] and stats.waiting_s > 60  # T0 is long past
    _commit(sink, [], {1: (None, 3, T0 + WINDOW_MS - 1)})
    stats = r.run(2, topic.deliver, 1_048_588)
    assert stats.windows == 0 and stats.holding == [1] and not topic.messages
    _commit(sink, [], {1: (3, 3, T0 + WINDOW_MS)})  # a watermark-only position
    stats = r.run(2, topic.deliver, 1_048_588)
    assert stats.windows == 1 and stats.published == 2 and stats.waiting_s == 0.0
    assert_regional(db_url, topic)


def test_only_the_lock_holder_computes_and_publishes(sink: Sink, db_url: str) -> None:
    topic = Topic()
    _commit(sink, [("a", "North", T0, 1, 1.0, 1.0)], {0: (None, 1, T0 + WINDOW_MS)})
    with psycopg.connect(db_url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s, hashtext('g'))", (0x5E65,))
        stats = _regional(sink).run(1, topic.deliver, 1_048_588)
        assert not stats.computer and not topic.messages
        # another group has a lock of its own
        assert _regional(sink, group="h").run(1, topic.deliver, 1_048_588).computer
    stats = _regional(sink).run(1, topic.deliver, 1_048_588)
    assert stats.computer and stats.published == 1
    assert_regional(db_url, topic)


def test_a_failed_delivery_leaves_the_rows_for_the_next_pass(sink: Sink, db_url: str) -> None:
    """A crash between compute and publish, or a refused delivery, never loses a
    region-window: it stays unpublished and unclaimed, and the next pass sends it."""
    topic = Topic()
    _commit(sink, [("a", "North", T0, 1, 1.0, 1.0), ("b", "South", T0, 1, 2.0, 2.0)],
            {0: (None, 1, T0 + WINDOW_MS)})

    def refuse(messages: list[Message]) -> None:
        raise RuntimeError("Kafka away")

    with pytest.raises(RuntimeError):
        _regional(sink).run(1, refuse, 1_048_588)
    assert_regional(db_url, topic, published=False)
    assert not any(row[6] for row in _table(db_url).values())
    stats = _regional(sink).run(1, topic.deliver, 1_048_588)
    assert stats.published == 2
    assert_regional(db_url, topic)


def test_a_late_reading_during_delivery_is_published_last(sink: Sink, db_url: str) -> None:
    """A window recomputed (late reading) and published by a second computer while the
    first one still delivers the old values: the first one's mark fails, the row is
    published once more, and the newest values are the last message."""
    topic = Topic()
    _commit(sink, [("a", "North", T0, 1, 1.0, 1.0)], {0: (None, 1, T0 + WINDOW_MS)})
    calls: list[int] = []

    def slow(messages: list[Message]) -> None:
        topic.deliver(messages)
        if calls:
            return
        calls.append(1)
        _commit(sink, [("a", "North", T0, 1, 5.0, 5.0), ("b", "North", T0, 2, 2.0, 1.0)],
                {0: (1, 2, T0 + WINDOW_MS)})
        stats = _regional(sink).run(1, topic.deliver, 1_048_588)
        assert stats.windows == 1 and stats.published == 1

    stats = _regional(sink).run(1, slow, 1_048_588)
    # its first mark failed (the row was written since), so it claimed the row again
    assert stats.published == 2
    assert [m["meter_count"] for m in topic.messages] == [1, 2, 2]
    assert_regional(db_url, topic)


def test_several_dirty_marks_of_a_window_compute_it_once(sink: Sink, db_url: str) -> None:
    """Every checkpoint transaction appends its own dirty rows; one compute takes all."""
    topic = Topic()
    _commit(sink, [("a", "North", T0, 1, 1.0, 1.0)], {0: (None, 1, T0 + WINDOW_MS)})
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO regional_dirty (consumer_group, window_start) VALUES"
                     " ('g', 'epoch'::timestamptz + %s * interval '1 ms')", (T0,))
    with psycopg.connect(db_url) as conn:
        n_before = conn.execute("SELECT count(*) FROM regional_dirty").fetchone()
    assert n_before == (2,)
    _regional(sink).run(1, topic.deliver, 1_048_588)
    assert_regional(db_url, topic)


def test_the_roll_up_on_plain_postgresql() -> None:
    """The same storage without TimescaleDB."""
    pg = LocalPostgres(preload=False).start()
    try:
        migrate(pg.url)
        s = Sink(pg.url, consumer_group="g", topic="t", regional=True)
        s.open()
        try:
            topic = Topic()
            _commit(s, [("a", "North", T0, 3, 3.0, 2.0), ("b", "North", T0 + WINDOW_MS, 1,
                                                              7.0, 7.0)],
                    {0: (None, 1, T0 + 2 * WINDOW_MS)})
            assert _regional(s).run(1, topic.deliver, 1_048_588).published == 2
            assert_regional(pg.url, topic)
        finally:
            s.close()
    finally:
        pg.close()
