"""Decoder vs the plain reference parser: valid readings, each rule broken, arbitrary bytes."""

from __future__ import annotations

import json
import math
import shutil
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segs.intake.decode import (
    MIN_TS_MS,
    NATIVE,
    NO_TIMESTAMP,
    REASONS,
    TABLE_REASONS,
    Decoder,
    _exact,
    native_scan,
    parse_timestamp_ms,
)
from segs.intake.readings import Interner, meter_interner
from tests.reference import parse_reading, timestamp_ms

NOW = 1_795_759_217_123  # 2026-11-27T06:00:17.123Z
SKEW = 300_000
SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

text_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
numbers = st.one_of(
    st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=10**20),
    st.sampled_from([0, 0.0, -0.0, 5e-324, 1.7976931348623157e308]),
)
# what a valid reading may carry: 0, or 1e-12 … 1e12 (see segs.intake.decode.VALUE_MIN/MAX)
valid_numbers = st.one_of(
    st.floats(min_value=1e-12, max_value=1e12),
    st.integers(min_value=1, max_value=10**12),
    st.sampled_from([0, 0.0, -0.0, 1e-12, 1e12]),
)


def format_ts(ms: int, offset_min: int, digits: int, extra: str) -> str:
    """ISO text of instant ``ms`` written in zone ``offset_min`` with ``digits`` fraction."""
    local = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms + offset_min * 60_000)
    frac = f"{ms % 1000:03d}{extra}"[:digits]
    zone = "Z" if offset_min == 0 and not extra else None
    if zone is None:
        sign = "+" if offset_min >= 0 else "-"
        zone = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    return local.strftime("%Y-%m-%dT%H:%M:%S") + ("." + frac if digits else "") + zone


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[str, int]:
    ms = draw(
        st.one_of(
            st.integers(946_684_800_000, NOW + SKEW),
            st.sampled_from([946_684_800_000, NOW + SKEW, NOW, NOW - NOW % 60_000]),
        )
    )
    offset = draw(st.one_of(st.just(0), st.integers(-(23 * 60 + 59), 23 * 60 + 59)))
    digits = draw(st.integers(0, 9))
    extra = draw(st.text("0123456789", min_size=6, max_size=6))
    text = format_ts(ms, offset, digits, extra)
    keep = min(digits, 3)
    expected = ms - ms % (10 ** (3 - keep))
    return text, expected


@st.composite
def valid_readings(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    ts_text, ts_ms = draw(timestamps())
    obj: dict[str, Any] = {
        "meterId": draw(st.text(text_chars, min_size=1, max_size=64)),
        "region": draw(st.text(text_chars, min_size=1, max_size=100)),
        "timestamp": ts_text,
        "powerKw": draw(valid_numbers),
    }
    for name in ("energyKwh", "voltage"):
        choice = draw(st.integers(0, 2))
        if choice == 1:
            obj[name] = None
        elif choice == 2:
            obj[name] = draw(valid_numbers)
    extras = draw(
        st.dictionaries(
            st.text(max_size=8).filter(
                lambda k: (
                    k not in ("meterId", "region", "timestamp", "powerKw")
                    and k not in ("energyKwh", "voltage")
                )
            ),
            st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers())),
            max_size=4,
        )
    )
    items = list(obj.items()) + list(extras.items())
    items = draw(st.permutations(items))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    text = json.dumps(dict(items), separators=sep, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = " \n" + text + "\r\n "
    energy = obj.get("energyKwh")
    voltage = obj.get("voltage")
    expected = {
        "meter_id": obj["meterId"],
        "region": obj["region"],
        "ts_ms": ts_ms,
        "power": float(obj["powerKw"]),
        "energy": 0.0 if energy is None else float(energy),
        "voltage": math.nan if voltage is None else float(voltage),
    }
    return text.encode("utf-8"), expected


def decode(values: list[bytes | None], kafka_ts: list[int] | int = NOW,
           limits: tuple[int | None, int | None] = (None, None)) -> tuple[Decoder, Any, Any]:
    """Decode with the native path (when built) and with the Python paths alone, meter ids
    in the compact interner (when built) and in the dict one; all must give the same
    readings and rejects. Returns the first. ``limits``: the longest meter id and region the
    database stores."""
    kts = np.array(kafka_ts, np.int64) if isinstance(kafka_ts, list) else kafka_ts
    results = []
    for native, meters in ((True, meter_interner()), (True, Interner()), (False, Interner())):
        dec = Decoder(meters, Interner(), max_future_skew_ms=SKEW, native=native,
                      meter_id_max=limits[0], region_max=limits[1])
        n = len(values)
        parts = np.arange(n, dtype=np.int32) % 3
        offs = np.arange(n, dtype=np.int64) + 100
        readings, rejects = dec.decode(values, parts, offs, kts)
        results.append((dec, readings, rejects))
    d1, r1, j1 = results[0]
    for d2, r2, j2 in results[1:]:
        assert j1 == j2
        assert rows(d1, r1) == rows(d2, r2) or all(
            same(a, b) for a, b in zip(rows(d1, r1), rows(d2, r2), strict=True))
        for field in ("ts_ms", "power", "energy", "voltage", "partition", "offset"):
            a, b = getattr(r1, field), getattr(r2, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), field  # bit: -0.0
    return results[0]


def rows(dec: Decoder, r: Any) -> list[dict[str, Any]]:
    return [
        {
            "meter_id": dec.meters.names[int(r.meter[i])],
            "region": dec.regions.names[int(r.region[i])],
            "ts_ms": int(r.ts_ms[i]),
            "power": float(r.power[i]),
            "energy": float(r.energy[i]),
            "voltage": float(r.voltage[i]),
        }
        for i in range(len(r))
    ]


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


def check_against_reference(values: list[bytes | None], kafka_ts: list[int] | None = None,
                            limits: tuple[int | None, int | None] = (None, None)) -> None:
    """Decoder output == reference, index by index; rejects sorted and reasons equal."""
    kts = [NOW] * len(values) if kafka_ts is None else kafka_ts
    dec, r, rejects = decode(values, kts, limits)
    assert [x.index for x in rejects] == sorted(x.index for x in rejects)
    expected = [parse_reading(v, t, SKEW, meter_id_max=limits[0], region_max=limits[1])
                for v, t in zip(values, kts, strict=True)]
    want_rejects = [(i, e) for i, e in enumerate(expected) if isinstance(e, str)]
    assert [(x.index, x.reason) for x in rejects] == want_rejects
    assert all(x.reason in REASONS and len(x.detail) <= 200 for x in rejects)
    good = [i for i, e in enumerate(expected) if not isinstance(e, str)]
    assert r.offset.tolist() == [i + 100 for i in good]
    assert r.partition.tolist() == [i % 3 for i in good]
    got = rows(dec, r)
    for g, i in zip(got, good, strict=True):
        e = expected[i]
        assert isinstance(e, dict)
        assert same(g, e), (values[i], g, e)


@SETTINGS
@given(st.lists(valid_readings(), min_size=1, max_size=30))
def test_valid_readings_decode_like_reference(batch: list[tuple[bytes, dict[str, Any]]]) -> None:
    values: list[bytes | None] = [v for v, _ in batch]
    dec, r, rejects = decode(values)
    assert rejects == []
    for g, (_, e) in zip(rows(dec, r), batch, strict=True):
        assert same(g, e), (g, e)
    check_against_reference(values)


# Kafka timestamps around a reading's own time: behind, equal, ahead, none at all.
kafka_stamps = st.one_of(st.sampled_from([NO_TIMESTAMP, NOW, NOW - 7_200_000, NOW + 7_200_000,
                                          NOW - SKEW, NOW - SKEW - 1, 0]),
                         st.integers(0, 2**63 - 1))


@SETTINGS
@given(st.lists(st.tuples(valid_readings(), kafka_stamps), min_size=1, max_size=30))
def test_the_future_rule_is_a_function_of_the_message(
        batch: list[tuple[tuple[bytes, dict[str, Any]], int]]) -> None:
    """Each message is judged against its own Kafka timestamp (none: not judged), on both
    paths, as the reference says; no wall clock is involved."""
    values: list[bytes | None] = [v for (v, _), _ in batch]
    check_against_reference(values, [t for _, t in batch])


def test_a_reading_ahead_of_its_kafka_timestamp_is_rejected_whatever_the_clock() -> None:
    text = mutate({"timestamp": "2026-11-27T08:00:17.123Z"})  # NOW + 2 h
    values: list[bytes | None] = [text] * 5
    kts = [NOW, NOW + 7_200_000 - SKEW - 1, NOW + 7_200_000 - SKEW, NO_TIMESTAMP, NOW + 9**15]
    _, r, rejects = decode(values, kts)
    assert [(x.index, x.reason) for x in rejects] == [(0, "future_timestamp"),
                                                     (1, "future_timestamp")]
    assert "ahead of the message's Kafka timestamp" in rejects[0].detail
    assert "7200000 ms" in rejects[0].detail
    assert r.offset.tolist() == [102, 103, 104]
    check_against_reference(values, kts)


BASE = {
    "meterId": "MTR-1",
    "region": "north",
    "timestamp": "2026-11-27T06:00:17.123Z",
    "powerKw": 1.5,
    "energyKwh": 0.1,
    "voltage": 230,
}
MUTATIONS: list[tuple[str, Any]] = [
    ("missing_field", {"meterId": ...}),
    ("missing_field", {"region": ...}),
    ("missing_field", {"timestamp": ...}),
    ("missing_field", {"powerKw": ...}),
    ("missing_field", {"powerKw": None}),
    ("wrong_type", {"meterId": 42}),
    ("wrong_type", {"meterId": None}),
    ("wrong_type", {"region": ["north"]}),
    ("wrong_type", {"timestamp": 1795759217123}),
    ("wrong_type", {"powerKw": "1.5"}),
    ("wrong_type", {"powerKw": True}),
    ("wrong_type", {"energyKwh": False}),
    ("wrong_type", {"voltage": {}}),
    ("bad_value", {"meterId": ""}),
    ("bad_value", {"meterId": "x" * 65}),
    ("bad_value", {"meterId": "a\x00b"}),
    ("bad_value", {"region": ""}),
    ("bad_value", {"region": "é" * 101}),
    ("negative", {"powerKw": -0.001}),
    ("negative", {"energyKwh": -1}),
    ("negative", {"voltage": -230.0}),
    ("bad_timestamp", {"timestamp": "2026-11-27T06:00:17.123"}),
    ("bad_timestamp", {"timestamp": "2026-11-27 06:00:17Z"}),
    ("bad_timestamp", {"timestamp": "2026-02-29T06:00:17.123Z"}),
    ("bad_timestamp", {"timestamp": "2026-11-27T24:00:17.123Z"}),
    ("bad_timestamp", {"timestamp": "2026-11-27T06:00:60.123Z"}),
    ("bad_timestamp", {"timestamp": "2026-13-27T06:00:17.123Z"}),
    ("bad_timestamp", {"timestamp": "2026-11-27T06:00:17.12xZ"}),
    ("bad_timestamp", {"timestamp": "2026-11-27T06:00:17.123+24:00"}),
    ("bad_timestamp", {"timestamp": "1999-12-31T23:59:59.999Z"}),
    ("bad_timestamp", {"timestamp": "２026-11-27T06:00:17.123Z"}),
    ("future_timestamp", {"timestamp": "2026-11-27T06:05:17.124Z"}),
    ("future_timestamp", {"timestamp": "9999-12-31T23:59:59.999-23:59"}),
]
RAW_MUTATIONS: list[tuple[str, bytes | None]] = [
    ("empty", None),
    ("empty", b""),
    ("oversize", b"{" + b" " * 70_000 + b"}"),
    ("not_json", b"{"),
    ("not_json", b'{"meterId":"a"}}'),
    ("not_json", b"\xff\xfe{}"),
    ("not_json", b"\xef\xbb\xbf{}"),
    ("not_json", json.dumps(BASE).replace("1.5", "NaN").encode()),
    ("not_json", json.dumps(BASE).replace("1.5", "-Infinity").encode()),
    ("not_json", json.dumps(BASE).encode()[:-1] + b',"x":"\xc3"}'),
    ("not_object", b"[]"),
    ("not_object", b'"text"'),
    ("not_object", b"12"),
    ("not_object", b"null"),
    ("not_finite", json.dumps(BASE).replace("1.5", "1e400").encode()),
    ("not_finite", json.dumps(BASE).replace("230", "-1e999").encode()),
    ("not_finite", json.dumps(BASE).replace("1.5", "9" * 400).encode()),
]


def mutate(change: dict[str, Any]) -> bytes:
    obj = dict(BASE)
    for k, v in change.items():
        if v is ...:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj, ensure_ascii=False).encode()


def test_each_rule_rejected_with_its_reason() -> None:
    cases = [(reason, mutate(change)) for reason, change in MUTATIONS] + RAW_MUTATIONS
    values = [v for _, v in cases] + [mutate({})]
    _dec, r, rejects = decode(values)
    got = {x.index: x.reason for x in rejects}
    for i, (reason, v) in enumerate(cases):
        assert got.get(i) == reason, (v, got.get(i), reason)
        assert parse_reading(v, NOW, SKEW) == reason
    assert r.offset.tolist() == [len(cases) + 100]
    assert {x.reason for x in rejects} == set(REASONS) - set(TABLE_REASONS)
    check_against_reference(values)


def test_optional_fields_absent_or_null() -> None:
    values: list[bytes | None] = [
        mutate({"energyKwh": ..., "voltage": ...}),
        mutate({"energyKwh": None, "voltage": None}),
        mutate({"powerKw": 3, "energyKwh": 0, "voltage": 0}),
    ]
    _, r, rejects = decode(values)
    assert rejects == []
    assert r.energy.tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(r.voltage[:2]).all() and r.voltage[2] == 0.0
    assert r.power.tolist() == [1.5, 1.5, 3.0]


def test_fraction_truncated_and_offsets() -> None:
    cases = {
        "2026-11-27T06:00:17Z": 1_795_759_217_000,
        "2026-11-27T06:00:17.9Z": 1_795_759_217_900,
        "2026-11-27T06:00:17.123999999Z": 1_795_759_217_123,
        "2026-11-27T11:30:17.1239+05:30": 1_795_759_217_123,
        "2026-11-27T01:00:17.123-05:00": 1_795_759_217_123,
        "2000-01-01T00:00:00.000Z": 946_684_800_000,
        "2000-01-01T00:00:00.000+00:01": None,
        "2024-02-29T00:00:00.000Z": 1_709_164_800_000,
    }
    for text, want in cases.items():
        assert timestamp_ms(text) == (
            want if text != "2000-01-01T00:00:00.000+00:01" else 946_684_740_000
        )
        assert parse_timestamp_ms(text) == timestamp_ms(text)
        got = parse_reading(mutate({"timestamp": text}), NOW, SKEW)
        if want is None:
            assert got == "bad_timestamp"
        else:
            assert isinstance(got, dict) and got["ts_ms"] == want


@SETTINGS
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_arbitrary_bytes_never_raise(values: list[bytes]) -> None:
    check_against_reference(list(values))


json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def near_valid(draw: st.DrawFn) -> bytes | None:
    """A valid reading with some fields replaced by arbitrary JSON, or its bytes mangled."""
    raw, _ = draw(valid_readings())
    obj = json.loads(raw)
    for key in draw(st.lists(st.sampled_from([*BASE, "x"]), max_size=3)):
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(json_values)
    text = json.dumps(obj).encode()
    if draw(st.integers(0, 5)) == 0:
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.binary(max_size=3)) + text[i + 1 :]
    return text


@SETTINGS
@given(st.lists(st.one_of(near_valid(), st.none()), min_size=1, max_size=20))
def test_near_valid_messages_agree_with_reference(values: list[bytes | None]) -> None:
    check_against_reference(values)


def test_mixed_batch_keeps_input_order_and_interns() -> None:
    values: list[bytes | None] = []
    for i in range(200):
        ts = "2026-11-27T06:00:17.123Z" if i % 3 else "2026-11-27T06:00:17+00:00"
        values.append(mutate({"meterId": f"M{i % 7}", "timestamp": ts, "powerKw": i}))
        if i % 50 == 0:
            values.append(b"garbage")
        if i % 70 == 0:
            values.append(b"")
    dec, r, rejects = decode(values)
    # i = 0 (both), 50, 70, 100, 140, 150
    assert [rj.reason for rj in rejects] == ["not_json", "empty"] * 3 + ["not_json"]
    assert r.power.tolist() == [float(i) for i in range(200)]
    assert len(dec.meters) == 7 and len(dec.regions) == 1
    assert dec.meters.names[int(r.meter[8])] == "M1"


def test_deeply_nested_json_is_rejected_not_raised() -> None:
    """msgspec raises RecursionError past ~1,000 levels; the decoder must reject, not die."""
    dec = Decoder(Interner(), Interner())
    bombs = [b'{"a":' * 5_000 + b"1" + b"}" * 5_000, b"[" * 5_000 + b"]" * 5_000]
    good = (b'{"meterId":"m","region":"r","timestamp":"2026-11-27T06:00:00Z",'
            b'"powerKw":1}')
    readings, rejects = dec.decode([bombs[0], good, bombs[1]], np.zeros(3, np.int32),
                                   np.arange(3, dtype=np.int64), 1_795_763_000_000)
    assert len(readings) == 1 and readings.offset.tolist() == [1]
    assert [(r.index, r.reason) for r in rejects] == [(0, "not_json"), (2, "not_json")]


# a database of the original stack: meter_id VARCHAR(50), region VARCHAR(100); and narrower
ORIGINAL = (50, 100)


def test_names_longer_than_the_table_holds_are_rejected_after_the_contract() -> None:
    """A reading valid by the contract whose meter id (1-64) or region does not fit the
    database's column gets a reason of its own; a contract rule broken comes first. The
    same name is judged the same in every batch and every position of one (never
    interned), on both paths; trailing spaces count (PostgreSQL would cut them silently)."""
    long_id = "M" * 60
    values: list[bytes | None] = [
        mutate({"meterId": long_id}),
        mutate({"meterId": "M" * 50}),
        mutate({"meterId": long_id, "powerKw": -1}),  # the contract first: negative
        mutate({"meterId": "M" * 51}),
        mutate({"meterId": "M" * 49 + "é"}),  # 50 characters, 51 bytes: fits
        mutate({"meterId": "M" * 50 + " "}),
        mutate({"meterId": "é" * 60}),
        mutate({"meterId": long_id}),
        mutate({}),
    ]
    for limits in (ORIGINAL, (50, None)):
        dec, r, rejects = decode(values + values, limits=limits)
        assert [(x.index % 9, x.reason) for x in rejects] == [
            (0, "meter_id_too_long_for_table"), (2, "negative"),
            (3, "meter_id_too_long_for_table"), (5, "meter_id_too_long_for_table"),
            (6, "meter_id_too_long_for_table"), (7, "meter_id_too_long_for_table")] * 2
        assert rejects[0].detail == ("meterId has 60 characters; the database's meter_id "
                                     "column holds at most 50")
        assert (r.offset - 100).tolist() == [1, 4, 8, 10, 13, 17]
        assert sorted(dec.meters.names) == sorted({"M" * 50, "M" * 49 + "é", "MTR-1"})
        check_against_reference(values + values, limits=limits)
    # the same messages on a database with TEXT columns: all stored but the negative one
    _, r, rejects = decode(values)
    assert [(x.index, x.reason) for x in rejects] == [(2, "negative")]
    # a region too long for a narrower column; the meter id is judged first
    regions: list[bytes | None] = [mutate({"region": "r" * 21}),
                                   mutate({"region": "r" * 21, "meterId": "M" * 11}),
                                   mutate({"region": "r" * 20})]
    _, r, rejects = decode(regions, limits=(10, 20))
    assert [(x.index, x.reason) for x in rejects] == [(0, "region_too_long_for_table"),
                                                     (1, "meter_id_too_long_for_table")]
    assert rejects[0].detail == ("region has 21 characters; the database's region column "
                                 "holds at most 20")
    check_against_reference(regions, limits=(10, 20))


table_limits = st.tuples(st.one_of(st.none(), st.integers(1, 70)),
                         st.one_of(st.none(), st.integers(1, 110)))


@SETTINGS
@given(st.lists(st.one_of(valid_readings().map(lambda x: x[0]), near_valid()), min_size=1,
                max_size=20), table_limits)
def test_table_limits_decode_like_reference(values: list[bytes | None],
                                            limits: tuple[int | None, int | None]) -> None:
    """Whatever the column lengths, both paths give the reference's verdicts and values."""
    check_against_reference(values, limits=limits)
    check_against_reference(values + values, limits=limits)  # names seen once already


# --------------------------------------------------------------------- the native path

native = pytest.mark.skipif(not NATIVE, reason="segs.intake._fastscan not built (no C compiler)")


def test_native_path_is_built_where_a_compiler_is() -> None:
    """pyproject.toml marks the extension optional (an install without a compiler still
    works); here, with one, a silent fallback to Python would hide a build break."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert NATIVE, "segs.intake._fastscan failed to build: see the pip install output"


def scan(values: list[bytes | None],
         limits: tuple[int, int] = (64, 100)) -> list[tuple[int, Any]]:
    """(index, (meter, region, ts, power, energy, voltage)) of every value the C pass
    accepts."""
    meters, regions = Interner(), Interner()
    acc, (meter, region, ts, power, energy, voltage) = native_scan(
        values, 65536, MIN_TS_MS, NOW + SKEW, meters, regions, meter_id_max=limits[0],
        region_max=limits[1])
    return [(i, (meters.names[meter[i]], regions.names[region[i]], int(ts[i]), power[i],
                 energy[i], voltage[i]))
            for i in np.flatnonzero(acc).tolist()]


def bits(x: float) -> bytes:
    return np.float64(x).tobytes()


def check_native_against_exact(values: list[bytes | None],
                               limits: tuple[int, int] = (64, 100)) -> None:
    """Whatever the C pass accepts, the exact path accepts with the same values (floats bit
    for bit); and it accepts every plain valid reading."""
    for i, (meter, region, ts, power, energy, voltage) in scan(values, limits):
        v = values[i]
        assert v is not None
        want = _exact(v, NOW + SKEW, SKEW, meter_id_max=limits[0], region_max=limits[1])
        assert len(want) == 6, (v, want)
        assert (meter, region, ts) == want[:3], v
        assert [bits(power), bits(energy), bits(voltage)] == [bits(x) for x in want[3:]], v


@native
@SETTINGS
@given(st.lists(st.one_of(near_valid(), st.binary(max_size=120), st.none()), max_size=20))
def test_native_accepts_only_what_the_exact_path_accepts(values: list[bytes | None]) -> None:
    check_native_against_exact(values)


@native
@SETTINGS
@given(st.lists(st.one_of(near_valid(), valid_readings().map(lambda x: x[0])), max_size=20),
       st.tuples(st.integers(1, 64), st.integers(1, 100)))
def test_native_accepts_only_names_the_table_holds(values: list[bytes | None],
                                                   limits: tuple[int, int]) -> None:
    check_native_against_exact(values, limits)


# number texts around the C pass's two conversions: the exact fast one (≤ 2^53, |10^k| ≤ 22)
# and Python's correctly rounded one beyond
number_texts = st.builds(
    lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
    st.sampled_from(["", "-"]),
    st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,24}", fullmatch=True)),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,25}", fullmatch=True)),
    st.one_of(st.just(""), st.builds(lambda e, k: f"{e}{k}", st.sampled_from(
        ["e", "E", "e+", "e-", "E-"]), st.integers(0, 40))),
)


@native
@SETTINGS
@given(st.lists(st.one_of(number_texts, st.floats(0, 1e13).map(repr)), min_size=1,
                max_size=20))
def test_native_numbers_equal_python_float(texts: list[str]) -> None:
    values: list[bytes | None] = [
        (f'{{"meterId":"m","region":"r","timestamp":"2026-11-27T06:00:17.123Z",'
         f'"powerKw":{t},"energyKwh":{t},"voltage":{t}}}').encode() for t in texts]
    accepted = dict(scan(values))
    for i, t in enumerate(texts):
        f = float(json.loads(t))  # JSON -0 is the integer 0: +0.0
        valid = f == 0 or 1e-12 <= f <= 1e12
        assert (i in accepted) == valid, t
        if valid:
            assert bits(accepted[i][3]) == bits(f), t
    check_native_against_exact(values)


@native
def test_native_declines_what_it_does_not_read_plainly() -> None:
    """Escapes, non-ASCII, duplicates, deep nesting: declined, and then decoded exactly."""
    base = json.dumps(BASE)
    values: list[bytes | None] = [
        base.replace('"MTR-1"', '"MTR\\u002d1"').encode(),  # escape in a known field
        base.replace('"MTR-1"', '"MTR-é"').encode(),  # non-ASCII
        base.replace('{"meterId"', '{"meterId": "x", "meterId"').encode(),  # duplicate
        base.replace('{"meterId"', '{"x":' + "[" * 40 + "]" * 40 + ', "meterId"').encode(),
        base.replace('{"meterId"', '{"x\\n": 1, "meterId"').encode(),  # escape in a key
        base.replace('{"meterId"', '{"x": ["a\\"b\\u00e9"], "meterId"').encode(),  # read
        base.encode(),
    ]
    assert [i for i, _ in scan(values)] == [5, 6]
    check_against_reference(values)
