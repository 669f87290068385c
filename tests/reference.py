"""Slow, plain reference implementations of the contract (docs/contract.md), for tests only.

Dependency-free on purpose: ``json`` + ``datetime`` + ``re``. Fields are checked in the
order meterId, region, timestamp, powerKw, energyKwh, voltage; the first rule broken gives
the reason code (the same codes and order as ``segs.intake.decode``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z

_TS = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def timestamp_ms(text: str) -> int | None:
    """Epoch ms of ``YYYY-MM-DDTHH:MM:SS[.f+](Z|±HH:MM)``, fraction truncated; or None."""
    m = _TS.fullmatch(text)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7) or ".", m.group(8)
    try:
        local = datetime(y, mo, d, h, mi, s, tzinfo=UTC)
    except ValueError:
        return None
    offset = timedelta(0)
    if zone != "Z":
        oh, om = int(zone[1:3]), int(zone[4:6])
        if oh > 23 or om > 59:
            return None
        offset = timedelta(hours=oh, minutes=om) * (1 if zone[0] == "+" else -1)
    millis = int((frac[1:] + "000")[:3])
    delta = (local - EPOCH) - offset  # timedelta arithmetic cannot overflow at year 9999
    return (delta.days * 86400 + delta.seconds) * 1000 + millis


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _int(text: str) -> int | float:
    return float(text) if len(text) > 300 else int(text)


def _string(obj: dict[str, Any], name: str, longest: int) -> str | tuple[str]:
    if name not in obj:
        return ("missing_field",)
    v = obj[name]
    if not isinstance(v, str):
        return ("wrong_type",)
    if not 1 <= len(v) <= longest or "\x00" in v:
        return ("bad_value",)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return ("bad_value",)
    return v


def _number(obj: dict[str, Any], name: str, absent: float | None) -> float | tuple[str]:
    v = obj.get(name)
    if v is None:
        return ("missing_field",) if absent is None else absent
    if type(v) is bool or not isinstance(v, int | float):
        return ("wrong_type",)
    try:
        f = float(v)
    except OverflowError:
        return ("not_finite",)
    if math.isnan(f) or math.isinf(f):
        return ("not_finite",)
    if f < 0:
        return ("negative",)
    if f != 0 and not 1e-12 <= f <= 1e12:  # no meter reads that; PostgreSQL sums overflow
        return ("bad_value",)
    return f


def parse_reading(
    value: bytes | None,
    kafka_ts_ms: int | None,
    max_future_skew_ms: int = 300_000,
    max_message_bytes: int = 65536,
    meter_id_max: int | None = None,
    region_max: int | None = None,
) -> dict[str, Any] | str:
    """A dict (meter_id, region, ts_ms, power, energy, voltage) or a reason code.

    ``kafka_ts_ms`` is the message's Kafka timestamp (None or negative: it has none, and
    the future rule does not apply): a function of the message alone, like every rule.
    ``meter_id_max`` / ``region_max``: the longest names the database's columns hold (None:
    no limit), judged after every rule of the contract."""
    if not value:
        return "empty"
    if len(value) > max_message_bytes:
        return "oversize"
    try:
        obj = json.loads(value.decode("utf-8"), parse_constant=_no_constant, parse_int=_int)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "not_json"
    if not isinstance(obj, dict):
        return "not_object"
    meter = _string(obj, "meterId", 64)
    if isinstance(meter, tuple):
        return meter[0]
    region = _string(obj, "region", 100)
    if isinstance(region, tuple):
        return region[0]
    if "timestamp" not in obj:
        return "missing_field"
    if not isinstance(obj["timestamp"], str):
        return "wrong_type"
    ts = timestamp_ms(obj["timestamp"])
    if ts is None or ts < MIN_TS_MS:
        return "bad_timestamp"
    if kafka_ts_ms is not None and kafka_ts_ms >= 0 and ts > kafka_ts_ms + max_future_skew_ms:
        return "future_timestamp"
    fields: dict[str, Any] = {"meter_id": meter, "region": region, "ts_ms": ts}
    for key, name, absent in (
        ("power", "powerKw", None),
        ("energy", "energyKwh", 0.0),
        ("voltage", "voltage", math.nan),
    ):
        f = _number(obj, name, absent)
        if isinstance(f, tuple):
            return f[0]
        fields[key] = f
    if meter_id_max is not None and len(meter) > meter_id_max:
        return "meter_id_too_long_for_table"
    if region_max is not None and len(region) > region_max:
        return "region_too_long_for_table"
    return fields


@dataclass(frozen=True)
class RefAgg:
    count: int
    power_sum: float
    avg: float
    max: float
    min: float
    energy_sum: float
    region: str
    partition: int | None
    voltage_sum: float = 0.0  # of the readings that carried a voltage
    voltage_count: int = 0

    @property
    def voltage_avg(self) -> float | None:
        return self.voltage_sum / self.voltage_count if self.voltage_count else None


def aggregate(readings: Iterable[dict[str, Any]], size_s: int) -> dict[tuple[str, int], RefAgg]:
    """(meter_id, window_start_ms) → aggregate, computed in one pass over all readings.

    Region (and partition, when the dicts have a ``partition`` key) come from the reading
    greatest by (ts_ms, region, partition).
    """
    size_ms = size_s * 1000
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in readings:
        start = (r["ts_ms"] // size_ms) * size_ms
        groups.setdefault((r["meter_id"], start), []).append(r)
    out: dict[tuple[str, int], RefAgg] = {}
    for key, rs in groups.items():
        powers = [r["power"] for r in rs]
        latest = max(rs, key=lambda r: (r["ts_ms"], r["region"], r.get("partition", 0)))
        total = sum(powers)
        out[key] = RefAgg(
            count=len(rs),
            power_sum=total,
            avg=total / len(rs),
            max=max(powers),
            min=min(powers),
            energy_sum=sum(r["energy"] for r in rs),
            region=latest["region"],
            partition=latest.get("partition"),
            voltage_sum=sum(v for r in rs if not math.isnan(v := r.get("voltage", math.nan))),
            voltage_count=sum(not math.isnan(r.get("voltage", math.nan)) for r in rs),
        )
    return out


def distinct(readings: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first reading of every identity (meter_id, ts_ms), in the given order: what is
    counted with DEDUPLICATE on (docs/contract.md, "Re-sent readings")."""
    seen: set[tuple[str, int]] = set()
    out = []
    for r in readings:
        identity = (r["meter_id"], r["ts_ms"])
        if identity not in seen:
            seen.add(identity)
            out.append(r)
    return out


@dataclass
class RefBaseline:
    baseline: float = 0.0
    samples: int = 0
    last: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("outage", "spike", "drop"), -(2**62)))


def detect(readings: Iterable[dict[str, Any]], *, spike: float = 1.0, drop: float = 0.5,
           min_samples: int = 10, cooldown_ms: int = 300_000,
           state: dict[str, RefBaseline] | None = None) -> list[tuple[str, int, str, str]]:
    """Alerts of the contract's rules, one reading at a time, in the given order.

    Returns (meter_id, ts_ms, kind, severity) per alert; ``state`` (meter → baseline) is
    updated in place so a caller can continue a run.
    """
    meters = {} if state is None else state
    out: list[tuple[str, int, str, str]] = []
    for r in readings:
        m = meters.setdefault(r["meter_id"], RefBaseline())
        power, ts = r["power"], r["ts_ms"]
        if m.samples == 0:
            m.baseline, m.samples = power, 1
            continue
        if m.samples >= min_samples:
            b = m.baseline
            change = (power - b) / max(b, 0.1)
            found: tuple[str, str] | None = None
            if power < 0.1 and b > 1.0:
                found = ("outage", "high")
            elif change > spike:
                found = ("spike", "high" if change > 2.0 else "medium")
            elif change < -drop:
                found = ("drop", "medium" if change < -0.8 else "low")
            if found and ts - m.last[found[0]] >= cooldown_ms:
                m.last[found[0]] = ts
                out.append((r["meter_id"], ts, *found))
        m.baseline = 0.8 * m.baseline + 0.2 * power
        m.samples += 1
    return out


@dataclass(frozen=True)
class RefRegional:
    """One region-window of the regional topic and table, as the contract defines it."""

    meter_count: int
    total: float
    avg: float
    max: float
    min: float
    load: float
    meters: tuple[str, ...]  # sorted by code point


def to_fixed_2(x: float) -> float:
    """JavaScript's ``parseFloat(x.toFixed(2))`` for x ≥ 0: the n with n/100 nearest to the
    exact value of x, the larger on a tie, as the nearest double."""
    from fractions import Fraction

    n = math.floor(Fraction(x) * 100 + Fraction(1, 2))
    return float(Fraction(n, 100))


def regional(per_meter: dict[tuple[str, int], RefAgg], capacities: dict[str, float],
             default_kw: float = 1_000_000.0) -> dict[tuple[str, int], RefRegional]:
    """(region, window_start_ms) → the regional figures of 1-minute ``per_meter`` aggregates:
    the total is the exact sum of the per-meter averages, rounded once."""
    from fractions import Fraction

    groups: dict[tuple[str, int], list[tuple[str, RefAgg]]] = {}
    for (meter, start), agg in per_meter.items():
        groups.setdefault((agg.region, start), []).append((meter, agg))
    out: dict[tuple[str, int], RefRegional] = {}
    for (region, start), members in groups.items():
        avgs = [a.power_sum / a.count for _, a in members]
        total = float(sum(map(Fraction, avgs), Fraction(0)))
        out[(region, start)] = RefRegional(
            meter_count=len(members), total=total, avg=total / len(members),
            max=max(a.max for _, a in members), min=min(avgs),
            load=to_fixed_2(total / capacities.get(region, default_kw) * 100),
            meters=tuple(sorted(m for m, _ in members)))
    return out
