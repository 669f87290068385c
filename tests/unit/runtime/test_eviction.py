"""Eviction of idle meters: any readings, batch splits and cuts, with meters evicted at the
cuts and read back when they return, give the reference's aggregates and alerts."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.checkpoint.dedup import decide, undecided_windows
from segs.checkpoint.payload import MeterPartitions, WrittenWindows
from segs.checkpoint.pgcopy import TextFields
from segs.checkpoint.sink import BaselineRow
from segs.detection.detector import KINDS, SEVERITIES, AnomalyDetector, DetectorSettings
from segs.intake.readings import Interner, meter_interner
from segs.runtime.eviction import evict_idle, recall
from segs.windows.engine import WindowEngine
from segs.windows.partials import PartialRow, merge, region_ranks
from tests.reference import detect, distinct
from tests.unit.windows.test_engine import BASE, REGIONS, assert_matches, to_columns

HOUR = 3_600_000


@st.composite
def readings(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A few meters over hours of event time, with powers that trip every rule."""
    n_meters = draw(st.integers(1, 8))
    return [{"meter_id": f"M{draw(st.integers(0, n_meters - 1))}",
             "region": draw(st.sampled_from(REGIONS)),
             "ts_ms": BASE + draw(st.integers(0, 4 * HOUR)),
             "power": draw(st.sampled_from([0.0, 0.05, 1.0, 2.0, 2.5, 5.0, 40.0])),
             "energy": draw(st.sampled_from([0.0, 0.5, 1.25])),
             "voltage": draw(st.sampled_from([float("nan"), 230.0])),
             "partition": draw(st.integers(0, 2))}
            for _ in range(draw(st.integers(1, 80)))]


class Memory:
    """A worker's per-meter state as the worker holds it, and a store for what it writes."""

    def __init__(self, after_ms: int, detector: DetectorSettings, *,
                 deduplicate: bool = False) -> None:
        self.after_ms = after_ms  # 0: never evict
        self.meters, self.regions = meter_interner(), Interner()
        self.fields = TextFields.of(self.meters)
        self.windows = WindowEngine(60, regions=self.regions, deduplicate=deduplicate)
        self.detector = AnomalyDetector(detector)
        self.written, self.homes = WrittenWindows(), MeterPartitions()
        self.rows: dict[tuple[str, int], PartialRow] = {}
        self.baselines: dict[str, BaselineRow] = {}
        self.identities: dict[tuple[str, int], set[int]] = {}
        self.alerts: list[tuple[str, int, str, str]] = []
        self.evicted = self.lookups = 0

    def lookup(self, names: list[str]) -> list[BaselineRow]:
        self.lookups += 1
        return [self.baselines[n] for n in names if n in self.baselines]

    def batch(self, rs: list[dict[str, Any]], now_ms: int) -> None:
        r = to_columns(rs, self.meters, self.regions)
        recall(r, meters=self.meters, detector=self.detector, windows=self.windows,
               lookup=self.lookup, threshold=self.windows.threshold)
        self.homes.note(r.meter, r.partition)
        if self.windows.deduplicate:  # as Worker._add_distinct
            added = self.windows.add_distinct(r, now_ms)
            chosen = added.counted.copy()
            undecided = np.flatnonzero(added.undecided)
            chosen[undecided[self.detector.unseen(r.take(undecided))]] = True
            r = r.take(chosen)
        else:
            self.windows.add(r, now_ms)
        det = self.detector.check(r)
        names = self.meters.names
        self.alerts += [(names[r.meter[i]], int(r.ts_ms[i]), KINDS[k], SEVERITIES[s])
                        for i, k, s in zip(det.index.tolist(), det.kind.tolist(),
                                           det.severity.tolist(), strict=True)]

    def cut(self) -> None:
        """Drain, store as the database would, then evict as the worker does."""
        p, b = self.windows.drain(), self.detector.take_dirty()
        names, fields = self.meters.names, self.fields.fields()
        named = [p.meter, b.meter]
        if self.windows.deduplicate:  # the checkpoint's decision, against this store
            ids, undecided = self.windows.take_identities(), self.windows.take_undecided()
            named += [ids.windows()[0], undecided.meter]
            slots, starts = undecided_windows(undecided, 60_000)
            stored = [np.array(sorted(self.identities.get((names[m], w), ())), "<u2").tobytes()
                      for m, w in zip(slots.tolist(), starts.tolist(), strict=True)]
            if len(undecided):
                decided = decide(p, ids, {}, undecided, stored, region_ranks(self.regions))
                p, ids = decided.partials, decided.identities
            for m, w, o in zip(ids.meter.tolist(), ids.window_start_ms.tolist(),
                               ids.offset.tolist(), strict=True):
                self.identities.setdefault((names[m], w), set()).add(o)
        self.written.fresh(p)
        for i, (m, start) in enumerate(zip(p.meter.tolist(), p.window_start_ms.tolist(),
                                           strict=True)):
            assert fields[m][4:].decode() == names[m]  # the COPY field of a reused slot
            key, row = (names[m], start), p.row(i, self.regions)
            self.rows[key] = merge(self.rows[key], row) if key in self.rows else row
        for j, m in enumerate(b.meter.tolist()):
            self.baselines[names[m]] = BaselineRow(
                names[m], int(b.partition[j]), float(b.baseline[j]), int(b.samples[j]),
                int(b.last_outage_ms[j]), int(b.last_spike_ms[j]), int(b.last_drop_ms[j]),
                int(b.newest_ms[j]))
        if self.after_ms:
            self.evicted += evict_idle(self.after_ms, np.concatenate(named), meters=self.meters,
                                       fields=self.fields, windows=self.windows,
                                       detector=self.detector, written=self.written,
                                       homes=self.homes)


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(rs=readings(), data=st.data(),
       after_ms=st.sampled_from([1, 60_000, 600_000, HOUR]),
       min_samples=st.integers(1, 3), cooldown_ms=st.sampled_from([0, 60_000, 300_000]))
def test_evictions_change_no_aggregate_and_no_alert(
        rs: list[dict[str, Any]], data: st.DataObject, after_ms: int, min_samples: int,
        cooldown_ms: int) -> None:
    order = data.draw(st.permutations(range(len(rs))))
    shuffled = [rs[i] for i in order]
    mem = Memory(after_ms, DetectorSettings(min_samples=min_samples, cooldown_ms=cooldown_ms))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rs)), max_size=8)))
    now = BASE
    for lo, hi in zip([0, *cuts], [*cuts, len(rs)], strict=True):
        now += data.draw(st.integers(0, 20_000))
        if hi > lo:
            mem.batch(shuffled[lo:hi], now)
        mem.cut()
    assert_matches(mem.rows, rs, 60)
    assert mem.alerts == detect(shuffled, min_samples=min_samples, cooldown_ms=cooldown_ms)
    assert mem.meters.held() == int(mem.meters.in_use().sum()) <= len(mem.meters)


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(rs=readings(), data=st.data(), after_ms=st.sampled_from([1, 60_000, 600_000]),
       resent=st.lists(st.integers(0, 79), max_size=20))
def test_with_deduplicate_evictions_change_nothing_either(
        rs: list[dict[str, Any]], data: st.DataObject, after_ms: int, resent: list[int]) -> None:
    """Readings in event-time order, re-sends of any of them anywhere later: the aggregates
    and alerts of the distinct readings. (Out of order, a reading of a window only the
    checkpoint decides is not folded when older than its meter's baseline, and eviction
    makes a returning meter's earlier windows such windows, as a restart does.)"""
    rs = sorted(rs, key=lambda r: r["ts_ms"])
    stream = list(rs)
    at = list(range(len(rs)))  # where each original is now: its re-sends go after it
    for i in resent:
        j = i % len(rs)
        pos = data.draw(st.integers(at[j] + 1, len(stream)))
        stream.insert(pos, rs[j])
        at = [p + (p >= pos) for p in at]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    settings_ = DetectorSettings(min_samples=2, cooldown_ms=60_000)
    runs = [Memory(after, settings_, deduplicate=True) for after in (after_ms, 0)]
    now = BASE
    for lo, hi in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        now += data.draw(st.integers(0, 20_000))
        for mem in runs:
            if hi > lo:
                mem.batch(stream[lo:hi], now)
            mem.cut()
    for mem in runs:
        assert_matches(mem.rows, distinct(stream), 60)
        assert mem.alerts == detect(distinct(stream), min_samples=2, cooldown_ms=60_000)


def test_an_idle_meter_is_evicted_and_its_slot_taken_by_the_next_new_meter() -> None:
    mem = Memory(HOUR, DetectorSettings(min_samples=1))
    reading = {"region": "north", "power": 1.0, "energy": 0.0, "voltage": 230.0,
               "partition": 0}
    mem.batch([{**reading, "meter_id": "old", "ts_ms": BASE}], BASE)
    mem.cut()
    assert mem.evicted == 0  # its baseline is in the cut: not stored yet
    mem.batch([{**reading, "meter_id": "busy", "ts_ms": BASE + 2 * HOUR}], BASE)
    mem.cut()
    assert mem.evicted == 1 and "old" not in mem.meters
    mem.batch([{**reading, "meter_id": "new", "ts_ms": BASE + 2 * HOUR}], BASE)
    assert mem.meters.get("new") == 0  # the released slot
    lookups = mem.lookups
    mem.batch([{**reading, "meter_id": "old", "ts_ms": BASE + 3 * HOUR, "power": 9.0}], BASE)
    assert mem.lookups == lookups + 1
    assert mem.alerts[-1][:3] == ("old", BASE + 3 * HOUR, "spike")  # its baseline was back


def test_a_re_send_for_an_evicted_meter_is_still_a_duplicate() -> None:
    mem = Memory(HOUR, DetectorSettings(), deduplicate=True)
    reading = {"meter_id": "old", "region": "north", "power": 1.0, "energy": 0.5,
               "voltage": 230.0, "partition": 0, "ts_ms": BASE}
    mem.batch([reading], BASE)
    mem.cut()
    mem.batch([{**reading, "meter_id": "busy", "ts_ms": BASE + 2 * HOUR}], BASE)
    mem.cut()
    mem.cut()
    assert mem.evicted == 1
    mem.batch([reading], BASE)  # the old meter's first reading, once more
    mem.cut()
    assert mem.rows[("old", BASE)].count == 1
