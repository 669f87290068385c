"""merge() is commutative and associative; combine() and roll_up() equal folding merge() per key."""

from __future__ import annotations

import math
from functools import reduce

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segs.intake.readings import Interner
from segs.windows.partials import PartialRow, Partials, combine, merge, region_ranks, roll_up

REGIONS = ["north", "North", "é", "z", "nörth"]
small = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@st.composite
def partials(draw: st.DrawFn) -> PartialRow:
    a, b = sorted([draw(small), draw(small)])
    count = draw(st.integers(1, 100))
    return PartialRow(
        count=count,
        power_sum=draw(st.integers(0, 10**6)) / 8,  # dyadic: sums are exact in any order
        power_max=b,
        power_min=a,
        energy_sum=draw(st.integers(0, 10**6)) / 4,
        last_ts_ms=draw(st.integers(0, 5)),
        region=draw(st.sampled_from(REGIONS)),
        partition=draw(st.integers(0, 3)),
        voltage_sum=draw(st.integers(0, 10**6)) / 16,
        voltage_count=draw(st.integers(0, count)),
    )


@settings(deadline=None, max_examples=300)
@given(partials(), partials(), partials())
def test_merge_commutative_and_associative(a: PartialRow, b: PartialRow, c: PartialRow) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    m = merge(a, b)
    assert m.count == a.count + b.count
    assert m.power_max == max(a.power_max, b.power_max)
    assert (m.voltage_sum, m.voltage_count) == (a.voltage_sum + b.voltage_sum,
                                                a.voltage_count + b.voltage_count)
    assert (m.last_ts_ms, m.region, m.partition) == max(
        (x.last_ts_ms, x.region, x.partition) for x in (a, b)
    )


def _regions() -> Interner:
    regions = Interner()
    for name in reversed(REGIONS):
        regions.slot(name)
    return regions


def _columns(rows: list[tuple[int, int, PartialRow]], regions: Interner) -> Partials:
    """1-minute partials from (meter, minute, partial) rows."""
    return Partials(
        size_s=60,
        meter=np.array([m for m, _, _ in rows], np.int32),
        window_start_ms=np.array([w * 60_000 for _, w, _ in rows], np.int64),
        count=np.array([r.count for _, _, r in rows], np.int64),
        power_sum=np.array([r.power_sum for _, _, r in rows], np.float64),
        power_max=np.array([r.power_max for _, _, r in rows], np.float64),
        power_min=np.array([r.power_min for _, _, r in rows], np.float64),
        energy_sum=np.array([r.energy_sum for _, _, r in rows], np.float64),
        last_ts_ms=np.array([r.last_ts_ms for _, _, r in rows], np.int64),
        region=np.array([regions.slot(r.region) for _, _, r in rows], np.int32),
        partition=np.array([r.partition for _, _, r in rows], np.int32),
        voltage_sum=np.array([r.voltage_sum for _, _, r in rows], np.float64),
        voltage_count=np.array([r.voltage_count for _, _, r in rows], np.int64),
    )


def _assert_folded(out: Partials, want: dict[tuple[int, int], list[PartialRow]],
                   regions: Interner) -> None:
    keys = list(zip(out.meter.tolist(), out.window_start_ms.tolist(), strict=True))
    assert keys == sorted(want)
    for i, key in enumerate(keys):
        got = out.row(i, regions)
        ref = reduce(merge, want[key])
        assert got == ref or (
            math.isclose(got.power_sum, ref.power_sum)
            and got._replace(power_sum=0) == ref._replace(power_sum=0)
        )


@settings(deadline=None, max_examples=100)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), partials()), max_size=40))
def test_combine_equals_folded_merge(rows: list[tuple[int, int, PartialRow]]) -> None:
    regions = _regions()
    out = combine(_columns(rows, regions), region_ranks(regions))
    want: dict[tuple[int, int], list[PartialRow]] = {}
    for m, w, r in rows:
        want.setdefault((m, w * 60_000), []).append(r)
    _assert_folded(out, want, regions)


@settings(deadline=None, max_examples=100)
@given(st.dictionaries(st.tuples(st.integers(0, 3), st.integers(-20, 40)), partials(),
                       max_size=40))
def test_roll_up_equals_folded_merge_per_coarse_window(
        cells: dict[tuple[int, int], PartialRow]) -> None:
    """Distinct (meter, minute) partials, as a drain gives them, rolled up to 15 minutes
    (minutes before the epoch included: windows floor, they do not truncate)."""
    regions = _regions()
    rows = [(m, w, r) for (m, w), r in cells.items()]
    out = roll_up(_columns(rows, regions), 900, region_ranks(regions))
    assert out.size_s == 900
    want: dict[tuple[int, int], list[PartialRow]] = {}
    for m, w, r in rows:
        want.setdefault((m, (w // 15) * 900_000), []).append(r)
    _assert_folded(out, want, regions)


def test_roll_up_refuses_windows_that_do_not_nest() -> None:
    with pytest.raises(ValueError, match="do not nest"):
        roll_up(Partials.empty(60), 90, np.zeros(0, np.int64))
