"""Window engine vs the reference aggregator; closing, lateness, idle advance, drops."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.intake.readings import Interner, Readings
from segs.windows.engine import WindowEngine
from segs.windows.partials import PartialRow, merge
from tests.reference import aggregate

SETTINGS = settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
BASE = 1_795_759_200_000  # a multiple of 900 s
REGIONS = ["north", "South", "é-east", "west", "nörth", "z"]

powers = st.one_of(
    st.floats(min_value=0, max_value=1e300, allow_nan=False),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e300, 2.5]),
)
voltages = st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False),
                     st.sampled_from([0.0, 230.0, 229.95]))
offsets_ms = st.one_of(
    st.integers(0, 3_600_000),
    st.sampled_from([0, 59_999, 60_000, 899_999, 900_000, 900_001]),
    st.integers(0, 3 * 365 * 86_400_000),  # years apart
    st.integers(-5 * 86_400_000, 0),
)


@st.composite
def readings(draw: st.DrawFn, max_meters: int = 6) -> list[dict[str, Any]]:
    n_meters = draw(st.integers(1, max_meters))
    out = []
    for _ in range(draw(st.integers(1, 60))):
        m = draw(st.integers(0, n_meters - 1))
        out.append(
            {
                "meter_id": f"M{m}",
                "region": draw(st.sampled_from(REGIONS)),
                "ts_ms": BASE + draw(offsets_ms),
                "power": draw(powers),
                "energy": draw(powers),
                "voltage": draw(st.one_of(st.just(math.nan), voltages)),  # NaN: absent
                "partition": draw(st.integers(0, 3)),
            }
        )
    return out


def to_columns(rs: list[dict[str, Any]], meters: Interner, regions: Interner) -> Readings:
    n = len(rs)
    return Readings(
        meter=np.array([meters.slot(r["meter_id"]) for r in rs], np.int32),
        region=np.array([regions.slot(r["region"]) for r in rs], np.int32),
        ts_ms=np.array([r["ts_ms"] for r in rs], np.int64),
        power=np.array([r["power"] for r in rs], np.float64),
        energy=np.array([r["energy"] for r in rs], np.float64),
        voltage=np.array([r.get("voltage", math.nan) for r in rs], np.float64),
        partition=np.array([r["partition"] for r in rs], np.int32),
        offset=np.arange(n, dtype=np.int64),
    )


def collect(store: dict[tuple[str, int], PartialRow], eng: WindowEngine, meters: Interner) -> None:
    """Drain ``eng`` and merge the rows into ``store`` like the database upsert would."""
    p = eng.drain()
    keys = list(zip(p.meter.tolist(), p.window_start_ms.tolist(), strict=True))
    assert len(set(keys)) == len(keys), "one drain must not repeat a key"
    assert (p.count > 0).all()
    for i, (m, ws) in enumerate(keys):
        key = (meters.names[m], ws)
        row = p.row(i, eng.regions)
        store[key] = merge(store[key], row) if key in store else row


def assert_matches(store: dict[tuple[str, int], PartialRow], rs: list[dict[str, Any]], size: int):
    want = aggregate(rs, size)
    assert set(store) == set(want)
    for key, ref in want.items():
        got = store[key]
        assert got.count == ref.count
        assert got.power_max == ref.max and got.power_min == ref.min
        assert math.isclose(got.avg, ref.avg, rel_tol=1e-9)
        assert math.isclose(got.energy_sum, ref.energy_sum, rel_tol=1e-9)
        assert (got.region, got.partition) == (ref.region, ref.partition), key
        assert got.voltage_count == ref.voltage_count, key
        assert math.isclose(got.voltage_sum, ref.voltage_sum, rel_tol=1e-9), key


@SETTINGS
@given(
    rs=readings(),
    data=st.data(),
    size=st.sampled_from([60, 900]),
    ring=st.one_of(st.none(), st.integers(1, 3)),
    packed=st.booleans(),
)
def test_engine_equals_reference(
    rs: list[dict[str, Any]], data: st.DataObject, size: int, ring: int | None, packed: bool
) -> None:
    order = data.draw(st.permutations(range(len(rs))))
    shuffled = [rs[i] for i in order]
    meters, regions = Interner(), Interner()
    eng = WindowEngine(size, regions=regions, ring=ring, report_closed=True)
    eng.use_packed_keys = packed
    store: dict[tuple[str, int], PartialRow] = {}
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rs)), max_size=5)))
    now = BASE
    for lo, hi in zip([0, *cuts], [*cuts, len(rs)], strict=True):
        now += data.draw(st.integers(0, 20_000))
        eng.add(to_columns(shuffled[lo:hi], meters, regions), now)
        if data.draw(st.booleans()):
            eng.advance_idle(now)
            eng.closed()
        if data.draw(st.booleans()):
            collect(store, eng, meters)
    collect(store, eng, meters)
    assert eng.pending_readings() == 0 and eng.pending_windows() == 0
    assert_matches(store, rs, size)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**32 - 1))
def test_many_meters_growth_and_overflow(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 5000
    rs = [
        {
            "meter_id": f"M{int(m)}",
            "region": REGIONS[int(g)],
            "ts_ms": BASE + int(t),
            "power": float(p),
            "energy": float(e),
            "partition": int(m) % 4,
        }
        for m, g, t, p, e in zip(
            rng.integers(0, 3000, n),
            rng.integers(0, len(REGIONS), n),
            rng.integers(0, 20 * 60_000, n),
            rng.random(n) * 10,
            rng.random(n),
            strict=True,
        )
    ]
    meters, regions = Interner(), Interner()
    engines = [WindowEngine(60, regions=regions), WindowEngine(900, regions=regions, ring=1)]
    stores: list[dict[tuple[str, int], PartialRow]] = [{}, {}]
    for lo in range(0, n, 700):
        cols = to_columns(rs[lo : lo + 700], meters, regions)
        for eng, store in zip(engines, stores, strict=True):
            eng.add(cols, BASE)
            if lo % 1400 == 0:
                collect(store, eng, meters)
    for eng, store in zip(engines, stores, strict=True):
        collect(store, eng, meters)
        assert_matches(store, rs, eng.size_s)


# ----------------------------------------------------------------------------------------
# closing


def one(m: int, ts: int, part: int = 0, power: float = 1.0) -> Readings:
    return Readings(
        meter=np.array([m], np.int32),
        region=np.array([0], np.int32),
        ts_ms=np.array([ts], np.int64),
        power=np.array([power]),
        energy=np.array([0.0]),
        voltage=np.array([np.nan]),
        partition=np.array([part], np.int32),
        offset=np.array([0], np.int64),
    )


def closed_set(eng: WindowEngine) -> set[tuple[int, int]]:
    m, s = eng.closed()
    out = set(zip(m.tolist(), s.tolist(), strict=True))
    assert len(out) == len(m), "a window reported twice in one call"
    return out


def new_engine(size: int = 60, **kw: Any) -> WindowEngine:
    regions = Interner()
    regions.slot("r")
    kw.setdefault("report_closed", True)  # these tests ask closed()
    return WindowEngine(size, regions=regions, **kw)


def test_window_closes_exactly_when_watermark_passes_its_end() -> None:
    eng = new_engine()
    eng.add(one(0, BASE + 1000), 0)
    eng.add(one(0, BASE + 60_000 + 4_999), 0)  # watermark = BASE + 59_999
    assert closed_set(eng) == set()
    eng.add(one(0, BASE + 65_000), 0)  # watermark = BASE + 60_000 = window end
    assert closed_set(eng) == {(0, BASE)}
    assert closed_set(eng) == set()
    assert eng.watermarks() == {0: BASE + 60_000}


def test_late_reading_counted_and_reported_again() -> None:
    eng = new_engine()
    eng.add(one(0, BASE + 1000), 0)
    assert eng.add(one(0, BASE + 200_000), 0) == 0
    assert closed_set(eng) == {(0, BASE)}
    assert eng.add(one(0, BASE + 2000), 0) == 1  # its window closed already
    assert closed_set(eng) == {(0, BASE)}
    assert closed_set(eng) == set()
    # far older than the ring: one-reading partial in overflow, still reported and drained
    assert eng.add(one(0, BASE - 3_600_000), 0) == 1
    assert closed_set(eng) == {(0, BASE - 3_600_000)}
    p = eng.drain()
    assert sorted(p.window_start_ms.tolist()) == [BASE - 3_600_000, BASE, BASE + 180_000]
    assert p.count.sum() == 4


def test_idle_advance_closes_silent_partition() -> None:
    eng = new_engine(idle_advance_ms=10_000)
    eng.add(one(0, BASE + 1000, part=1), now_ms=BASE + 2000)
    eng.add(one(1, BASE + 500_000, part=2), now_ms=BASE + 2000)
    assert closed_set(eng) == set()
    eng.advance_idle(BASE + 11_999)
    assert closed_set(eng) == set()
    eng.advance_idle(BASE + 65_000)  # idle 63 s: watermark = now − 5 s = window end
    assert closed_set(eng) == {(0, BASE)}
    assert eng.watermarks()[1] == BASE + 60_000


def test_drop_partitions_forgets_state() -> None:
    eng = new_engine(ring=1)
    eng.add(one(0, BASE, part=0), 0)
    eng.add(one(0, BASE + 60_000, part=0), 0)  # evicts BASE to overflow
    eng.add(one(1, BASE, part=1), 0)
    eng.drop_partitions([0])
    assert eng.watermarks() == {1: BASE - 5000}
    p = eng.drain()
    assert p.meter.tolist() == [1] and p.partition.tolist() == [1]
    eng.advance_idle(BASE + 10**9)
    assert closed_set(eng) == {(1, BASE)}
    assert eng.pending_readings() == 0


@SETTINGS
@given(
    steps=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 4), st.integers(0, 600_000)), max_size=8),
            st.integers(0, 30_000),
            st.booleans(),
        ),
        max_size=12,
    ),
    ring=st.integers(1, 4),
)
def test_closed_matches_model(steps: list[Any], ring: int) -> None:
    """closed() == windows with readings since last report whose end ≤ their watermark."""
    size, lateness, idle = 60_000, 5000, 10_000
    eng = new_engine(allowed_lateness_ms=lateness, idle_advance_ms=idle, ring=ring)
    part_of = {m: m % 2 for m in range(5)}
    wm: dict[int, int] = {}
    max_ts: dict[int, int] = {}
    last_wall: dict[int, int] = {}
    waiting: set[tuple[int, int]] = set()
    now = 0
    for batch, dt, idle_call in steps:
        now += dt
        if batch:
            cols = Readings(
                meter=np.array([m for m, _ in batch], np.int32),
                region=np.zeros(len(batch), np.int32),
                ts_ms=np.array([BASE + t for _, t in batch], np.int64),
                power=np.ones(len(batch)),
                energy=np.zeros(len(batch)),
                voltage=np.full(len(batch), np.nan),
                partition=np.array([part_of[m] for m, _ in batch], np.int32),
                offset=np.zeros(len(batch), np.int64),
            )
            late = sum(
                1
                for m, t in batch
                if ((BASE + t) // size + 1) * size <= wm.get(part_of[m], -(2**62))
            )
            assert eng.add(cols, now) == late
            for m, t in batch:
                p = part_of[m]
                max_ts[p] = max(max_ts.get(p, -(2**62)), BASE + t)
                last_wall[p] = now
                waiting.add((m, (BASE + t) // size * size))
            for p in {part_of[m] for m, _ in batch}:
                wm[p] = max(wm.get(p, -(2**62)), max_ts[p] - lateness)
        if idle_call:
            eng.advance_idle(now)
            for p in wm:
                if last_wall[p] <= now - idle:
                    wm[p] = max(wm[p], now - lateness)
        assert eng.watermarks() == wm
        due = {(m, s) for m, s in waiting if s + size <= wm[part_of[m]]}
        assert closed_set(eng) == due
        waiting -= due


def test_an_engine_that_reports_no_closed_windows_keeps_nothing_for_it() -> None:
    """Windows leaving their cells are kept only for closed(); the worker never asks, and
    kept they grew by every meter's window every window. The partials are the same."""
    kept, lean = new_engine(), new_engine(report_closed=False)
    drained: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}
    for minute in range(3 * kept.ring):  # every cell is reused twice over
        for eng in (kept, lean):
            for m in range(20):
                eng.add(one(m, BASE + minute * 60_000 + 7 * m), 0)
            d = eng.drain()
            drained[eng.report_closed] += sorted(zip(d.meter.tolist(), d.window_start_ms.tolist(),
                                                     d.count.tolist(), strict=True))
    assert drained[True] == drained[False]
    assert kept._over_open and lean._over_open == []
