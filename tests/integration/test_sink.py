"""The checkpoint transaction against the real PostgreSQL server.

The merge arithmetic exists twice, in Python (:func:`segs.windows.partials.merge`) and in SQL
(:data:`segs.checkpoint.sink.MERGE_SET`); these tests prove the two agree whichever way a row is
sent (merged into a stored row, upserted when that row is gone, or inserted as fresh and merged
when it was not new after all), that positions are
fenced,
that publishing closed windows marks exactly the rows delivered and unchanged since, chunk
by chunk, and that transactions written side by side
commit or fail each on their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.checkpoint import sink as sink_module
from segs.checkpoint.migrate import migrate
from segs.checkpoint.payload import Payload
from segs.checkpoint.pgcopy import TextFields
from segs.checkpoint.sink import ClosedRow, CommitJob, CommitStats, Position, Sink
from segs.detection.detector import BaselineState
from segs.errors import DatabaseError, FencedError
from segs.intake.readings import Interner
from segs.windows.partials import PartialRow, Partials, merge, region_ranks

pytestmark = pytest.mark.integration

_ids = itertools.count()


@pytest.fixture
def migrated(db_url: str) -> str:
    migrate(db_url)
    return db_url


@pytest.fixture
def sink(db_url: str) -> Iterator[Sink]:
    migrate(db_url)
    s = Sink(db_url, consumer_group="g", topic="t")
    s.open()
    yield s
    s.close()


# the decoder's value domain: 0, or 1e-12 … 1e12
finite = st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=1e12))
regions = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
                  min_size=1, max_size=8)


@st.composite
def partial(draw: st.DrawFn) -> PartialRow:
    lo, hi = sorted((draw(finite), draw(finite)))
    count = draw(st.integers(1, 1000))
    return PartialRow(count, draw(finite), hi, lo, draw(finite),
                      draw(st.integers(946_684_800_000, 4_000_000_000_000)),
                      draw(regions), draw(st.integers(0, 5)))


def _row(meter: str, start: int, p: PartialRow) -> tuple[object, ...]:
    return (meter, p.region, start, p.count, p.power_sum, p.power_max, p.power_min,
            p.energy_sum, p.last_ts_ms, p.partition)


def _read(url: str, table: str, meter: str, start_ms: int) -> PartialRow:
    with psycopg.connect(url) as conn:
        r = conn.execute(
            f"SELECT sample_count, power_sum, max_power, min_power, total_energy, "
            f"(extract(epoch FROM last_reading_at) * 1000)::int8, region, source_partition, "
            f"avg_power FROM {table} WHERE meter_id = %s AND window_start = "
            f"'epoch'::timestamptz + %s * interval '1 ms'", (meter, start_ms)).fetchone()
    assert r is not None
    assert r[8] == pytest.approx(r[1] / r[0], rel=1e-12)
    return PartialRow(*r[:8])


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=partial(), b=partial(), c=partial(), minutes=st.integers(1, 14),
       fresh=st.lists(st.booleans(), min_size=5, max_size=5))
def test_sql_merge_equals_python_merge(migrated: str, a: PartialRow, b: PartialRow,
                                       c: PartialRow, minutes: int, fresh: list[bool]) -> None:
    """Stored row ⊕ incoming partial, in both tables (the 15-minute partial being the
    worker's roll-up of the 1-minute ones). Each row goes in as a merge or as fresh; a
    fresh row that is stored already (b, and merge(b, c)) makes the sink merge instead."""
    db_url = migrated
    meter = f"m{next(_ids)}"
    # a pool per example, closed before the next draw: its threads use `random`, which
    # hypothesis forbids while it generates data
    sink = Sink(db_url, consumer_group="g", topic="t")
    sink.open()
    first = [(60, _row(meter, 0, a)), (900, _row(meter, 0, a))]
    second = [(60, _row(meter, 0, b)), (60, _row(meter, minutes * 60_000, c)),
              (900, _row(meter, 0, merge(b, c)))]
    try:
        done = [sink.commit(*_routed(rows, fresh[i:])) for rows, i in ((first, 0), (second, 2))]
    finally:
        sink.close()
    assert [d.new_rows for d in done] == [{"aggregates_1m": 1, "aggregates_15m": 1},
                                          {"aggregates_1m": 1, "aggregates_15m": 0}]
    assert [d.rows for d in done] == [{"aggregates_1m": 1, "aggregates_15m": 1},
                                      {"aggregates_1m": 2, "aggregates_15m": 1}]
    assert _read(db_url, "aggregates_1m", meter, 0) == merge(a, b)
    assert _read(db_url, "aggregates_1m", meter, minutes * 60_000) == c
    assert_same(_read(db_url, "aggregates_15m", meter, 0), merge(merge(a, b), c))


def _routed(rows: list[tuple[int, tuple[object, ...]]], fresh: list[bool]
            ) -> tuple[dict[int, list[tuple[object, ...]]], list[object], dict[int, Any],
                       dict[int, list[tuple[object, ...]]]]:
    """Arguments of Sink.commit with row i sent as fresh when fresh[i]."""
    stored: dict[int, list[tuple[object, ...]]] = {}
    new: dict[int, list[tuple[object, ...]]] = {}
    for (size, row), is_fresh in zip(rows, fresh, strict=False):
        (new if is_fresh else stored).setdefault(size, []).append(row)
    return stored, [], {}, new


def assert_same(got: PartialRow, want: PartialRow) -> None:
    """Equal, but sums only to 1e-12 relative: the roll-up may add in another order."""
    assert got._replace(power_sum=0.0, energy_sum=0.0) == want._replace(power_sum=0.0,
                                                                         energy_sum=0.0)
    assert got.power_sum == pytest.approx(want.power_sum, rel=1e-12)
    assert got.energy_sum == pytest.approx(want.energy_sum, rel=1e-12)


_DAY = 86_400_000


def test_stored_rows_are_merged_in_every_chunk_and_missing_ones_inserted(
        db_url: str, sink: Sink) -> None:
    """Partials of windows a worker wrote before are merged by updating each chunk (on
    TimescaleDB: one a day) that holds them; when one of their rows is gone, it comes back
    as the partial, inserted."""
    def rows(meters: range, days: tuple[int, ...], power: float) -> list[tuple[object, ...]]:
        return [(f"c{m}", "r", d * _DAY, 2, power, power, power, 1.0, d * _DAY + 1, 0)
                for d in days for m in meters]

    first = sink.commit({60: rows(range(3), (0, 1, 2), 1.0)}, [], {})
    assert first.new_rows == {"aggregates_1m": 9, "aggregates_15m": 0}
    merged = sink.commit({60: rows(range(3), (0, 2), 2.0)}, [], {})  # two chunks, all found
    assert (merged.rows, merged.new_rows) == ({"aggregates_1m": 6, "aggregates_15m": 0},
                                              {"aggregates_1m": 0, "aggregates_15m": 0})
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM aggregates_1m WHERE meter_id = 'c1' AND window_start = "
                     "'epoch'::timestamptz + %s * interval '1 ms'", (_DAY,))
    again = sink.commit({60: rows(range(3), (1,), 4.0)}, [], {})  # one of three is gone
    assert (again.rows, again.new_rows) == ({"aggregates_1m": 3, "aggregates_15m": 0},
                                            {"aggregates_1m": 1, "aggregates_15m": 0})
    with psycopg.connect(db_url) as conn:
        got = conn.execute(
            "SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8 / %s, "
            "sample_count, power_sum, max_power, avg_power_kw, \"count\" FROM aggregates_1m "
            "WHERE meter_id LIKE 'c%%' ORDER BY 1, 2", (_DAY,)).fetchall()
    want = {(0, 0): (4, 3.0, 2.0), (0, 2): (4, 3.0, 2.0), (0, 1): (4, 5.0, 4.0),
            (1, 0): (4, 3.0, 2.0), (1, 2): (4, 3.0, 2.0), (1, 1): (2, 4.0, 4.0),
            (2, 0): (4, 3.0, 2.0), (2, 2): (4, 3.0, 2.0), (2, 1): (4, 5.0, 4.0)}
    assert got == [(f"c{m}", d, n, ps, mx, ps / n, n)
                   for (m, d), (n, ps, mx) in sorted(want.items())]


def test_stored_rows_are_updated_through_the_primary_key_of_a_chunk_without_statistics(
        db_url: str, sink: Sink) -> None:
    """The plan of the update the checkpoint runs, on a chunk no ANALYZE has seen (each new
    day's, for its first minutes): one primary-key probe per partial, never a scan of a
    window's rows per partial (which a bound on window_start would invite)."""
    rows = [(f"p{m}", "r", 60_000, 1, 1.0, 1.0, 1.0, 1.0, 60_001, 0) for m in range(2_000)]
    sink.commit({60: rows}, [], {})
    with psycopg.connect(db_url) as conn:
        if sink._hypertables:
            [(target, *_)] = conn.execute(
                sink_module._CHUNKS, ("aggregates_1m", 60_000, 60_000)).fetchall()
        else:
            target = "aggregates_1m"
        conn.execute(b"SET enable_hashjoin = off")
        conn.execute(b"SET enable_mergejoin = off")
        sink_module._create_temp_tables(conn)
        conn.execute(b"INSERT INTO segs_partials_1m SELECT 'p' || i, 'r', 60000, 1, 1, 1, 1, "
                     b"1, 60001, 0, 0, 0 FROM generate_series(0, 999) i")
        flags = sink_module.published_flags({})
        update, _ = flags.statement(sink._sql.update[60], 60, target=target, within="")
        missing, _ = flags.statement(sink._sql.insert_missing[60], 60, target=target,
                                     within="")
        plans = ["\n".join(r[0] for r in conn.execute(b"EXPLAIN " + statement))
                 for statement in (update, missing)]
    for plan in plans:  # the update, and the insert of partials it found no row for
        assert "Nested Loop" in plan and "_pkey" in plan, plan
        assert "aggregates_1m_window_start" not in plan and "Seq Scan on _hyper" not in plan, plan


def test_a_claims_marks_and_checks_probe_the_primary_key_of_a_chunk_without_statistics(
        db_url: str, sink: Sink) -> None:
    """After delivery, a claim finds the rows it read by their keys: the catch-up's marks
    and the cursor's check probe the primary key once per row, never read and sort a chunk
    (which the planner prefers on a chunk no ANALYZE has seen, for a list of 10,000 keys)."""
    rows = [(f"q{m:05d}", "r", 60_000, 1, 1.0, 1.0, 1.0, 1.0, 60_001, 0) for m in range(20_000)]
    sink.commit({60: rows}, [], {})
    keys = ([f"q{m:05d}" for m in range(10_000)], [60_000] * 10_000, ["1"] * 10_000)
    with psycopg.connect(db_url) as conn:
        plans = []
        for statement in (sink_module._CLAIM_SQL[60][1], sink_module._CURSOR_SQL[60][2]):
            with conn.transaction():
                for setting in sink_module._BY_KEY:
                    conn.execute(setting)
                plans.append("\n".join(r[0] for r in conn.execute(
                    psycopg.sql.SQL("EXPLAIN ") + statement, keys)))
    for plan in plans:
        assert "Nested Loop" in plan and "_pkey" in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan


def test_positions_are_compare_and_set(db_url: str, sink: Sink) -> None:
    sink.commit({}, [], {0: (None, 10, None)})
    other = Sink(db_url, consumer_group="g", topic="t")
    other.open()
    try:
        other.commit({}, [], {0: (10, 20, None)})  # the new owner moves on
        row = ("fenced", "r", 0, 1, 1.0, 1.0, 1.0, 0.0, 946_684_800_000, 0)
        with pytest.raises(FencedError):
            sink.commit({60: [row]}, [], {0: (10, 15, None)})  # the old owner is fenced off
        other.commit({}, [], {1: (None, 3, None)})  # first write of a new partition
        with pytest.raises(FencedError):
            sink.commit({}, [], {1: (None, 5, None)})
    finally:
        other.close()
    assert sink.load_positions([0, 1]) == {0: Position(20, None), 1: Position(3, None)}
    with psycopg.connect(db_url) as conn:
        n = conn.execute("SELECT count(*) FROM aggregates_1m WHERE meter_id = 'fenced'")
        assert n.fetchone() == (0,)  # rolled back with the failed compare


def test_claim_closed_publishes_once_and_only_after_delivery(sink: Sink) -> None:
    rows = [(f"m{i}", "r", i * 60_000, 1, 2.0, 2.0, 2.0, 0.5, i * 60_000, 0)
            for i in range(3)]
    sink.commit({60: rows}, [], {})

    def fail(size: int, got: list[object]) -> None:
        raise RuntimeError("kafka down")

    with pytest.raises(RuntimeError):
        sink.claim_closed({0: 120_000}, fail)
    seen: list[tuple[int, list[object]]] = []
    done = sink.claim_closed({0: 120_000}, lambda size, got: seen.append((size, got)))
    assert done == {60: 2, 900: 0}  # the 15-minute window is still open
    assert sorted(r[0] for r in seen[0][1]) == ["m0", "m1"]
    assert sink.claim_closed({0: 120_000}, lambda s, g: seen.append((s, g))) == {60: 0, 900: 0}
    sink.commit({60: [rows[0]]}, [], {})  # a late reading re-opens a closed window
    assert sink.claim_closed({0: 120_000}, lambda s, g: None) == {60: 1, 900: 0}


def test_claim_closed_leaves_a_row_merged_during_delivery_for_the_next_claim(
        db_url: str, sink: Sink) -> None:
    rows = [(f"m{i}", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 1_000, 0) for i in range(3)]
    sink.commit({60: rows}, [], {})
    other = Sink(db_url, consumer_group="g", topic="t")
    other.open()
    seen: list[list[Any]] = []

    def deliver(size: int, got: list[Any]) -> None:
        seen.append(got)
        if len(seen) == 1:  # a late reading of m1 is merged by another worker meanwhile
            other.commit({60: [("m1", "r", 0, 1, 9.0, 9.0, 9.0, 0.5, 2_000, 0)]}, [], {})

    try:
        assert sink.claim_closed({0: 60_000}, deliver) == {60: 3, 900: 0}
        assert sink.claim_closed({0: 60_000}, deliver) == {60: 1, 900: 0}
    finally:
        other.close()
    assert [r[0] for r in seen[1]] == ["m1"] and seen[1][0][7] == 2  # its new values
    assert sink.claim_closed({0: 60_000}, deliver) == {60: 0, 900: 0}


def test_claim_closed_publishes_again_a_row_another_claim_marked_while_it_delivered(
        db_url: str, sink: Sink) -> None:
    sink.commit({60: [("m", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 1_000, 0)]}, [], {})
    other = Sink(db_url, consumer_group="g", topic="t")
    other.open()
    topic: list[int] = []  # sample counts in the order they reach the topic

    def slow(size: int, got: list[Any]) -> None:
        # a newer version is merged, claimed and marked by another worker (a rebalance)
        # before this delivery of the older one lands
        other.commit({60: [("m", "r", 0, 1, 3.0, 3.0, 3.0, 0.5, 2_000, 0)]}, [], {})
        assert other.claim_closed({0: 60_000}, lambda s, g: topic.extend(r[7] for r in g))
        topic.extend(r[7] for r in got)

    try:
        sink.claim_closed({0: 60_000}, slow)
    finally:
        other.close()
    assert topic == [2, 1]  # the older value landed last: the row must be published again
    assert sink.claim_closed({0: 60_000}, lambda s, g: topic.extend(r[7] for r in g)) == {
        60: 1, 900: 0}
    assert topic[-1] == 2


def test_claim_closed_keeps_each_delivered_chunk_and_stops_between_chunks(
        sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("segs.checkpoint.sink._CLAIM_CHUNK", 2)
    sink.commit({60: [(f"m{i}", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 1_000, 0)
                      for i in range(5)]}, [], {})
    calls: list[int] = []

    def second_fails(size: int, got: list[Any]) -> None:
        calls.append(len(got))
        if len(calls) == 2:
            raise RuntimeError("kafka down")

    with pytest.raises(RuntimeError):
        sink.claim_closed({0: 60_000}, second_fails)
    assert sink.claim_closed({0: 60_000}, lambda s, g: calls.append(len(g)),
                             stop=lambda: len(calls) >= 3) == {60: 2, 900: 0}
    assert sink.claim_closed({0: 60_000}, lambda s, g: calls.append(len(g))) == {
        60: 1, 900: 0}
    assert calls == [2, 2, 2, 1]  # the first chunk stayed marked after the failure


def test_a_claim_finds_its_delivered_rows_by_key_on_either_path(
        db_url: str, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim itself turns hash and merge joins off (sink._BY_KEY) in the transactions
    that find its delivered rows by key: the cursor's check and the catch-up's marks."""
    owned = [(f"k{i}", "r", 0, 1, 1.0, 1.0, 1.0, 0.5, 1, 0) for i in range(3)]
    others = [(f"o{i}", "r", 0, 1, 1.0, 1.0, 1.0, 0.5, 1, 1) for i in range(3)]
    sink.commit({60: owned}, [], {0: (None, 1, 120_000)})  # through partition 0's cursor
    sink.commit({60: others}, [], {})  # no position: the catch-up's
    sent: list[str] = []
    execute = psycopg.Connection.execute

    def recorded(self: psycopg.Connection[Any], query: Any, *args: Any, **kw: Any) -> Any:
        text = query if isinstance(query, (str, bytes)) else query.as_string(self)
        sent.append(" ".join((text.decode() if isinstance(text, bytes) else text).split()))
        return execute(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.Connection, "execute", recorded)
    sink.claim_closed({0: 120_000, 1: 120_000}, lambda size, got: None)
    by_key = {" ".join(setting.decode().split()) for setting in sink_module._BY_KEY}
    finds = [i for i, q in enumerate(sent)
             if q.startswith(("UPDATE \"aggregates_1m\" AS a SET published = false",
                              "WITH marked AS ( UPDATE \"aggregates_1m\""))]
    assert len(finds) == 2, sent  # one check, one mark
    for i in finds:
        since_read = []
        for q in reversed(sent[:i]):
            if q.startswith(("SELECT", "WITH")):
                break
            since_read.append(q)
        assert by_key <= set(since_read), sent[:i + 1]


def _versions(url: str) -> dict[tuple[str, int], tuple[str, bool]]:
    """(meter, window start ms) → (xmin, published) of every aggregates_1m row."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {(m, int(t)): (v, p) for m, t, v, p in conn.execute(
            "SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, xmin::text, "
            "published FROM aggregates_1m").fetchall()}


def _cursor(url: str, partition: int = 0) -> tuple[int | None, str | None]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT published_1m_ms, published_1m_meter FROM stream_positions "
                           "WHERE kafka_partition = %s", (partition,)).fetchone()
    assert row is not None
    return row[0], row[1]


def test_the_owners_rows_are_published_through_the_cursor_without_a_second_write(
        db_url: str, sink: Sink) -> None:
    rows = [(f"m{i}", "r", w * 60_000, 1, 2.0, 2.0, 2.0, 0.5, w * 60_000 + 1, 0)
            for i in range(3) for w in range(3)]
    sink.commit({60: rows}, [], {0: (None, 10, 120_000)})
    written = _versions(db_url)
    assert all(published for _, published in written.values())  # all after the cursor
    seen: list[ClosedRow] = []
    assert sink.claim_closed({0: 120_000}, lambda s, g: seen.extend(g)) == {60: 6, 900: 0}
    assert sorted((r.meter_id, r.window_start_ms) for r in seen) == sorted(
        (f"m{i}", w * 60_000) for i in range(3) for w in range(2))
    assert _versions(db_url) == written  # delivered, and not written again
    assert _cursor(db_url) == (180_000, "")  # past the watermark, before the next window
    assert sink.claim_closed({0: 120_000}, lambda s, g: seen.extend(g)) == {60: 0, 900: 0}
    # a late reading for a published window: behind the cursor, so caught up, once
    sink.commit({60: [("m1", "r", 0, 1, 9.0, 9.0, 9.0, 0.5, 2, 0)]}, [], {0: (10, 11, 120_000)})
    assert _versions(db_url)[("m1", 0)][1] is False
    seen.clear()
    assert sink.claim_closed({0: 180_000}, lambda s, g: seen.extend(g)) == {60: 4, 900: 0}
    assert sorted((r.meter_id, r.window_start_ms, r.sample_count) for r in seen) == [
        ("m0", 120_000, 1), ("m1", 0, 2), ("m1", 120_000, 1), ("m2", 120_000, 1)]
    assert all(published for _, published in _versions(db_url).values())
    assert sink.claim_closed({0: 180_000}, lambda s, g: seen.extend(g)) == {60: 0, 900: 0}


def test_the_cursor_moves_in_chunks_and_stays_when_its_partition_is_written_meanwhile(
        db_url: str, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """Meter ids with a quote: the cursor's meter id is written into the commit's SQL."""
    monkeypatch.setattr("segs.checkpoint.sink._CLAIM_CHUNK", 2)
    rows = [(f"o'm{i}", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 1, 0) for i in range(5)]
    sink.commit({60: rows}, [], {0: (None, 10, 60_000)})
    calls: list[list[tuple[str, int]]] = []

    def deliver(size: int, got: list[ClosedRow]) -> None:
        calls.append([(r.meter_id, r.sample_count) for r in got])
        if calls == [[("o'm0", 1), ("o'm1", 1)], [("o'm2", 1), ("o'm3", 1)]]:
            # the owner merges a reading of m3 (in this chunk) meanwhile
            sink.commit({60: [("o'm3", "r", 0, 1, 9.0, 9.0, 9.0, 0.5, 2, 0)]}, [],
                        {0: (10, 11, 60_000)})

    assert sink.claim_closed({0: 60_000}, deliver) == {60: 5, 900: 0}
    # the cursor stayed after the first chunk; m3 changed after the read is caught up
    assert calls == [[("o'm0", 1), ("o'm1", 1)], [("o'm2", 1), ("o'm3", 1)], [("o'm3", 2)]]
    assert _cursor(db_url) == (60_000, "o'm1")
    calls.clear()  # the next claim delivers again what came after the cursor
    assert sink.claim_closed({0: 60_000}, deliver) == {60: 3, 900: 0}
    assert calls == [[("o'm2", 1), ("o'm3", 2)], [("o'm4", 1)]]
    assert _cursor(db_url) == (120_000, "")


def test_a_stale_delivery_through_the_cursor_is_published_again(
        db_url: str, sink: Sink) -> None:
    """A fenced worker's delivery of an older version lands after the new owner's newer
    one: the row is caught up, so the newest value is the last one on the topic."""
    sink.commit({60: [("m", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 1_000, 0)]}, [],
                {0: (None, 10, 60_000)})
    other = Sink(db_url, consumer_group="g", topic="t")
    other.open()
    topic: list[int] = []  # sample counts in the order they reach the topic

    def slow(size: int, got: list[Any]) -> None:
        if not topic:  # the new owner merges, claims and delivers first
            other.commit({60: [("m", "r", 0, 1, 3.0, 3.0, 3.0, 0.5, 2_000, 0)]}, [],
                         {0: (10, 20, 60_000)})
            assert other.claim_closed({0: 60_000},
                                      lambda s, g: topic.extend(r[7] for r in g))
        topic.extend(r[7] for r in got)

    try:
        sink.claim_closed({0: 60_000}, slow)  # the older value lands last, then the newer
    finally:
        other.close()
    assert topic == [2, 1, 2]
    assert sink.claim_closed({0: 60_000}, lambda s, g: topic.extend(r[7] for r in g)) == {
        60: 0, 900: 0}


def test_a_row_moved_to_another_partition_is_caught_up(db_url: str, sink: Sink) -> None:
    """A meter whose readings come on two partitions: the row follows the newest reading's
    partition, and a write that moves it is caught up by the partition it moved to."""
    sink.commit({60: [("m", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 1_000, 0)]}, [],
                {0: (None, 10, 0)})
    sink.commit({60: [("m", "r", 0, 1, 2.0, 2.0, 2.0, 0.5, 2_000, 1)]}, [],
                {1: (None, 10, 0)})
    assert _versions(db_url)[("m", 0)][1] is False
    seen: list[Any] = []
    assert sink.claim_closed({0: 60_000, 1: 60_000}, lambda s, g: seen.extend(g)) == {
        60: 1, 900: 0}
    assert seen[0].sample_count == 2


def test_commit_all_writes_each_partition_group_on_its_own(db_url: str, sink: Sink) -> None:
    def rows(meter: str, partition: int) -> list[tuple[object, ...]]:
        return [(meter, "r", i * 60_000, 1, 2.0, 2.0, 2.0, 0.5, i * 60_000 + 1, partition)
                for i in range(1_000)]

    def job(partials: list[tuple[object, ...]], positions: Any) -> CommitJob:
        return CommitJob({60: partials}, [], positions, {}, [])

    done = sink.commit_all([job(rows("a", 0), {0: (None, 1_000, None)}),
                            job(rows("b", 1), {1: (None, 1_000, None)})])
    assert [type(r) for r in done] == [CommitStats, CommitStats]
    assert [r.rows["aggregates_1m"] for r in done if isinstance(r, CommitStats)] == [1_000] * 2
    # partition 1 moved on elsewhere: its job is fenced, partition 0's still commits
    other = Sink(db_url, consumer_group="g", topic="t")
    other.open()
    try:
        other.commit({}, [], {1: (1_000, 1_500, None)})
    finally:
        other.close()
    done = sink.commit_all([job(rows("a", 0), {0: (1_000, 2_000, None)}),
                            job(rows("b", 1), {1: (1_000, 2_000, None)})])
    assert isinstance(done[0], CommitStats)
    assert isinstance(done[1], FencedError)
    assert sink.load_positions([0, 1]) == {0: Position(2_000, None), 1: Position(1_500, None)}
    with psycopg.connect(db_url) as conn:
        counts = dict(conn.execute(
            "SELECT meter_id, sum(sample_count) FROM aggregates_1m WHERE meter_id IN ('a', 'b') "
            "GROUP BY meter_id").fetchall())
    assert counts == {"a": 2_000, "b": 1_000}
    # a failure that is not a fence comes back as a DatabaseError, in its place
    bad = [("c", "r", 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 2)]  # sample_count 0: division by zero
    done = sink.commit_all([job(rows("a", 0), {0: (2_000, 3_000, None)}),
                            job(bad, {2: (None, 1, None)})])
    assert isinstance(done[0], CommitStats)
    assert isinstance(done[1], DatabaseError)


def test_chunks_are_made_ahead_so_side_by_side_checkpoints_never_wait_for_each_other(
        db_url: str, sink: Sink) -> None:
    """A transaction that makes a TimescaleDB chunk holds a lock on the hypertable until it
    ends, and every other one writing into that chunk waits for it. commit_all makes the
    chunks of its windows first, each in a short transaction, so that a checkpoint held open
    in a new day's chunk holds no one else up; the placeholder rows are never seen."""
    day = 3 * _DAY
    sink.stored_types()
    if not sink._hypertables:
        pytest.skip("TimescaleDB is not installed: plain tables have no chunks")
    sink.commit_all([CommitJob({}, [], {}, {}, [day + 60_000])])  # no rows: chunks only
    with psycopg.connect(db_url) as conn:
        for table in ("aggregates_1m", "aggregates_15m"):
            assert conn.execute(sink_module._CHUNKS, (table, day, day)).fetchall(), table
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    with psycopg.connect(db_url) as held:  # a checkpoint holding its transaction open
        held.execute("INSERT INTO aggregates_1m (meter_id, region, window_start, window_end, "
                     "avg_power, max_power, min_power, total_energy, sample_count, power_sum, "
                     "last_reading_at, source_partition) VALUES ('h', 'r', "
                     "'epoch'::timestamptz + %s * interval '1 ms', now(), 1, 1, 1, 1, 1, 1, "
                     "now(), 0)", (day,))
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("SET lock_timeout = '5s'")  # no wait: the chunk exists
            other.execute("INSERT INTO aggregates_1m (meter_id, region, window_start, "
                          "window_end, avg_power, max_power, min_power, total_energy, "
                          "sample_count, power_sum, last_reading_at, source_partition) VALUES "
                          "('o', 'r', 'epoch'::timestamptz + %s * interval '1 ms', now(), 1, "
                          "1, 1, 1, 1, 1, now(), 0)", (day + 60_000,))
        held.rollback()


def test_an_encoded_payload_lands_as_its_rows(db_url: str, sink: Sink) -> None:
    """The worker's path: numpy columns → binary COPY data (segs.checkpoint.pgcopy) → the tables,
    the 15-minute rows rolled up from the 1-minute partials on the way."""
    meters = TextFields(["enc-ä", "enc-b"])
    region_names = Interner()
    for name in ("south", "nörth"):  # slots out of name order: the rank decides
        region_names.slot(name)
    regions = TextFields(region_names.names)
    partials = Partials(
        size_s=60, meter=np.array([0, 1, 0], np.int32),
        window_start_ms=np.array([60_000, 120_000, 180_000], np.int64),
        count=np.array([3, 1, 2], np.int64), power_sum=np.array([7.5, -0.0, 2.0]),
        power_max=np.array([4.0, 0.0, 1.5]), power_min=np.array([1.5, 0.0, 0.5]),
        energy_sum=np.array([0.25, 1e-12, 0.5]),
        last_ts_ms=np.array([119_999, 120_001, 239_000], np.int64),
        region=np.array([0, 1, 1], np.int32), partition=np.array([4, 4, 4], np.int32))
    baselines = BaselineState(
        meter=np.array([1], np.int32), baseline=np.array([2.5]), samples=np.array([11]),
        last_outage_ms=np.array([-(2**62)]), last_spike_ms=np.array([5]),
        last_drop_ms=np.array([6]), partition=np.array([4], np.int32))
    # meter 0 (rows 0 and 2) fresh at one minute, meter 1 at fifteen: each set rolls up alone
    fresh = {60: np.array([True, False, True]), 900: np.array([False, True, False])}
    payload = Payload(partials, baselines, {4: (None, 9, 120_000)}, fresh)
    done = sink.commit_all([payload.commit_job(meters.fields(), regions.fields(),
                                        region_ranks(region_names))])
    assert isinstance(done[0], CommitStats)
    assert done[0].rows == {"aggregates_1m": 3, "aggregates_15m": 2}
    with psycopg.connect(db_url) as conn:
        got = {table: conn.execute(
            "SELECT meter_id, region, (extract(epoch FROM window_start) * 1000)::int8, "
            "sample_count, power_sum, max_power, min_power, total_energy, "
            "(extract(epoch FROM last_reading_at) * 1000)::int8, source_partition "
            f"FROM {table} WHERE meter_id LIKE 'enc-%' ORDER BY meter_id, window_start"
        ).fetchall() for table in ("aggregates_1m", "aggregates_15m")}
        base = conn.execute(
            "SELECT meter_id, source_partition, baseline, samples, last_outage_ms, "
            "last_spike_ms, last_drop_ms FROM meter_baselines WHERE meter_id LIKE 'enc-%'"
        ).fetchall()
    assert got["aggregates_1m"] == [
        ("enc-b", "nörth", 120_000, 1, 0.0, 0.0, 0.0, 1e-12, 120_001, 4),
        ("enc-ä", "south", 60_000, 3, 7.5, 4.0, 1.5, 0.25, 119_999, 4),
        ("enc-ä", "nörth", 180_000, 2, 2.0, 1.5, 0.5, 0.5, 239_000, 4)]
    assert got["aggregates_15m"] == [
        ("enc-b", "nörth", 0, 1, 0.0, 0.0, 0.0, 1e-12, 120_001, 4),
        ("enc-ä", "nörth", 0, 5, 9.5, 4.0, 0.5, 0.75, 239_000, 4)]
    assert base == [("enc-b", 4, 2.5, 11, -(2**62), 5, 6)]
    assert sink.load_positions([4]) == {4: Position(9, 120_000)}


def test_identities_are_stored_and_undecided_resends_decided_in_the_transaction(
        sink: Sink, db_url: str) -> None:
    """DEDUPLICATE: a first checkpoint stores its partial with its identities, fresh, cut in
    two; a second one holds undecided readings for that window (two re-sends, one new one
    twice) and for a window with no row: only the new identities are counted."""
    from segs.intake.readings import Readings
    from segs.windows.identities import IdentityLog

    meters, region_names = TextFields(["dd-a", "dd-b"]), Interner()
    region_names.slot("r")
    rank, regions = region_ranks(region_names), TextFields(region_names.names)
    t0 = 1_795_759_200_000
    partials = Partials(
        size_s=60, meter=np.array([0, 1], np.int32), window_start_ms=np.array([t0, t0]),
        count=np.array([2, 1]), power_sum=np.array([3.0, 5.0]), power_max=np.array([2.0, 5.0]),
        power_min=np.array([1.0, 5.0]), energy_sum=np.array([0.5, 0.0]),
        last_ts_ms=np.array([t0 + 2_000, t0 + 7]), region=np.zeros(2, np.int32),
        partition=np.array([0, 1], np.int32))
    ids = IdentityLog(np.array([0, 0, 1], np.int32), np.full(3, t0),
                      np.array([1_000, 2_000, 7], np.uint16), np.array([0, 0, 1], np.int32))
    first = Payload(partials, BaselineState.empty(), {0: (None, 2, None), 1: (None, 1, None)},
                    {60: np.array([True, True]), 900: np.array([True, True])}, ids,
                    Readings.empty(), {0: t0 + 2_000, 1: t0 + 7})
    done = sink.commit_all([p.commit_job(meters.fields(), regions.fields(), rank)
                            for p in first.split(2)])
    assert all(isinstance(d, CommitStats) for d in done) and len(done) == 2

    def readings(ts: list[int], power: list[float]) -> Readings:
        n = len(ts)
        return Readings(np.zeros(n, np.int32), np.zeros(n, np.int32), np.array(ts),
                        np.array(power), np.zeros(n), np.full(n, np.nan), np.zeros(n, np.int32),
                        np.arange(2, 2 + n))

    undecided = readings([t0 + 1_000, t0 + 2_000, t0 + 3_000, t0 + 3_000, t0 + 60_500],
                         [9.0, 9.0, 4.0, 8.0, 6.0])
    second = Payload(Partials.empty(60), BaselineState.empty(), {0: (2, 7, None)},
                     {60: np.zeros(0, bool), 900: np.zeros(0, bool)}, IdentityLog.empty(),
                     undecided, {0: t0 + 60_500})
    (stats,) = sink.commit_all([second.commit_job(meters.fields(), regions.fields(), rank)])
    assert isinstance(stats, CommitStats) and stats.duplicates == 3
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8 - %s, "
            "sample_count, max_power, identities FROM aggregates_1m "
            "WHERE meter_id LIKE 'dd-%%' ORDER BY 1, 2", (t0,)).fetchall()
        fifteen = conn.execute("SELECT sample_count, max_power FROM aggregates_15m "
                               "WHERE meter_id = 'dd-a'").fetchall()
        newest = conn.execute("SELECT kafka_partition, newest_event_ms FROM stream_positions "
                              "WHERE consumer_group = 'g' ORDER BY 1").fetchall()
    got = [(m, w, c, mx, sorted(np.frombuffer(bytes(i), "<u2").tolist())) for m, w, c, mx, i
           in rows]
    assert got == [("dd-a", 0, 3, 4.0, [1_000, 2_000, 3_000]), ("dd-a", 60_000, 1, 6.0, [500]),
                   ("dd-b", 0, 1, 5.0, [7])]
    assert fifteen == [(4, 6.0)]
    assert newest == [(0, t0 + 60_500), (1, t0 + 7)]
