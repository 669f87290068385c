"""Re-sent readings counted once: engine, detector and the checkpoint's decision against a
small in-memory store, through checkpoints, restarts and rebalances, vs the reference over
distinct identities (tests.reference.distinct)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.checkpoint.dedup import decide, identity_column, undecided_windows
from segs.detection.detector import AnomalyDetector, BaselineState
from segs.intake.readings import Interner
from segs.times import NEVER
from segs.windows.engine import WindowEngine
from segs.windows.partials import PartialRow, merge, region_ranks, roll_up
from segs.windows.slab import IdentitySlab
from tests.reference import aggregate, distinct
from tests.unit.windows.test_engine import BASE, to_columns

PARTITIONS = 2


@dataclass
class Store:
    """What the database holds: rows with identities, positions, baselines."""

    rows: dict[int, dict[tuple[str, int], PartialRow]] = field(
        default_factory=lambda: {60: {}, 900: {}})
    ids: dict[tuple[str, int], bytes] = field(default_factory=dict)
    next_offset: dict[int, int] = field(default_factory=dict)
    newest: dict[int, int] = field(default_factory=dict)
    baselines: dict[int, BaselineState] = field(default_factory=dict)  # by meter slot


class Worker:
    """The worker's use of engine and detector (segs.runtime.worker), one life."""

    def __init__(self, store: Store, meters: Interner, regions: Interner) -> None:
        self.store, self.meters, self.regions = store, meters, regions
        self.eng = WindowEngine(60, regions=regions, deduplicate=True)
        self.det = AnomalyDetector()
        self.consumed = dict(store.next_offset)
        self.folded: list[tuple[str, int]] = []  # identities the detector saw since the cut
        for p in range(PARTITIONS):
            self.position(p)

    def position(self, p: int) -> None:
        self.eng.set_threshold(p, self.store.newest.get(p, NEVER))
        for state in self.store.baselines.values():
            if int(state.partition[0]) == p:
                self.det.load(state)
        self.consumed[p] = self.store.next_offset.get(p, 0)

    def process(self, batch: list[dict[str, Any]], now: int) -> None:
        r = to_columns(batch, self.meters, self.regions)
        added = self.eng.add_distinct(r, now)
        chosen = added.counted.copy()
        und = np.flatnonzero(added.undecided)
        chosen[und[self.det.unseen(r.take(und))]] = True
        seen = r.take(chosen)
        self.det.check(seen)
        self.folded += [(self.meters.names[m], t) for m, t in zip(seen.meter.tolist(),
                                                                  seen.ts_ms.tolist(),
                                                                  strict=True)]
        for x in batch:
            self.consumed[x["partition"]] = x["offset"] + 1

    def checkpoint(self, folded_ever: set[tuple[str, int]]) -> None:
        """Drain and write as the sink does: decide the undecided, merge rows and identities."""
        eng, store = self.eng, self.store
        rank = region_ranks(self.regions)
        partials, ids, und = eng.drain(), eng.take_identities(), eng.take_undecided()
        if len(und):
            slots, starts = undecided_windows(und, 60_000)
            stored = [store.ids.get((self.meters.names[m], s))
                      for m, s in zip(slots.tolist(), starts.tolist(), strict=True)]
            d = decide(partials, ids, {}, und, stored, rank)
            partials, ids = d.partials, d.identities
        data, bounds = identity_column(partials, ids)
        for size, rows in ((60, partials), (900, roll_up(partials, 900, rank))):
            for i in range(len(rows)):
                key = (self.meters.names[int(rows.meter[i])], int(rows.window_start_ms[i]))
                row = rows.row(i, self.regions)
                old = store.rows[size].get(key)
                store.rows[size][key] = row if old is None else merge(old, row)
                if size == 60:
                    store.ids[key] = store.ids.get(key, b"") + data[bounds[i]:bounds[i + 1]]
        for p in range(PARTITIONS):
            store.next_offset[p] = self.consumed.get(p, 0)
            store.newest[p] = max(store.newest.get(p, NEVER), eng.newest(p))
        dirty = self.det.take_dirty()
        for i in range(len(dirty)):
            store.baselines[int(dirty.meter[i])] = dirty.take(np.array([i]))
        assert len(set(self.folded)) == len(self.folded), "the detector saw a reading twice"
        assert not folded_ever & set(self.folded), "the detector saw a stored reading again"
        folded_ever |= set(self.folded)
        self.folded = []

    def rebalance(self, p: int, folded_ever: set[tuple[str, int]]) -> None:
        """Revoked after a checkpoint, assigned again."""
        self.checkpoint(folded_ever)
        self.eng.drop_partitions([p])
        self.det.forget_partitions([p])
        self.position(p)


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Readings of a few meters over ten minutes, with repeats of some identities (other
    values, so "first" is checked), in any order; meter m on partition m % 2."""
    out = []
    for _ in range(draw(st.integers(1, 40))):
        m = draw(st.integers(0, 3))
        ts = BASE + draw(st.integers(0, 9)) * 60_000 + draw(st.sampled_from(
            [0, 1, 999, 30_000, 59_999]))
        for _ in range(draw(st.integers(1, 3))):
            out.append({"meter_id": f"M{m}", "region": draw(st.sampled_from(["a", "b"])),
                        "ts_ms": ts, "power": float(draw(st.integers(0, 50))),
                        "energy": float(draw(st.integers(0, 5))), "voltage": 230.0,
                        "partition": m % PARTITIONS})
    order = draw(st.permutations(range(len(out))))
    stream = [out[i] for i in order]
    offsets = dict.fromkeys(range(PARTITIONS), 0)
    for x in stream:
        x["offset"] = offsets[x["partition"]]
        offsets[x["partition"]] += 1
    return stream


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), data=st.data())
def test_each_identity_counted_once_through_checkpoints_restarts_and_rebalances(
        stream: list[dict[str, Any]], data: st.DataObject) -> None:
    # compacting the identity slab as often as its rules allow, or at its real threshold
    with mock.patch.object(IdentitySlab, "compact_min", data.draw(st.sampled_from([0, 1 << 16]))):
        run_stream(stream, data)


def run_stream(stream: list[dict[str, Any]], data: st.DataObject) -> None:
    meters, regions, store = Interner(), Interner(), Store()
    folded_ever: set[tuple[str, int]] = set()
    worker = Worker(store, meters, regions)
    now = BASE
    steps = 0
    while True:
        todo = [x for x in stream if x["offset"] >= worker.consumed.get(x["partition"], 0)]
        if not todo or steps > 40:
            break
        steps += 1
        n = data.draw(st.integers(1, len(todo)))
        now += data.draw(st.integers(0, 90_000))
        worker.process(todo[:n], now)
        action = data.draw(st.sampled_from(["go on", "checkpoint", "restart", "rebalance"]))
        if action == "checkpoint":
            worker.checkpoint(folded_ever)
        elif action == "restart":  # a crash: what is not stored is read again
            worker = Worker(store, meters, regions)
        elif action == "rebalance":
            worker.rebalance(data.draw(st.integers(0, PARTITIONS - 1)), folded_ever)
    worker.checkpoint(folded_ever)
    todo = [x for x in stream if x["offset"] >= store.next_offset.get(x["partition"], 0)]
    worker = Worker(store, meters, regions)
    worker.process(todo, now) if todo else None
    worker.checkpoint(folded_ever)

    want = distinct(stream)
    for size in (60, 900):
        ref = aggregate(want, size)
        got = store.rows[size]
        assert got.keys() == ref.keys()
        for key, r in ref.items():
            g = got[key]
            assert (g.count, g.power_sum, g.power_max, g.power_min, g.energy_sum, g.region) == (
                r.count, r.power_sum, r.max, r.min, r.energy_sum, r.region), key
    for (meter, start), raw in store.ids.items():
        offs = sorted(np.frombuffer(raw, "<u2").tolist())
        assert offs == sorted(x["ts_ms"] - start for x in want
                              if x["meter_id"] == meter and x["ts_ms"] // 60_000 * 60_000 == start)
    assert folded_ever <= {(x["meter_id"], x["ts_ms"]) for x in want}


def test_in_memory_duplicates_are_counted_and_never_folded_twice() -> None:
    meters, regions = Interner(), Interner()
    eng = WindowEngine(60, regions=regions, deduplicate=True)
    rs = [{"meter_id": "M0", "region": "a", "ts_ms": BASE + i * 1000 % 3000, "power": 1.0,
           "energy": 0.0, "voltage": 230.0, "partition": 0} for i in range(6)]
    added = eng.add_distinct(to_columns(rs, meters, regions), BASE)
    assert added.counted.tolist() == [True, True, True, False, False, False]
    assert added.duplicates == 3 and not added.undecided.any()
    assert eng.drain().count.tolist() == [3]
    again = eng.add_distinct(to_columns(rs[:1], meters, regions), BASE)  # a later batch
    assert again.duplicates == 1 and eng.pending_readings() == 0
