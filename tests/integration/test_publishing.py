"""Publishing closed windows, through the cursor and the catch-up, against the real server.

The reference is the table itself: whatever the interleaving of writes — by a partition's
owner, by a worker fenced off from it, by the owner of another partition a meter's readings
also came on, late for a window published already — and of claims, with any of those writes
or another worker's whole claim landing in the middle of a delivery, once every window is
closed and claims have run undisturbed, every closed row is on the topic and the last message
of its key carries the row's stored values (the contract's "latest value wins").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from segs.checkpoint.migrate import migrate
from segs.checkpoint.sink import ClosedRow, Sink
from segs.errors import FencedError

pytestmark = pytest.mark.integration

PARTITIONS = (0, 1)
WINDOWS = (0, 60_000, 120_000)
_runs = itertools.count()

# ("write", worker, partition, meter, window start, with the partition's position)
writes = st.tuples(st.just("write"), st.sampled_from("ab"), st.sampled_from(PARTITIONS),
                   st.sampled_from("xyz"), st.sampled_from(WINDOWS), st.booleans())
# ("claim", worker, what lands in the middle of its first delivery: writes, and the other
# worker's whole claim)
claims = st.tuples(st.just("claim"), st.sampled_from("ab"),
                   st.lists(st.one_of(writes, st.just(("claim",))), max_size=2))
ticks = st.tuples(st.just("tick"))  # the watermark moves on by a minute


@pytest.fixture
def migrated(db_url: str) -> str:
    migrate(db_url)
    return db_url


class World:
    """Two workers on one database, their belief of each partition's stored offset, and the
    topic as the sequence of messages in the order they landed."""

    def __init__(self, url: str) -> None:
        run = next(_runs)
        self.url, self.prefix = url, f"run{run}-"
        self.sinks = {w: Sink(url, consumer_group="g", topic=f"t{run}") for w in "ab"}
        for s in self.sinks.values():
            s.open()
        self.offsets: dict[str, dict[int, int | None]] = {w: dict.fromkeys(PARTITIONS)
                                                          for w in "ab"}
        self.watermark = 0
        self.seq = 0
        self.topic: list[tuple[tuple[str, int], tuple[int, float]]] = []

    def close(self) -> None:
        for s in self.sinks.values():
            s.close()

    def write(self, worker: str, partition: int, meter: str, start: int, owned: bool) -> None:
        self.seq += 1
        value = float(self.seq)
        row = (self.prefix + meter, "r", start, 1, value, value, value, 0.5,
               start + self.seq, partition)  # each write is the newest reading
        sink, offsets = self.sinks[worker], self.offsets[worker]
        positions: dict[int, Any] = {}
        if owned:
            prev = offsets[partition]
            positions = {partition: (prev, (prev or 0) + 1, self.watermark)}
        try:
            sink.commit({60: [row]}, [], positions)
        except FencedError:  # the other worker owns it: take it over for the next write
            stored = sink.load_positions([partition]).get(partition)
            offsets[partition] = None if stored is None else stored.next_offset
            return
        if owned:
            offsets[partition] = (offsets[partition] or 0) + 1

    def claim(self, worker: str, meanwhile: Sequence[tuple[Any, ...]] = ()) -> dict[int, int]:
        pending = list(meanwhile)
        other = "b" if worker == "a" else "a"

        def deliver(size: int, rows: list[ClosedRow]) -> None:
            while pending:
                op = pending.pop(0)
                if op[0] == "write":
                    self.write(*op[1:])
                else:
                    self.claim(other)
            self.topic.extend(((r.meter_id, r.window_start_ms), (r.sample_count, r.max_power))
                              for r in rows)

        return self.sinks[worker].claim_closed(dict.fromkeys(PARTITIONS, self.watermark),
                                               deliver)

    def table(self) -> dict[tuple[str, int], tuple[int, float]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT meter_id, (extract(epoch FROM window_start) * 1000)::int8, "
                "sample_count, max_power FROM aggregates_1m WHERE meter_id LIKE %s",
                (self.prefix + "%",)).fetchall()
        return {(m, int(t)): (int(n), float(v)) for m, t, n, v in rows}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(writes, claims, ticks), max_size=24))
# found by CI: a row read through partition 0's cursor moves to partition 1 during the
# delivery and is caught up there before the older message lands
@example(ops=[("write", "a", 0, "x", 0, False), ("tick",), ("write", "a", 0, "x", 0, True),
              ("claim", "a", [("write", "a", 1, "x", 0, False), ("claim",)])])
def test_the_last_message_of_every_closed_window_is_its_stored_row(
        migrated: str, ops: list[tuple[Any, ...]]) -> None:
    world = World(migrated)
    try:
        for op in ops:
            if op[0] == "write":
                world.write(*op[1:])
            elif op[0] == "claim":
                world.claim(op[1], op[2])
            else:
                world.watermark += 60_000
        world.watermark = 10 * 60_000  # every window closed
        for _ in range(4):  # undisturbed: what the cursor could not record is sent again
            if world.claim("a") == {60: 0, 900: 0}:
                break
        else:
            pytest.fail("claims never came to rest")
        stored = world.table()
        last = {k: v for k, v in world.topic if k[0].startswith(world.prefix)}  # not
        # the rows earlier examples left to the catch-up (the tables are shared)
        assert last.keys() == stored.keys(), "closed windows never published"
        assert last == stored, "the topic's last message differs from the row"
    finally:
        world.close()
