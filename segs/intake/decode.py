"""Validating decoder: Kafka message values → :class:`~segs.intake.readings.Readings` + rejects.

Native path (``segs/intake/_fastscan.c``, built at install when a C compiler is there): one C pass
over the batch accepts every value that is a plain valid reading — ASCII, no escapes in the
known fields, every rule below met — straight into the columns, and declines everything
else to the Python paths below. It never rejects, so reject reasons still come from one
place; a differential property test holds it to the exact path (accepted ⇒ the exact path
accepts the same values).

Python fast path, per batch:

1. size/emptiness checks per value;
2. one ``msgspec`` decode per value into a constrained ``Struct`` (unknown fields skipped
   in C); a value that fails it, or that is not valid UTF-8, goes to the exact path;
3. timestamps of the common fixed shape ``YYYY-MM-DDTHH:MM:SS.sssZ`` parsed vectorised
   from one byte buffer; any other shape goes through :func:`parse_timestamp_ms`;
4. meter ids and regions interned; names never seen before are checked for characters
   PostgreSQL ``TEXT`` cannot hold (NUL, lone surrogates).

Anything the fast path does not accept is handed to the exact path (:func:`_exact`), a
plain ``json.loads`` validator that checks the fields in a fixed order (``meterId``,
``region``, ``timestamp``, ``powerKw``, ``energyKwh``, ``voltage``) and is the only place
reject reasons come from, so a message gets the same reason whichever path saw it first.

Timestamp rules: ``YYYY-MM-DDTHH:MM:SS[.f+](Z|±HH:MM)`` (ASCII digits, upper-case ``T``
and ``Z``, seconds required, no leap second, any number of fraction digits). Fractions
are *truncated* to milliseconds, which is the floor of the instant because zone offsets
are whole minutes. Instants before 2000-01-01T00:00:00Z are ``bad_timestamp``; instants
more than ``max_future_skew_ms`` after the message's own Kafka timestamp (CreateTime or
LogAppendTime) are ``future_timestamp``.

Every rule is a function of the message alone, never of the worker's clock, so a message
read again after a crash or rebalance is decided the same way.

One more rule comes from the database, not the contract: a database adopted from the
original stack (``schema/V000``) keeps ``VARCHAR`` meter id and region columns, shorter than
the contract allows. The worker reads their lengths once, before it reads any message
(:meth:`segs.checkpoint.sink.Sink.stored_types`), and a reading valid by the contract whose name is
longer is ``meter_id_too_long_for_table`` / ``region_too_long_for_table``, checked after
every rule of the contract. A name that long is never interned, so the fast paths need to
measure only names they have not seen before. A message without a Kafka
timestamp (:data:`NO_TIMESTAMP`: only the pre-0.10 message format has none) has nothing to
be ahead of: the future rule does not apply to it, the others do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import attrgetter
from typing import Annotated, Any, NamedTuple, NoReturn, TypeVar

import msgspec
import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import Interner, Readings

_scan_readings: Callable[..., list[tuple[int, str | None, str | None]]] | None
try:
    from segs.intake._fastscan import scan_readings as _scan_readings
except ImportError:  # built without a C compiler: the Python paths alone, same results
    _scan_readings = None

NATIVE = _scan_readings is not None
_G = TypeVar("_G", bound=np.generic)

OVERSIZE = "oversize"
EMPTY = "empty"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_VALUE = "bad_value"
NOT_FINITE = "not_finite"
NEGATIVE = "negative"
BAD_TIMESTAMP = "bad_timestamp"
FUTURE_TIMESTAMP = "future_timestamp"
METER_ID_TOO_LONG = "meter_id_too_long_for_table"
REGION_TOO_LONG = "region_too_long_for_table"

REASONS: tuple[str, ...] = (
    OVERSIZE,
    EMPTY,
    NOT_JSON,
    NOT_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    BAD_VALUE,
    NOT_FINITE,
    NEGATIVE,
    BAD_TIMESTAMP,
    FUTURE_TIMESTAMP,
    METER_ID_TOO_LONG,
    REGION_TOO_LONG,
)
# the rules of the database's column lengths, not of the contract (see the module docstring)
TABLE_REASONS: tuple[str, ...] = (METER_ID_TOO_LONG, REGION_TOO_LONG)

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
NO_TIMESTAMP = -1  # what confluent-kafka's Message.timestamp() gives for "not available"
_NO_LIMIT = np.iinfo(np.int64).max
# Readings are 0 or within [VALUE_MIN, VALUE_MAX] (1 nW … 1 PW): beyond them no meter
# reports, and sums or averages of such values overflow or underflow PostgreSQL's float8
# arithmetic, which raises instead of giving inf or 0. Outside: bad_value.
VALUE_MIN = 1e-12
VALUE_MAX = 1e12
METER_ID_MAX = 64
REGION_MAX = 100


class Reject(NamedTuple):
    """A message that broke a rule: its position in the batch, reason code, short detail."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, by design
    reason: str
    detail: str


class _Msg(msgspec.Struct, gc=False):
    meterId: Annotated[str, msgspec.Meta(min_length=1, max_length=METER_ID_MAX)]
    region: Annotated[str, msgspec.Meta(min_length=1, max_length=REGION_MAX)]
    timestamp: str
    powerKw: Annotated[float, msgspec.Meta(ge=0)]
    energyKwh: Annotated[float, msgspec.Meta(ge=0)] | None = None
    voltage: Annotated[float, msgspec.Meta(ge=0)] | None = None


# field getters: map(attrgetter) beats a list comprehension on the per-message path
_METER_ID = attrgetter("meterId")
_REGION = attrgetter("region")
_TIMESTAMP = attrgetter("timestamp")
_POWER = attrgetter("powerKw")
_ENERGY = attrgetter("energyKwh")
_VOLTAGE = attrgetter("voltage")


# ---------------------------------------------------------------------------------------
# timestamps

_TS_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})"
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def parse_timestamp_ms(text: str) -> int | None:
    """Milliseconds since the epoch of an ISO-8601 timestamp with zone, or None."""
    m = _TS_RE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7), m.group(8)
    if not 1 <= month <= 12:
        return None
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _DAYS_IN_MONTH[month - 1] + (leap and month == 2):
        return None
    if hour > 23 or minute > 59 or second > 59:
        return None
    offset_min = 0
    if zone != "Z":
        oh, om = int(zone[1:3]), int(zone[4:6])
        if oh > 23 or om > 59:
            return None
        offset_min = (oh * 60 + om) * (-1 if zone[0] == "-" else 1)
    ms = int((frac or "")[:3].ljust(3, "0"))
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return (seconds - offset_min * 60) * 1000 + ms


_FAST_LEN = 24  # 2026-11-27T06:00:17.123Z
_DIGIT_POS = np.array([0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22])
_SEP_POS = np.array([4, 7, 10, 13, 16, 19, 23])
_SEP_CHR = np.frombuffer(b"--T::.Z", np.uint8)
_CUM_DAYS = np.cumsum([0, *_DAYS_IN_MONTH[:-1]]).astype(np.int64)
_MONTH_LEN = np.array([0, *_DAYS_IN_MONTH], np.int64)


def _field_weights() -> NDArray[np.float64]:
    # digit columns (see _DIGIT_POS) → year, month, day, hour, minute, second, milli
    w = np.zeros((len(_DIGIT_POS), 7), np.float64)
    groups = ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14), (14, 17))
    for f, (lo, hi) in enumerate(groups):
        for k in range(lo, hi):
            w[k, f] = 10 ** (hi - 1 - k)
    return w


_WEIGHTS = _field_weights()


def _fast_timestamps(buf: bytes, n: int) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Parse ``n`` concatenated 24-byte ``…SS.sssZ`` timestamps; (ms, ok mask)."""
    a = np.frombuffer(buf, np.uint8).reshape(n, _FAST_LEN)
    d = a[:, _DIGIT_POS] - np.uint8(48)  # non-digits wrap around to > 9
    ok = (d <= 9).all(axis=1) & (a[:, _SEP_POS] == _SEP_CHR).all(axis=1)
    fields = (d.astype(np.float64) @ _WEIGHTS).astype(np.int64)  # exact: < 2**53
    year, month, day, hour, minute, second, milli = fields.T
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    mi = np.clip(month, 1, 12)
    ok &= (month >= 1) & (month <= 12) & (day >= 1) & (day <= _MONTH_LEN[mi] + (leap & (mi == 2)))
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59)
    # days since epoch: whole years (Gregorian) + day of year
    y1 = year - 1
    days = (
        365 * (year - 1970)
        + (y1 // 4 - y1 // 100 + y1 // 400)
        - 477  # leap days before 1970 counted the same way
        + _CUM_DAYS[mi - 1]
        + ((mi > 2) & leap)
        + day
        - 1
    )
    ms: NDArray[np.int64] = ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli
    return ms, ok


# ---------------------------------------------------------------------------------------
# exact path


def _parse_int(text: str) -> int | float:
    # Python refuses int() of > 4300 digits; such numbers are out of float range anyway.
    return float(text) if len(text) > 300 else int(text)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_int=_parse_int, parse_constant=_no_constant)


def _bad_text(s: str) -> bool:
    """True if PostgreSQL TEXT cannot store ``s`` (NUL or a lone surrogate)."""
    if "\x00" in s:
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _Problem(NamedTuple):
    """Why the exact path rejects a value."""

    reason: str
    detail: str


class _Parsed(NamedTuple):
    """The fields of a value the exact path accepts."""

    meter_id: str
    region: str
    ts_ms: int
    power: float
    energy: float
    voltage: float  # NaN when absent


def _string_field(obj: dict[str, Any], name: str, limit: int) -> _Problem | str:
    if name not in obj:
        return _Problem(MISSING_FIELD, f"{name} is missing")
    v = obj[name]
    if not isinstance(v, str):
        return _Problem(WRONG_TYPE, f"{name} must be a string, got {type(v).__name__}")
    if not 1 <= len(v) <= limit:
        return _Problem(BAD_VALUE, f"{name} must have 1-{limit} characters, has {len(v)}")
    if _bad_text(v):
        return _Problem(BAD_VALUE, f"{name} contains NUL or a lone surrogate")
    return v


def _number_field(obj: dict[str, Any], name: str, default: float | None) -> _Problem | float:
    v = obj.get(name)
    if v is None:
        if default is None:
            return _Problem(MISSING_FIELD, f"{name} is missing")
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _Problem(WRONG_TYPE, f"{name} must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        return _Problem(NOT_FINITE, f"{name} is out of range")
    if not math.isfinite(f):
        return _Problem(NOT_FINITE, f"{name} is not finite")
    if f < 0:
        return _Problem(NEGATIVE, f"{name} is negative ({f!r})")
    if f != 0 and not VALUE_MIN <= f <= VALUE_MAX:
        return _Problem(BAD_VALUE, f"{name} {f!r} is outside {VALUE_MIN:g}..{VALUE_MAX:g}")
    return f


def _in_range(a: NDArray[np.float64]) -> NDArray[np.bool_]:
    """0, absent (NaN) or within [VALUE_MIN, VALUE_MAX]."""
    inside: NDArray[np.bool_] = (a == 0) | np.isnan(a) | ((a >= VALUE_MIN) & (a <= VALUE_MAX))
    return inside


def future_limits(kafka_ts_ms: NDArray[np.int64], max_future_skew_ms: int) -> NDArray[np.int64]:
    """The newest event time each message may carry: its Kafka timestamp + the skew, or no
    limit for a message without a timestamp (negative)."""
    kts = np.asarray(kafka_ts_ms, np.int64)
    ahead = np.minimum(kts, _NO_LIMIT - max_future_skew_ms) + max_future_skew_ms
    limits: NDArray[np.int64] = np.where(kts < 0, _NO_LIMIT, ahead)
    return limits


def _exact(value: bytes, max_ts_ms: int, max_future_skew_ms: int, *,
           meter_id_max: int = METER_ID_MAX,
           region_max: int = REGION_MAX) -> _Problem | _Parsed:
    """Validate one message the slow, plain way: the parsed fields or (reason, detail).
    ``max_ts_ms`` is the message's :func:`future_limits` entry; ``meter_id_max`` and
    ``region_max`` the longest names the database stores (the table rules, last)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Problem(NOT_JSON, f"not UTF-8 at byte {e.start}")
    try:
        obj = _JSON.decode(text)
    except (ValueError, RecursionError) as e:
        return _Problem(NOT_JSON, str(e)[:80])
    if not isinstance(obj, dict):
        return _Problem(NOT_OBJECT, f"JSON {type(obj).__name__}, expected an object")
    meter = _string_field(obj, "meterId", METER_ID_MAX)
    if isinstance(meter, _Problem):
        return meter
    region = _string_field(obj, "region", REGION_MAX)
    if isinstance(region, _Problem):
        return region
    if "timestamp" not in obj:
        return _Problem(MISSING_FIELD, "timestamp is missing")
    ts = obj["timestamp"]
    if not isinstance(ts, str):
        return _Problem(WRONG_TYPE, f"timestamp must be a string, got {type(ts).__name__}")
    ts_ms = parse_timestamp_ms(ts)
    if ts_ms is None:
        return _Problem(BAD_TIMESTAMP, f"timestamp {ts[:40]!r} is not ISO-8601 with zone")
    if ts_ms < MIN_TS_MS:
        return _Problem(BAD_TIMESTAMP, f"timestamp {ts[:40]!r} is before 2000-01-01")
    if ts_ms > max_ts_ms:
        ahead = ts_ms - (max_ts_ms - max_future_skew_ms)
        return _Problem(FUTURE_TIMESTAMP, f"timestamp {ts[:40]!r} is {ahead} ms ahead of the "
                                          "message's Kafka timestamp")
    power = _number_field(obj, "powerKw", None)
    if isinstance(power, _Problem):
        return power
    energy = _number_field(obj, "energyKwh", 0.0)
    if isinstance(energy, _Problem):
        return energy
    voltage = _number_field(obj, "voltage", math.nan)
    if isinstance(voltage, _Problem):
        return voltage
    if len(meter) > meter_id_max:
        return _Problem(METER_ID_TOO_LONG, f"meterId has {len(meter)} characters; the database's "
                                           f"meter_id column holds at most {meter_id_max}")
    if len(region) > region_max:
        return _Problem(REGION_TOO_LONG, f"region has {len(region)} characters; the database's "
                                         f"region column holds at most {region_max}")
    return _Parsed(meter, region, ts_ms, power, energy, voltage)


class _Columns(NamedTuple):
    """Decoded fields of some batch positions, names as interner slots."""

    meter: NDArray[np.int32]
    region: NDArray[np.int32]
    ts_ms: NDArray[np.int64]
    power: NDArray[np.float64]
    energy: NDArray[np.float64]
    voltage: NDArray[np.float64]

    def take(self, index: NDArray[np.intp]) -> _Columns:
        return _Columns(self.meter[index], self.region[index], self.ts_ms[index],
                        self.power[index], self.energy[index], self.voltage[index])


def _interleave(a_index: NDArray[np.intp], a: _Columns, b_index: NDArray[np.intp],
                b: _Columns) -> tuple[NDArray[np.intp], _Columns]:
    """Columns of two disjoint sets of batch positions, merged back into batch order."""
    index = np.concatenate([a_index, b_index])
    order = np.argsort(index, kind="stable")
    return index[order], _Columns(
        np.concatenate([a.meter, b.meter])[order], np.concatenate([a.region, b.region])[order],
        np.concatenate([a.ts_ms, b.ts_ms])[order], np.concatenate([a.power, b.power])[order],
        np.concatenate([a.energy, b.energy])[order],
        np.concatenate([a.voltage, b.voltage])[order])


def native_scan(values: Sequence[bytes | None], max_bytes: int, min_ts_ms: int,
                max_ts_ms: int, meters: Interner, regions: Interner, *,
                meter_id_max: int = METER_ID_MAX,
                region_max: int = REGION_MAX) -> tuple[NDArray[np.bool_], _Columns]:
    """The C pass (``segs/intake/_fastscan.c``) over a batch: which values it accepted, and the
    columns of every position (meaningful only where accepted), names interned. A value
    whose new name is longer than ``meter_id_max`` / ``region_max`` is declined (names are
    ASCII there, so characters are bytes)."""
    assert _scan_readings is not None
    n = len(values)
    accepted = np.empty(n, np.bool_)
    cols = _Columns(np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int64),
                    np.empty(n, np.float64), np.empty(n, np.float64), np.empty(n, np.float64))
    meter, region = cols.meter, cols.region
    fresh = _scan_readings(values, max_bytes, min_ts_ms, max_ts_ms, meters.index,
                           regions.index, accepted, *cols)
    for i, meter_id, region_name in fresh:  # names seen for the first time (ASCII)
        if ((meter_id is not None and len(meter_id) > meter_id_max)
                or (region_name is not None and len(region_name) > region_max)):
            accepted[i] = False  # never interned: the exact path gives the reason
            continue
        if meter_id is not None:
            meter[i] = meters.slot(meter_id)
        if region_name is not None:
            region[i] = regions.slot(region_name)
    return accepted, cols


def _pick(a: NDArray[_G], index: NDArray[np.intp] | None) -> NDArray[_G]:
    """``a[index]``; all of ``a`` (not a copy) when ``index`` is None."""
    return a if index is None else a[index]


# ---------------------------------------------------------------------------------------


class Decoder:
    """Decodes batches of raw message values into columns, interning ids and regions."""

    def __init__(
        self,
        meters: Interner,
        regions: Interner,
        *,
        max_message_bytes: int = 65536,
        max_future_skew_ms: int = 300_000,
        meter_id_max: int | None = None,
        region_max: int | None = None,
        native: bool = True,
    ) -> None:
        """``meter_id_max`` / ``region_max``: the longest names the database's columns hold
        (:meth:`segs.checkpoint.sink.Sink.stored_types`), None for no limit below the contract's."""
        self.meters = meters
        self.regions = regions
        self.max_message_bytes = max_message_bytes
        self.max_future_skew_ms = max_future_skew_ms
        self.meter_id_max = min(METER_ID_MAX, meter_id_max or METER_ID_MAX)
        self.region_max = min(REGION_MAX, region_max or REGION_MAX)
        self._decode_one = msgspec.json.Decoder(_Msg).decode
        self._native = native and NATIVE

    def decode(
        self,
        values: Sequence[bytes | None],
        partitions: NDArray[np.int32],
        offsets: NDArray[np.int64],
        kafka_ts_ms: NDArray[np.int64] | int,
    ) -> tuple[Readings, list[Reject]]:
        """Valid readings in input order, and one :class:`Reject` per invalid value.

        ``kafka_ts_ms``: each message's Kafka timestamp (:data:`NO_TIMESTAMP` for none), or
        one for the whole batch."""
        kts = np.broadcast_to(np.asarray(kafka_ts_ms, np.int64), (len(values),))
        limits = future_limits(kts, self.max_future_skew_ms)
        if self._native:
            index, cols, rejects = self._decode_native(values, limits)
        else:
            index, cols, rejects = self._decode_python(values, limits)
        readings = Readings(
            meter=cols.meter,
            region=cols.region,
            ts_ms=cols.ts_ms,
            power=cols.power,
            energy=cols.energy,
            voltage=cols.voltage,
            partition=_pick(np.asarray(partitions, np.int32), index),
            offset=_pick(np.asarray(offsets, np.int64), index),
        )
        return readings, rejects

    def _decode_native(
        self, values: Sequence[bytes | None], limits: NDArray[np.int64]
    ) -> tuple[NDArray[np.intp] | None, _Columns, list[Reject]]:
        """The C pass, then the Python paths for the values it declined. The C pass takes
        one bound for the batch (the loosest); each message's own is applied after it."""
        accepted, cols = native_scan(values, self.max_message_bytes, MIN_TS_MS,
                                     int(limits.max(initial=MIN_TS_MS)), self.meters,
                                     self.regions, meter_id_max=self.meter_id_max,
                                     region_max=self.region_max)
        accepted &= cols.ts_ms <= limits
        if accepted.all():
            return None, cols, []
        rest = np.flatnonzero(~accepted)
        sub_index, sub_cols, sub_rejects = self._decode_python(
            [values[i] for i in rest.tolist()], limits[rest])
        rejects = [Reject(int(rest[r.index]), r.reason, r.detail) for r in sub_rejects]
        keep = np.flatnonzero(accepted)
        sub = rest if sub_index is None else rest[sub_index]
        index, merged = _interleave(keep, cols.take(keep), sub, sub_cols)
        return index, merged, rejects

    def _decode_python(
        self, values: Sequence[bytes | None], limits: NDArray[np.int64]
    ) -> tuple[NDArray[np.intp] | None, _Columns, list[Reject]]:
        """msgspec per value, then the exact path: (indices of the valid values or None for
        all, their columns, rejects in input order)."""
        rejects: list[Reject] = []
        slow: list[int] = []  # indices for the exact path
        fast = self._decode_fast(values, rejects, slow)
        if fast is not None:
            msgs, index = fast
        else:
            idx, msgs = self._decode_each(values, rejects, slow)
            index = np.array(idx, np.intp)

        ok, meter, region, ts = self._columns(msgs, _pick(limits, index))
        power = np.fromiter(map(_POWER, msgs), np.float64, len(msgs))
        energy = np.array(list(map(_ENERGY, msgs)), np.float64)  # None → NaN
        voltage = np.array(list(map(_VOLTAGE, msgs)), np.float64)
        ok &= _in_range(power) & _in_range(energy) & _in_range(voltage)
        if not ok.all():
            if index is None:
                index = np.arange(len(msgs), dtype=np.intp)
            bad = np.flatnonzero(~ok)
            slow.extend(index[bad].tolist())
            keep = np.flatnonzero(ok)
            index, meter, region, ts = index[keep], meter[keep], region[keep], ts[keep]
            power, energy, voltage = power[keep], energy[keep], voltage[keep]
        energy[np.isnan(energy)] = 0.0

        cols = _Columns(meter, region, ts, power, energy, voltage)
        if slow:
            extra = self._exact_batch(values, sorted(slow), limits, rejects)
            if extra is not None:
                assert index is not None  # set wherever `slow` was filled
                index, cols = _interleave(index, cols, *extra)
            rejects.sort(key=lambda r: r.index)
        return index, cols, rejects

    # -----------------------------------------------------------------------------------

    def _decode_fast(
        self, values: Sequence[bytes | None], rejects: list[Reject], slow: list[int]
    ) -> tuple[list[_Msg], NDArray[np.intp] | None] | None:
        """Decode the batch in one C-level pass: (structs, their indices or None for all).

        A value msgspec refuses costs one exception: ``list.extend`` keeps what it appended
        before the failing value, so the index of the failure is known and decoding resumes
        after it (the exact path judges it later). None when some value needs individual
        attention first (None, oversize, non-ASCII: the UTF-8 of skipped fields is not
        checked by msgspec)."""
        try:
            if max(map(len, values), default=0) > self.max_message_bytes:  # type: ignore[arg-type]
                return None
            if not all(map(bytes.isascii, values)):  # type: ignore[arg-type]
                return None
        except TypeError:  # a None value
            return None
        msgs: list[_Msg] = []
        failed: list[int] = []
        rest = iter(values)
        dec = self._decode_one
        while True:
            try:
                msgs.extend(map(dec, rest))  # type: ignore[arg-type]
                break
            except (msgspec.MsgspecError, RecursionError):  # deep nesting: exact path says
                failed.append(len(msgs) + len(failed))
        if len(msgs) + len(failed) != len(values):  # extend did not keep its progress
            return None
        if not failed:
            return msgs, None
        for i in failed:
            if values[i]:
                slow.append(i)
            else:
                rejects.append(Reject(i, EMPTY, "empty value"))
        keep = np.ones(len(values), np.bool_)
        keep[failed] = False
        return msgs, np.flatnonzero(keep)

    def _decode_each(
        self, values: Sequence[bytes | None], rejects: list[Reject], slow: list[int]
    ) -> tuple[list[int], list[_Msg]]:
        """Decode value by value: size and emptiness rejects, exact-path candidates."""
        idx: list[int] = []
        msgs: list[_Msg] = []
        dec = self._decode_one
        limit = self.max_message_bytes
        for i, v in enumerate(values):
            if not v:
                rejects.append(Reject(i, EMPTY, "empty value"))
                continue
            if len(v) > limit:
                rejects.append(Reject(i, OVERSIZE, f"{len(v)} bytes > {limit}"))
                continue
            if not v.isascii():
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    slow.append(i)
                    continue
            try:
                msgs.append(dec(v))
            except (msgspec.MsgspecError, RecursionError):  # deep nesting: the exact path says
                slow.append(i)
                continue
            idx.append(i)

        return idx, msgs

    @staticmethod
    def _intern(msgs: list[_Msg], field: attrgetter[str], interner: Interner,
                longest: int) -> tuple[NDArray[np.int32], bool]:
        """Slots of a string field (-1 where the name cannot be stored: bad text, or longer
        than ``longest``), and whether any is -1."""
        slots = np.fromiter(map(interner.index.get, map(field, msgs), repeat(-1)), np.int32,
                            len(msgs))
        missing = np.flatnonzero(slots < 0)
        if missing.size == 0:
            return slots, False
        bad = False
        for j in missing.tolist():
            name = field(msgs[j])
            if len(name) > longest or _bad_text(name):
                bad = True
            else:
                slots[j] = interner.slot(name)
        return slots, bad

    def _columns(
        self, msgs: list[_Msg], limits: NDArray[np.int64]
    ) -> tuple[NDArray[np.bool_], NDArray[np.int32], NDArray[np.int32], NDArray[np.int64]]:
        """Intern ids and parse timestamps; ``ok`` is False where the exact path must judge."""
        n = len(msgs)
        meter, bad_m = self._intern(msgs, _METER_ID, self.meters, self.meter_id_max)
        region, bad_r = self._intern(msgs, _REGION, self.regions, self.region_max)
        ok = np.ones(n, np.bool_)
        if bad_m:
            ok &= meter >= 0
        if bad_r:
            ok &= region >= 0
        stamps = list(map(_TIMESTAMP, msgs))
        lengths = np.fromiter(map(len, stamps), np.int64, n)
        fast = lengths == _FAST_LEN
        ts = np.zeros(n, np.int64)
        if fast.all():
            joined = "".join(stamps)
            if joined.isascii():
                ts, ok_ts = _fast_timestamps(joined.encode("ascii"), n)
                ok &= ok_ts
            else:
                fast[:] = False
        elif fast.any():
            sel = np.flatnonzero(fast)
            joined = "".join([stamps[j] for j in sel.tolist()])
            if joined.isascii():
                ts_f, ok_f = _fast_timestamps(joined.encode("ascii"), len(sel))
                ts[sel] = ts_f
                ok[sel] &= ok_f
            else:
                fast[:] = False
        if not fast.all():
            for j in np.flatnonzero(~fast).tolist():
                t = parse_timestamp_ms(stamps[j])
                if t is None:
                    ok[j] = False
                else:
                    ts[j] = t
        ok &= (ts >= MIN_TS_MS) & (ts <= limits)
        return ok, meter, region, ts

    def _exact_batch(
        self,
        values: Sequence[bytes | None],
        slow: list[int],
        limits: NDArray[np.int64],
        rejects: list[Reject],
    ) -> tuple[NDArray[np.intp], _Columns] | None:
        """Run the exact path on ``slow`` indices: append rejects, return the indices and
        columns of the valid ones."""
        rows: list[tuple[int, int, int, int, float, float, float]] = []
        for i in slow:
            v = values[i]
            assert v is not None
            r = _exact(v, int(limits[i]), self.max_future_skew_ms,
                       meter_id_max=self.meter_id_max, region_max=self.region_max)
            if isinstance(r, _Problem):
                rejects.append(Reject(i, r.reason, r.detail))
                continue
            rows.append((i, self.meters.slot(r.meter_id), self.regions.slot(r.region), r.ts_ms,
                         r.power, r.energy, r.voltage))
        if not rows:
            return None
        cols = list(zip(*rows, strict=True))
        return np.array(cols[0], np.intp), _Columns(
            np.array(cols[1], np.int32),
            np.array(cols[2], np.int32),
            np.array(cols[3], np.int64),
            np.array(cols[4], np.float64),
            np.array(cols[5], np.float64),
            np.array(cols[6], np.float64),
        )
