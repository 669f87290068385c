"""Regional figures, their rounding and their message, against the plain reference."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segs.config import load_settings
from segs.errors import ConfigError
from segs.publish.regional import (
    WINDOW_MS,
    Figures,
    capacity,
    closed_horizon,
    encode,
    figures,
    round_2,
)
from tests.reference import RefAgg, regional, to_fixed_2

START = 1_795_500_000_000 - 1_795_500_000_000 % WINDOW_MS
powers = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize(("x", "want"), [
    (0.125, 0.13),  # an exact tie goes up, as toFixed does
    (1.005, 1.0),  # stored as 1.00499999999999989…
    (2.675, 2.67),
    (0.0, 0.0),
    (12.3449999, 12.34),
    (99.995, 100.0),  # 99.9950000000000045…
    (1e-9, 0.0),
    (123456.785, 123456.79),  # 123456.78500000000349…
])
def test_load_percentage_rounds_as_the_original_service(x: float, want: float) -> None:
    assert round_2(x) == want
    assert to_fixed_2(x) == want


@given(st.one_of(powers, st.floats(min_value=0, max_value=1e4).map(lambda v: round(v, 3))))
def test_rounding_equals_the_reference(x: float) -> None:
    assert round_2(x) == to_fixed_2(x)


meter_ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                    min_size=1, max_size=8)
aggregates = st.dictionaries(
    st.tuples(meter_ids, st.sampled_from([START, START + WINDOW_MS, START + 5 * WINDOW_MS])),
    st.tuples(st.integers(1, 50), powers, powers, st.sampled_from(["North", "South", "Ost",
                                                                    "Zürich", "a=b"])),
    min_size=1, max_size=60)


@given(aggregates, st.dictionaries(st.sampled_from(["North", "Zürich", "a=b"]),
                                   st.floats(min_value=1, max_value=1e7), max_size=3))
def test_regional_figures_equal_the_reference(
        rows: dict[tuple[str, int], tuple[int, float, float, str]],
        caps: dict[str, float]) -> None:
    """Per region and window, from the per-meter aggregates: exactly the reference's
    figures (the total is the correctly rounded sum, so no tolerance is needed)."""
    per_meter = {key: RefAgg(count=n, power_sum=s, avg=s / n, max=mx, min=0.0,
                             energy_sum=0.0, region=region, partition=None)
                 for key, (n, s, mx, region) in rows.items()}
    want = regional(per_meter, caps)
    got = {}
    for (region, start), _ in want.items():
        members = [(m, a) for (m, s), a in per_meter.items() if s == start and a.region == region]
        got[(region, start)] = figures(region, start, [a.power_sum / a.count for _, a in members],
                                       [a.max for _, a in members], capacity(caps, region))
    for key, ref in want.items():
        f = got[key]
        assert (f.meter_count, f.total_consumption, f.avg_consumption, f.max_consumption,
                f.min_consumption, f.load_percentage) == (
            ref.meter_count, ref.total, ref.avg, ref.max, ref.min, ref.load), key


@given(st.lists(powers, min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_the_total_does_not_depend_on_row_order(avgs: list[float], rnd: object) -> None:
    shuffled = list(avgs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = figures("r", START, avgs, avgs, 1e6)
    b = figures("r", START, shuffled, shuffled, 1e6)
    assert a == b


def test_the_message_carries_the_wire_format_of_the_neighbours() -> None:
    f = figures("Mumbai-North", START, [2.0, 4.0], [3.0, 9.0], 250_000)
    key, value, headers, omitted = encode(f, ["m-1", "m-2"], 1_048_588)
    msg = json.loads(value)
    assert key == b"Mumbai-North" and not omitted
    assert dict(headers) == {"type": b"regional_1m_aggregate", "region": b"Mumbai-North"}
    assert msg == {
        "region": "Mumbai-North",
        "timestamp": _iso(START), "windowStart": _iso(START),
        "windowEnd": _iso(START + WINDOW_MS),
        "meter_count": 2, "total_consumption": 6.0, "avg_consumption": 3.0,
        "max_consumption": 9.0, "min_consumption": 2.0, "load_percentage": 0.0,
        "active_meters": ["m-1", "m-2"], "active_meters_omitted": False,
    }
    assert msg["timestamp"].endswith(".000Z")
    # the tariff service needs a number; the alert service an array
    assert isinstance(msg["load_percentage"], float) and isinstance(msg["active_meters"], list)


def test_a_list_past_the_limit_is_omitted_not_dropped() -> None:
    meters = [f"meter-{i:06d}" for i in range(100_000)]
    f = Figures("big", START, len(meters), 1.0, 1e-5, 1.0, 0.0, 0.0)
    _, value, _, omitted = encode(f, meters, 1_048_588)
    msg = json.loads(value)
    assert omitted and msg["active_meters"] == [] and msg["active_meters_omitted"] is True
    assert msg["meter_count"] == 100_000
    _, full, _, omitted = encode(f, meters, 16_777_216)
    assert not omitted and len(json.loads(full)["active_meters"]) == 100_000
    assert len(full) > 1_048_588  # the reason for the fallback
    _, none, _, omitted = encode(f, None, 16_777_216)  # REGIONAL_METER_LIST=none
    assert omitted and json.loads(none)["active_meters"] == []


def test_the_horizon_waits_for_every_partition() -> None:
    assert closed_horizon({0: 5, 1: 3, 2: 3}, 3) == (3, [1, 2])
    assert closed_horizon({0: 5, 2: 3}, 3) == (None, [1])  # no row for partition 1
    assert closed_horizon({0: 5, 1: None, 2: 3}, 3) == (None, [1])  # no watermark
    assert closed_horizon({0: 5, 1: 3, 7: 1}, 2) == (3, [1])  # partitions past the count
    assert closed_horizon({}, 0) == (None, [])


def test_capacities_parse_and_default() -> None:
    s = load_settings(env={"REGION_CAPACITY_KW": "Mumbai-North=250000, a=b=1.5"},
                      env_file=None)
    caps = dict(s.region_capacity_kw)
    assert caps == {"Mumbai-North": 250_000.0, "a=b": 1.5}
    assert capacity(caps, "Pune-East") == 1_000_000.0
    assert dict(s.describe())["REGION_CAPACITY_KW"] == "Mumbai-North=250000,a=b=1.5"
    for bad in ("North", "North=", "North=-1", "North=x", "=5", "North=inf"):
        with pytest.raises(ConfigError, match="REGION_CAPACITY_KW"):
            load_settings(env={"REGION_CAPACITY_KW": bad}, env_file=None)


def _iso(ms: int) -> str:
    from segs.times import iso_ms

    return iso_ms(ms)


def test_load_of_an_unnamed_region_uses_a_million_kw() -> None:
    f = figures("x", START, [1250.0], [1250.0], capacity({}, "x"))
    assert f.load_percentage == 0.13  # 0.125 exactly, a tie: up
    assert math.isclose(f.avg_consumption, 1250.0)
