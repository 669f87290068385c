"""A checkpoint cut along partitions loses, duplicates and mixes nothing, a meter seen on
two partitions is noticed whatever the batches look like, and a window is called fresh only
when it never was drained before."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segs.checkpoint.payload import MeterPartitions, Payload, WrittenWindows, baseline_state
from segs.checkpoint.sink import BaselineRow, PositionWrite
from segs.detection.detector import BaselineState
from segs.intake.readings import Interner, Readings
from segs.times import NEVER
from segs.windows.engine import WindowEngine
from segs.windows.partials import Partials

BASE = 1_795_759_200_000  # a multiple of 900 s


def _payload(partial_parts: list[int], baseline_parts: list[int],
             positions: dict[int, int]) -> Payload:
    n, m = len(partial_parts), len(baseline_parts)
    ids = np.arange(n, dtype=np.int64)
    partials = Partials(
        size_s=60, meter=np.arange(n, dtype=np.int32), window_start_ms=ids * 60_000,
        count=ids + 1, power_sum=ids * 2.0, power_max=ids * 3.0, power_min=ids * 1.0,
        energy_sum=ids * 0.5, last_ts_ms=ids, region=np.zeros(n, np.int32),
        partition=np.array(partial_parts, np.int32))
    slots = np.arange(m, dtype=np.int64)
    baselines = BaselineState(
        meter=slots.astype(np.int32), baseline=slots * 1.5, samples=slots,
        last_outage_ms=slots, last_spike_ms=slots, last_drop_ms=slots,
        partition=np.array(baseline_parts, np.int32))
    fresh = {60: ids % 2 == 1, 900: ids % 3 == 0}
    return Payload(partials, baselines,
                   {p: PositionWrite(None, nxt, None) for p, nxt in positions.items()},
                   fresh)


def _partial_keys(p: Payload) -> list[tuple[int, int]]:
    return sorted(zip(p.partials.meter.tolist(), p.partials.partition.tolist(), strict=True))


def _baseline_keys(p: Payload) -> list[tuple[int, int]]:
    return sorted(zip(p.baselines.meter.tolist(), p.baselines.partition.tolist(), strict=True))


@settings(deadline=None, max_examples=200)
@given(partial_parts=st.lists(st.integers(0, 7), max_size=60),
       baseline_parts=st.lists(st.integers(0, 7), max_size=20),
       positions=st.dictionaries(st.integers(0, 7), st.integers(1, 10**6), max_size=8),
       parts=st.integers(1, 4))
def test_split_is_a_partition_of_the_payload(partial_parts: list[int],
                                             baseline_parts: list[int],
                                             positions: dict[int, int], parts: int) -> None:
    whole = _payload(partial_parts, baseline_parts, positions)
    pieces = whole.split(parts)
    assert len(pieces) <= max(parts, 1)
    assert all(pieces)  # no empty transaction
    if not whole:
        assert pieces == []
        return
    # every row and position lands in exactly one piece
    assert sorted(k for p in pieces for k in _partial_keys(p)) == _partial_keys(whole)
    assert sorted(k for p in pieces for k in _baseline_keys(p)) == _baseline_keys(whole)
    merged: dict[int, object] = {}
    for p in pieces:
        assert not set(merged) & set(p.positions)
        merged.update(p.positions)
    assert merged == whole.positions
    # ... and no partition is split across pieces
    owners: dict[int, int] = {}
    for i, p in enumerate(pieces):
        mine = (set(p.positions) | set(p.partials.partition.tolist())
                | set(p.baselines.partition.tolist()))
        for q in mine:
            assert owners.setdefault(q, i) == i
    # rows keep their values: the partial of meter k still has count k + 1, and its fresh
    # flags (fresh at 1 minute: an odd meter; at 15 minutes: a meter divisible by 3)
    for p in pieces:
        assert (p.partials.count == p.partials.meter.astype(np.int64) + 1).all()
        assert (p.fresh[60] == (p.partials.meter % 2 == 1)).all()
        assert (p.fresh[900] == (p.partials.meter % 3 == 0)).all()
    # consumed (the worker's way): the same pieces, and the whole gave its partials away
    again = _payload(partial_parts, baseline_parts, positions)
    taken = again.split(parts, consume=True)
    assert [_partial_keys(p) for p in taken] == [_partial_keys(p) for p in pieces]
    for p, q in zip(taken, pieces, strict=True):
        assert (p.partials.count == q.partials.count).all()
        assert _baseline_keys(p) == _baseline_keys(q) and p.positions == q.positions
    if not (len(taken) == 1 and taken[0] is again):  # split, not handed back whole
        assert len(again.partials) == 0 and len(again.baselines) == 0


def test_split_balances_partials_over_pieces() -> None:
    whole = _payload([0] * 50 + [1] * 30 + [2] * 20 + [3] * 10, [], {q: 1 for q in range(4)})
    sizes = sorted(len(p.partials) for p in whole.split(2))
    assert sizes == [50, 60]  # 50 | 30 + 20 + 10


def test_split_into_one_keeps_the_payload_whole() -> None:
    whole = _payload([0, 1, 2], [3], {0: 1, 5: 2})
    assert whole.split(1) == [whole]


@settings(deadline=None, max_examples=300)
@given(batches=st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=12),
                        max_size=6),
       takes=st.sets(st.integers(0, 5)))
def test_meter_partitions_flags_exactly_a_meter_changing_partition(
        batches: list[list[tuple[int, int]]], takes: set[int]) -> None:
    """Reference: walk every reading in order; a reading whose meter's previous reading came
    from another partition makes the current period mixed. take_mixed ends a period."""
    seen = MeterPartitions()
    last: dict[int, int] = {}
    mixed = False
    for i, batch in enumerate(batches):
        for meter, partition in batch:
            if last.get(meter, partition) != partition:
                mixed = True
            last[meter] = partition
        seen.note(np.array([m for m, _ in batch], np.int32),
                  np.array([p for _, p in batch], np.int32))
        if i in takes:
            assert seen.take_mixed() == mixed
            mixed = False
    assert seen.take_mixed() == mixed


def test_meter_partitions_grow_with_new_slots() -> None:
    seen = MeterPartitions()
    seen.note(np.array([5_000], np.int32), np.array([1], np.int32))
    seen.note(np.array([5_000, 7], np.int32), np.array([1, 2], np.int32))
    assert not seen.take_mixed()
    seen.note(np.array([5_000], np.int32), np.array([2], np.int32))
    assert seen.take_mixed()


@settings(deadline=None, max_examples=200)
@given(data=st.data(), n_meters=st.integers(1, 5), n_batches=st.integers(1, 4))
def test_an_unmixed_checkpoint_has_every_partial_from_one_partition(
        data: st.DataObject, n_meters: int, n_batches: int) -> None:
    """What the cut relies on: when MeterPartitions saw no meter on two partitions, every
    reading of a drained partial came from that partial's partition."""
    home = data.draw(st.lists(st.integers(0, 3), min_size=n_meters, max_size=n_meters))
    strays = data.draw(st.booleans())  # some readings from another partition
    meters, regions = Interner(), Interner()
    engine = WindowEngine(60, regions=regions, allowed_lateness_ms=5_000)
    seen = MeterPartitions()
    every: list[tuple[int, int, int]] = []  # (meter slot, window start, partition)
    for _ in range(n_batches):
        batch = []
        for _ in range(data.draw(st.integers(1, 20))):
            m = data.draw(st.integers(0, n_meters - 1))
            p = data.draw(st.integers(0, 3)) if strays else home[m]
            ts = BASE + data.draw(st.integers(0, 600_000))
            batch.append((meters.slot(f"M{m}"), p, ts))
        r = Readings(
            meter=np.array([b[0] for b in batch], np.int32),
            region=np.full(len(batch), regions.slot("north"), np.int32),
            ts_ms=np.array([b[2] for b in batch], np.int64),
            power=np.ones(len(batch)), energy=np.zeros(len(batch)),
            voltage=np.full(len(batch), np.nan),
            partition=np.array([b[1] for b in batch], np.int32),
            offset=np.arange(len(batch), dtype=np.int64))
        seen.note(r.meter, r.partition)
        engine.add(r, BASE + 600_000)
        every += [(m, ts - ts % 60_000, p) for m, p, ts in batch]
    drained = engine.drain()
    owner = {(m, w): p for m, w, p in zip(drained.meter.tolist(),
                                          drained.window_start_ms.tolist(),
                                          drained.partition.tolist(), strict=True)}
    assert len(owner) == len(drained)  # one partial per (meter, window)
    if not seen.take_mixed():
        assert all(owner[(m, w)] == p for m, w, p in every)
    if not strays:
        assert not seen.take_mixed()


@settings(deadline=None, max_examples=300)
@given(drains=st.lists(st.lists(st.tuples(st.integers(0, 4), st.integers(-20, 40)), max_size=10),
                       max_size=6),
       stored=st.lists(st.one_of(st.none(), st.integers(-20 * 60_000, 40 * 60_000)),
                       min_size=2, max_size=2))
def test_written_windows_calls_fresh_only_what_was_never_drained(
        drains: list[list[tuple[int, int]]], stored: list[int | None]) -> None:
    """Reference: the set of (meter, window) drained so far, per window size, and per
    partition (meter % 2) the newest event time stored before (None: none). Fresh must never
    be a window drained before or one starting by that time (a wrong "fresh" costs a
    savepoint rollback), and must be every window after both the meter's latest one and
    that time (so new rows, in order, skip the merge)."""
    written = WrittenWindows()
    for p, newest in enumerate(stored):
        written.stored_through(p, NEVER if newest is None else newest)
    seen: dict[int, set[tuple[int, int]]] = {60: set(), 900: set()}
    for drain in drains:
        keys = sorted({(meter, minute * 60_000) for meter, minute in drain})
        partials = Partials(
            size_s=60, meter=np.array([m for m, _ in keys], np.int32),
            window_start_ms=np.array([w for _, w in keys], np.int64),
            count=np.ones(len(keys), np.int64), power_sum=np.ones(len(keys)),
            power_max=np.ones(len(keys)), power_min=np.ones(len(keys)),
            energy_sum=np.ones(len(keys)), last_ts_ms=np.zeros(len(keys), np.int64),
            region=np.zeros(len(keys), np.int32),
            partition=np.array([m % 2 for m, _ in keys], np.int32))
        fresh = written.fresh(partials)
        for size, flags in fresh.items():
            size_ms = size * 1000
            for (meter, start), flag in zip(keys, flags.tolist(), strict=True):
                key = (meter, start // size_ms)
                latest = max((w for m, w in seen[size] if m == meter), default=None)
                newest = stored[meter % 2]
                before = newest is not None and key[1] * size_ms <= newest
                if flag:
                    assert key not in seen[size] and not before
                if (latest is None or key[1] > latest) and not before:
                    assert flag
            seen[size] |= {(m, w // size_ms) for m, w in keys}


def test_written_windows_grow_with_new_slots() -> None:
    written = WrittenWindows()
    one = Partials(60, np.array([5_000], np.int32), np.array([BASE], np.int64),
                   np.ones(1, np.int64), np.ones(1), np.ones(1), np.ones(1), np.ones(1),
                   np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros(1, np.int32))
    assert written.fresh(one)[60].tolist() == [True]
    assert written.fresh(one)[60].tolist() == [False]
    assert written.fresh(one)[900].tolist() == [False]



def test_stored_baselines_become_detector_state_by_slot() -> None:
    meters = Interner()
    meters.slot("a")
    rows = [BaselineRow("b", 3, 2.5, 11, NEVER, 5, 6), BaselineRow("a", 1, 1.0, 2, 7, NEVER, 8)]
    state = baseline_state(rows, meters.slot)
    assert state.meter.tolist() == [1, 0]
    assert state.partition.tolist() == [3, 1]
    assert state.baseline.tolist() == [2.5, 1.0] and state.samples.tolist() == [11, 2]
    assert state.last_outage_ms.tolist() == [NEVER, 7]
    assert state.last_spike_ms.tolist() == [5, NEVER]
    assert state.last_drop_ms.tolist() == [6, 8]
    assert state.meter.dtype == np.int32 and state.last_drop_ms.dtype == np.int64
