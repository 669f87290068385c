"""Meter-reading simulator: deterministic, fast synthetic traffic for the ``raw_readings`` topic.

Model
=====
``meters`` meters, each with a base load (1.5–5 kW), a region, a firmware, a signal level and
a fixed *phase* inside the reading interval. Round ``r`` is one reading of every meter, at
event time ``start_ms + r * interval_ms + phase``; within a round meters go in phase order, so
the valid stream is in event-time order. ``seq`` is ``r + 1``. Messages are keyed by meter id
and carry compact JSON in the original simulator's field order (see :data:`EXAMPLE`).

Everything is drawn from one ``numpy`` generator seeded by ``seed``: the same options give the
same messages, whatever the machine, rate or wall clock (except the default ``start_ms``,
which follows the clock).

Anomalies (``anomaly_fraction`` of the fresh readings, as far as the spacing allows)
=====================================================================================
The simulator folds every reading the detector will fold (the reading itself, its
duplicates, its late copy) into its own copy of the detector's baseline
(``b ← 0.8·b + 0.2·power``), so it knows the baseline each reading is checked against:

* an anomaly goes only on a meter's reading ``r >= 12``, at least 600 s of event time and 12
  readings after the meter's previous one, when the baseline is within ±10 % of the base load;
* spike = 3–5 × base, drop = 0.25–0.4 × base, outage = 0.0 kW; each is checked against the
  baseline (with a margin) and dropped if it would not fire;
* every normal reading stays within 0.8–1.2 × base *and* within
  ``[0.5·1.03·baseline, 2·0.97·baseline]``, so it never fires (this matters right after an
  anomaly, when the baseline is pulled to 0.72–1.88 × base).

So each injected anomaly gives exactly one alert with the detector's defaults (MIN_SAMPLES
10, +100 % / −50 %, outage < 0.1 kW with baseline > 1 kW, cooldown 300 s).

Disorder (fractions of all messages)
====================================
* ``duplicate``: the same key and value bytes again, 0–16 positions later;
* ``late``: the same reading values with a new readingId and an event time 70 s – 60 min in
  the past (the 1-minute window it falls in is closed), 0–16 positions later;
* ``invalid``: a broken message (:data:`INVALID_VARIANTS`), 0–16 positions later;
* ``out_of_order``: a fresh reading moved 1–8 positions later (never past a reading of the
  same meter; with very few meters it may not move and then stays ``valid``).
Anomaly readings are never duplicated, copied late, broken or moved.

Event time
==========
By default ``start_ms`` puts the last reading at about *now* when the run's size is known
(``count``, or ``duration_s`` × ``rate``); a throttled run's own duration is counted in. An
endless run starts at *now* minus one interval. Whatever the options, a round is not emitted
while its event time is more than a few seconds ahead of the wall clock: an endless
unthrottled run follows the clock (``meters / interval_s`` messages/s).

Speed
=====
Per round, numbers are drawn in numpy and turned into byte fragments by table lookups
(milliseconds, power + energy, voltage + region, status + firmware + signal), so a message
is one ``bytes % tuple`` of 9 fields. :func:`produce` calls ``Producer.produce`` in a tight
loop and ``poll(0)`` once per batch.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import math
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final, NamedTuple

import msgspec
import numpy as np
from confluent_kafka import KafkaError as KafkaErrorCode
from confluent_kafka import KafkaException, Producer
from numpy.typing import NDArray

from segs.errors import ConfigError, KafkaError

__all__ = [
    "ANOMALY_KINDS",
    "EXAMPLE",
    "INVALID_VARIANTS",
    "KINDS",
    "PRODUCER_DEFAULTS",
    "SimMessage",
    "SimulatorOptions",
    "SimulatorSummary",
    "generate",
    "make_invalid",
    "produce",
    "read_file",
    "region_names",
    "write_file",
]

log = logging.getLogger("segs.simulator")
_kafka_log = logging.getLogger("segs.simulator.kafka")
_kafka_log.addHandler(logging.NullHandler())

VALID: Final = "valid"
OUT_OF_ORDER: Final = "out_of_order"
DUPLICATE: Final = "duplicate"
LATE: Final = "late"
INVALID: Final = "invalid"
KINDS: Final = (VALID, OUT_OF_ORDER, DUPLICATE, LATE, INVALID)
"""Kinds of :class:`SimMessage`; ``valid`` and ``out_of_order`` are the fresh readings."""

ANOMALY_KINDS: Final = ("spike", "drop", "outage")

INVALID_VARIANTS: Final = (
    "not_json",
    "truncated",
    "empty",
    "not_object",
    "missing_field",
    "wrong_type",
    "negative_power",
    "nan_power",
    "infinite_power",
    "negative_energy",
    "no_zone_timestamp",
    "bad_timestamp",
    "far_future_timestamp",
    "non_utf8",
    "empty_meter_id",
    "long_meter_id",
)
"""Ways :func:`make_invalid` breaks a message; each breaks a rule of the input contract."""

EXAMPLE: Final = (
    b'{"readingId":"3f9c2a1e-7b4d-4c2a-9e1f-5a6b7c8d9e0f","meterId":"MTR-00000001",'
    b'"userId":"USR-00000001","timestamp":"2026-11-27T06:00:17.123Z","powerKw":2.345,'
    b'"energyKwh":0.000651,"voltage":230.4,"region":"north","seq":17,"status":"normal",'
    b'"metadata":{"firmware":"2.1.3","signalStrength":-67}}'
)

PRODUCER_DEFAULTS: Final[dict[str, str]] = {
    "linger.ms": "10",
    "batch.size": "1000000",
    "batch.num.messages": "10000",
    "compression.type": "lz4",
    "queue.buffering.max.messages": "1000000",
    "queue.buffering.max.kbytes": "1048576",
    "message.timeout.ms": "30000",
    "enable.idempotence": "true",  # keeps each meter's readings in order through retries
}
"""Producer settings :func:`produce` starts from; the caller's settings override them."""

_BASE_NAMES: Final = ("north", "south", "east", "west", "central")
_FIRMWARES: Final = ("2.1.0", "2.1.3", "2.2.0", "3.0.1")
MAX_METERS: Final = 10_000_000
MAX_FUTURE_START_MS: Final = 240_000  # an explicit start_ms may be this far ahead of now
_AHEAD_MS: Final = 3_000  # a round is held back while it is this far ahead of the clock
_WARMUP: Final = 12  # readings of a meter before its first anomaly (detector needs 10)
_SPACING_MS: Final = 600_000  # event time between two anomalies of a meter
_MARGIN: Final = 0.03  # normal readings stay this far inside the detector's thresholds
_LATE_MS: Final = (70_000, 3_600_000)
_EXTRA_DELAY: Final = 16  # duplicates, late copies and invalid messages: 0..16 positions later
_OOO_DELAY: Final = 8  # out-of-order readings: 1..8 positions later
_CHUNK: Final = 8192  # meters per batch
_P_MAX_MILLI: Final = 25_000  # 5 × the largest base load, in W
_V_MIN, _V_MAX = 2200, 2400  # voltage, in 0.1 V
_S_MIN, _S_MAX = -100, -30  # signal strength, dBm
_MULT: Final = 0x5DEECE66D  # odd: seq ↦ seq·MULT mod 2**48 is a bijection
_MASK48: Final = (1 << 48) - 1
_TEMPLATE: Final = b"%s%012x%s%s%s%s%s%d%s"


def region_names(n: int) -> list[str]:
    """``north, south, east, west, central``, then ``region-6``, ``region-7`` …"""
    return [_BASE_NAMES[i] if i < len(_BASE_NAMES) else f"region-{i + 1}" for i in range(n)]


class SimMessage(NamedTuple):
    """One simulated Kafka message and what it is meant to be."""

    key: bytes | None
    value: bytes
    kind: str  # one of KINDS
    anomaly: str | None  # one of ANOMALY_KINDS for an injected anomaly, else None


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    """What to simulate. Fractions of ``duplicate``/``late``/``invalid``/``out_of_order`` are
    shares of all messages; ``anomaly_fraction`` is the share of fresh readings (capped by the
    one-per-600-s-per-meter spacing). ``count`` and ``duration_s`` (wall clock) both stop the
    run, whichever comes first; with neither it runs until stopped."""

    meters: int = 1000
    regions: int = 5
    count: int | None = None
    duration_s: float | None = None
    rate: float = 0.0
    interval_s: float = 1.0
    start_ms: int | None = None
    seed: int = 0
    anomaly_fraction: float = 0.001
    duplicate_fraction: float = 0.0
    out_of_order_fraction: float = 0.0
    late_fraction: float = 0.0
    invalid_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check_int("meters", self.meters, 1, MAX_METERS)
        _check_int("regions", self.regions, 1, 10_000)
        if self.count is not None:
            _check_int("count", self.count, 1, 2**62)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.duration_s is not None:
            _check_float("duration_s", self.duration_s, 0.0, 10 * 365 * 86400.0, open_low=True)
        _check_float("rate", self.rate, 0.0, 1e9)
        _check_float("interval_s", self.interval_s, 0.001, 86400.0)
        fractions = (
            "anomaly_fraction",
            "duplicate_fraction",
            "out_of_order_fraction",
            "late_fraction",
            "invalid_fraction",
        )
        for name in fractions:
            _check_float(name, getattr(self, name), 0.0, 1.0)
        extra = self.duplicate_fraction + self.late_fraction + self.invalid_fraction
        if 2 * extra + self.out_of_order_fraction > 1.0:
            raise ConfigError(
                "fractions",
                "too much disorder: 2 × (duplicate + late + invalid) + out-of-order must be "
                f"≤ 1, got {2 * extra + self.out_of_order_fraction:.3g}",
            )
        if self.start_ms is not None:
            _check_int("start_ms", self.start_ms, 946_684_800_000, 2**53)
            ahead = self.start_ms - _now_ms()
            if ahead > MAX_FUTURE_START_MS:
                raise ConfigError(
                    "start_ms",
                    f"is {ahead / 60000:.1f} min in the future; at most "
                    f"{MAX_FUTURE_START_MS // 60000} min is allowed (event times must stay "
                    "within 5 min of the wall clock)",
                )

    @property
    def interval_ms(self) -> int:
        return max(1, round(self.interval_s * 1000))

    def planned_messages(self) -> int | None:
        """How many messages the run will produce, when that is known in advance."""
        if self.count is not None:
            if self.duration_s is not None and self.rate > 0:
                return min(self.count, math.ceil(self.duration_s * self.rate))
            return self.count
        if self.duration_s is not None and self.rate > 0:
            return math.ceil(self.duration_s * self.rate)
        return None


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(name, f"must be an integer from {low:,} to {high:,}, got {value!r}")


def _check_float(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and float(value) <= high  # type: ignore[arg-type]
    ok = ok and (float(value) > low if open_low else float(value) >= low)  # type: ignore[arg-type]
    if not ok:
        bound = f"more than {low:g}" if open_low else f"from {low:g}"
        raise ConfigError(name, f"must be a number {bound} to {high:g}, got {value!r}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class SimulatorSummary:
    """What a :func:`produce` run did."""

    messages: int
    kinds: dict[str, int]
    anomalies: dict[str, int]
    bytes: int
    elapsed_s: float
    rate: float  # messages/s achieved, flush included
    delivery_errors: int
    last_error: str | None
    interrupted: bool
    start_ms: int  # event time of the first round
    last_event_ms: int | None  # event time of the last fresh reading
    topic: str | None
    file: Path | None


# ---------------------------------------------------------------------------------------
# Generation


_new_message: Callable[[tuple[bytes | None, bytes, str, str | None]], SimMessage] = (
    functools.partial(tuple.__new__, SimMessage)
)  # SimMessage(*row) without the Python-level __new__ of a NamedTuple


class _Batch:
    """Messages of one batch as columns. ``kinds`` and ``anomalies`` are gathered lazily
    (through ``order``, when disorder shuffled the batch): producing needs only keys and
    values, plus the per-kind ``counts``."""

    __slots__ = (
        "_anomalies",
        "_kinds",
        "_order",
        "anomaly_counts",
        "counts",
        "keys",
        "last_event_ms",
        "values",
    )

    def __init__(
        self,
        keys: list[bytes | None],
        values: list[bytes],
        kinds: list[str],
        anomalies: list[str | None],
        counts: Counter[str],
        anomaly_counts: Counter[str],
        last_event_ms: int,
        order: NDArray[np.intp] | None = None,
    ) -> None:
        self.keys = keys
        self.values = values
        self._kinds = kinds
        self._anomalies = anomalies
        self._order = order
        self.counts = counts
        self.anomaly_counts = anomaly_counts
        self.last_event_ms = last_event_ms

    def __len__(self) -> int:
        return len(self.values)

    @property
    def kinds(self) -> list[str]:
        self._settle()
        return self._kinds

    @property
    def anomalies(self) -> list[str | None]:
        self._settle()
        return self._anomalies

    def _settle(self) -> None:
        if self._order is not None:
            self._kinds = _gather(self._kinds, self._order)
            self._anomalies = _gather(self._anomalies, self._order)
            self._order = None

    def head(self, n: int) -> _Batch:
        kinds = self.kinds[:n]
        anomalies = self.anomalies[:n]
        return _Batch(
            self.keys[:n],
            self.values[:n],
            kinds,
            anomalies,
            Counter(kinds),
            Counter(a for a in anomalies if a is not None),
            self.last_event_ms,
        )

    def messages(self) -> list[SimMessage]:
        rows = zip(self.keys, self.values, self.kinds, self.anomalies, strict=True)
        return list(map(_new_message, rows))


@functools.lru_cache(maxsize=8192)
def _sec_text(sec: int) -> bytes:
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()


def _ts_text(ts_ms: int) -> str:
    sec, ms = divmod(ts_ms, 1000)
    return f"{_sec_text(sec).decode()}.{ms:03d}Z"


def _uuid(*parts: object) -> bytes:
    """A uuid4-shaped id derived from ``parts`` (deterministic)."""
    h = bytearray(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest())
    h[6] = (h[6] & 0x0F) | 0x40
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}".encode()


def _obj_array(items: list[Any]) -> NDArray[np.object_]:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _gather(items: list[Any], order: NDArray[np.intp]) -> list[Any]:
    """``[items[j] for j in order]``, at C speed."""
    out: list[Any] = _obj_array(items)[order].tolist()
    return out


class _Simulation:
    """Per-meter state and the lookup tables; :meth:`batches` yields the stream."""

    def __init__(self, opts: SimulatorOptions, now_ms: int | None = None) -> None:
        self.opts = opts
        now = _now_ms() if now_ms is None else now_ms
        self.interval_ms = opts.interval_ms
        self.start_ms = opts.start_ms if opts.start_ms is not None else _default_start(opts, now)
        self.ahead_ms = max(_AHEAD_MS, self.start_ms - now + _AHEAD_MS)
        self.rng = rng = np.random.default_rng(opts.seed)
        m = opts.meters

        self.phase = np.sort(rng.integers(0, self.interval_ms, m, dtype=np.int64))
        number = rng.permutation(m).astype(np.int64) + 1  # meter numbers, in phase order
        self.number = number
        self.base = rng.uniform(1.5, 5.0, m)
        self.p_low = np.ceil(self.base * 800.0).astype(np.int64)
        self.p_high = np.floor(self.base * 1200.0).astype(np.int64)
        self.region = rng.integers(0, opts.regions, m, dtype=np.int64)
        firmware = rng.integers(0, len(_FIRMWARES), m, dtype=np.int64)
        self.status_row = firmware * 2 * (_S_MAX - _S_MIN + 1)
        self.signal = rng.integers(-90, -50, m, dtype=np.int64)
        self.salt = rng.integers(0, 1 << 48, m, dtype=np.int64).astype(np.uint64)
        ids = rng.integers(0, 1 << 16, (m, 5), dtype=np.int64).tolist()
        self.ema = np.zeros(m)
        self.last_anomaly_ms = np.full(m, -(2**62), np.int64)
        self.last_anomaly_round = np.full(m, -(2**40), np.int64)

        numbers = number.tolist()
        self.keys: list[bytes | None] = [b"MTR-%08d" % k for k in numbers]
        self.pre = _obj_array(
            [
                b'{"readingId":"%04x%04x-%04x-4%03x-%x%03x-'
                % (a, b, c, d & 0xFFF, 8 + (e >> 14), e & 0xFFF)
                for a, b, c, d, e in ids
            ]
        )
        self.mid = _obj_array(
            [b'","meterId":"MTR-%08d","userId":"USR-%08d","timestamp":"' % (k, k) for k in numbers]
        )
        self.ms_tab = _obj_array([b'.%03dZ","powerKw":' % i for i in range(1000)])
        self.pe_tab = _obj_array(
            [_power_energy(p, self.interval_ms) for p in range(_P_MAX_MILLI + 1)]
        )
        names = [json.dumps(n).encode() for n in region_names(opts.regions)]
        self.vr_tab = _obj_array(
            [
                b'%s,"region":%s,"seq":' % (_decimal(v, 1), name)
                for name in names
                for v in range(_V_MIN, _V_MAX + 1)
            ]
        )
        self.st_tab = _obj_array(
            [
                b',"status":"%s","metadata":{"firmware":"%s","signalStrength":%d}}'
                % (status, fw.encode(), s)
                for fw in _FIRMWARES
                for status in (b"normal", b"anomaly")
                for s in range(_S_MIN, _S_MAX + 1)
            ]
        )
        self.sec_cache: dict[int, bytes] = {}

        f = opts
        rest = 1.0 - (f.duplicate_fraction + f.late_fraction + f.invalid_fraction)
        q = [f.duplicate_fraction, f.late_fraction, f.invalid_fraction, f.out_of_order_fraction]
        self.q_edges = np.cumsum([x / rest for x in q])
        self.anomaly_fraction = f.anomaly_fraction

    # -- the stream ---------------------------------------------------------------------

    def batches(self, stopped: Callable[[], bool] = lambda: False) -> Iterator[_Batch]:
        """The stream (one batch per round, or per 8192 meters of a round), until
        ``stopped()`` says so; it is asked before each batch and while holding back."""
        m = self.opts.meters
        r = 0
        while True:
            for a in range(0, m, _CHUNK):
                b = min(m, a + _CHUNK)
                last_ts = int(self.start_ms + r * self.interval_ms + self.phase[b - 1])
                if stopped() or not self._hold_back(last_ts, stopped):
                    return
                yield self._chunk(r, a, b)
            r += 1

    def _hold_back(self, last_ts_ms: int, stopped: Callable[[], bool]) -> bool:
        """Wait while ``last_ts_ms`` is too far ahead of the clock; False if stopped."""
        while (wait := last_ts_ms - self.ahead_ms - _now_ms()) > 0:
            if stopped():
                return False
            time.sleep(min(wait / 1000.0, 0.1))
        return True

    def _sec(self, sec: int) -> bytes:
        text = self.sec_cache.get(sec)
        if text is None:
            if len(self.sec_cache) > 4096:
                self.sec_cache.clear()
            text = self.sec_cache[sec] = _sec_text(sec)
        return text

    def _chunk(self, r: int, a: int, b: int) -> _Batch:
        rng = self.rng
        n = b - a
        base = self.base[a:b]
        ema = self.ema[a:b]  # a view: updated in place below
        ts = self.start_ms + r * self.interval_ms + self.phase[a:b]

        power = base * rng.uniform(0.8, 1.2, n)
        if r > 0:  # keep the detector quiet: inside both thresholds, with a margin
            low = np.maximum(base * 0.8, ema * (0.5 * (1 + _MARGIN)))
            high = np.minimum(base * 1.2, ema * (2.0 * (1 - _MARGIN)))
            power = np.minimum(np.maximum(power, low), high)
        milli = np.clip(np.rint(power * 1000.0).astype(np.int64), self.p_low[a:b], self.p_high[a:b])

        status = np.zeros(n, np.int64)
        anomalies: list[str | None] = [None] * n
        anomaly_counts: Counter[str] = Counter()
        if self.anomaly_fraction > 0 and r >= _WARMUP:
            hit = self._anomalies(r, a, b, ts, milli)
            for i, kind in hit:
                status[i] = 1
                anomalies[i] = kind
                anomaly_counts[kind] += 1

        kw = milli / 1000.0  # exactly what the detector will parse
        ema[:] = kw if r == 0 else 0.8 * ema + 0.2 * kw

        sec = ts // 1000
        uniq, where = np.unique(sec, return_inverse=True)
        sec_texts = _obj_array([self._sec(s) for s in uniq.tolist()])[where]
        seq = r + 1
        tail = (np.uint64(seq) * np.uint64(_MULT) + self.salt[a:b]) & np.uint64(_MASK48)
        volt = np.clip(np.rint(rng.normal(2300.0, 15.0, n)).astype(np.int64), _V_MIN, _V_MAX)
        sig = np.clip(self.signal[a:b] + rng.integers(-3, 4, n), _S_MIN, _S_MAX)
        values = list(
            map(
                _TEMPLATE.__mod__,
                zip(
                    self.pre[a:b].tolist(),
                    tail.tolist(),
                    self.mid[a:b].tolist(),
                    sec_texts.tolist(),
                    self.ms_tab[ts - sec * 1000].tolist(),
                    self.pe_tab[milli].tolist(),
                    self.vr_tab[self.region[a:b] * (_V_MAX - _V_MIN + 1) + volt - _V_MIN].tolist(),
                    repeat(seq, n),
                    self.st_tab[
                        self.status_row[a:b] + status * (_S_MAX - _S_MIN + 1) + sig - _S_MIN
                    ].tolist(),
                    strict=False,
                ),
            )
        )
        keys = self.keys[a:b]
        kinds = [VALID] * n
        last_ts = int(ts[-1])
        if self.q_edges[-1] <= 0:
            counts = Counter({VALID: n})
            return _Batch(keys, values, kinds, anomalies, counts, anomaly_counts, last_ts)

        u = rng.random(n)
        u[status == 1] = 2.0  # anomaly readings stay as they are
        e = self.q_edges
        dup = np.flatnonzero(u < e[0])
        late = np.flatnonzero((u >= e[0]) & (u < e[1]))
        bad = np.flatnonzero((u >= e[1]) & (u < e[2]))
        ooo = np.flatnonzero((u >= e[2]) & (u < e[3]))
        folded = np.concatenate([dup, late])
        ema[folded] = kw[folded] + (ema[folded] - kw[folded]) * 0.8  # the detector folds copies
        return self._disorder(
            r,
            a,
            ts,
            _Batch(keys, values, kinds, anomalies, Counter(), anomaly_counts, last_ts),
            dup,
            late,
            bad,
            ooo,
        )

    def _anomalies(
        self, r: int, a: int, b: int, ts: NDArray[np.int64], milli: NDArray[np.int64]
    ) -> list[tuple[int, str]]:
        rng = self.rng
        base = self.base[a:b]
        ema = self.ema[a:b]
        eligible = (
            (ts - self.last_anomaly_ms[a:b] >= _SPACING_MS)
            & (r - self.last_anomaly_round[a:b] >= _WARMUP)
            & (np.abs(ema - base) <= 0.1 * base)
        )
        # aim at anomaly_fraction of this chunk's readings, drawn among the eligible ones
        p = self.anomaly_fraction * (b - a) / max(1, int(eligible.sum()))
        hit = np.flatnonzero(eligible & (rng.random(b - a) < p))
        if hit.size == 0:
            return []
        kind = rng.integers(0, 3, hit.size)
        factor = np.where(
            kind == 0,
            rng.uniform(3.0, 5.0, hit.size),
            np.where(kind == 1, rng.uniform(0.25, 0.4, hit.size), 0.0),
        )
        value = np.rint(base[hit] * factor * 1000.0).astype(np.int64)
        kw = value / 1000.0
        baseline = ema[hit]
        change = (kw - baseline) / np.maximum(baseline, 0.1)
        fires = np.where(
            kind == 0,
            change > 1.0 + _MARGIN,
            np.where(
                kind == 1, (change < -0.5 - _MARGIN) & (kw >= 0.1), (kw < 0.1) & (baseline > 1.0)
            ),
        )
        out: list[tuple[int, str]] = []
        for i, k, v, ok in zip(
            hit.tolist(), kind.tolist(), value.tolist(), fires.tolist(), strict=True
        ):
            if ok:
                milli[i] = v
                self.last_anomaly_ms[a + i] = ts[i]
                self.last_anomaly_round[a + i] = r
                out.append((i, ANOMALY_KINDS[k]))
        return out

    def _disorder(
        self,
        r: int,
        a: int,
        ts: NDArray[np.int64],
        batch: _Batch,
        dup: NDArray[np.intp],
        late: NDArray[np.intp],
        bad: NDArray[np.intp],
        ooo: NDArray[np.intp],
    ) -> _Batch:
        rng = self.rng
        n = len(batch.values)
        keys, values, kinds, anomalies = batch.keys, batch.values, batch.kinds, batch.anomalies
        pos = np.arange(n, dtype=np.float64)
        moved = ooo + rng.integers(1, _OOO_DELAY + 1, ooo.size)
        ok = moved < n  # a chunk holds each meter once, so no same-key reading is passed
        pos[ooo[ok]] = moved[ok] + 0.5
        for i in ooo[ok].tolist():
            kinds[i] = OUT_OF_ORDER

        x_keys: list[bytes | None] = []
        x_values: list[bytes] = []
        x_kinds: list[str] = []
        src = np.concatenate([dup, late, bad])
        for i in dup.tolist():
            x_keys.append(keys[i])
            x_values.append(values[i])
            x_kinds.append(DUPLICATE)
        lags = rng.integers(_LATE_MS[0], _LATE_MS[1] + 1, late.size)
        for i, lag in zip(late.tolist(), lags.tolist(), strict=True):
            x_keys.append(keys[i])
            x_values.append(self._late_copy(values[i], int(ts[i]), lag, r, a + i))
            x_kinds.append(LATE)
        variants = rng.integers(0, len(INVALID_VARIANTS), bad.size)
        picks = rng.integers(0, 1 << 30, bad.size)
        for i, v, pick in zip(bad.tolist(), variants.tolist(), picks.tolist(), strict=True):
            x_keys.append(keys[i])
            x_values.append(make_invalid(INVALID_VARIANTS[v], values[i], int(ts[i]), pick=pick))
            x_kinds.append(INVALID)
        x_pos = np.minimum(src + rng.integers(0, _EXTRA_DELAY + 1, src.size), n - 1) + 0.75
        order = np.argsort(np.concatenate([pos, x_pos]), kind="stable")
        n_moved = int(ok.sum())
        counts = Counter(
            {
                VALID: n - n_moved,
                OUT_OF_ORDER: n_moved,
                DUPLICATE: dup.size,
                LATE: late.size,
                INVALID: bad.size,
            }
        )
        return _Batch(
            _gather(keys + x_keys, order),
            _gather(values + x_values, order),
            kinds + x_kinds,
            anomalies + [None] * len(x_values),
            counts,
            batch.anomaly_counts,
            batch.last_event_ms,
            order,
        )

    def _late_copy(self, value: bytes, ts_ms: int, lag_ms: int, r: int, slot: int) -> bytes:
        old_id = value[14:50]
        new_id = _uuid(self.opts.seed, int(self.number[slot]), r, "late")
        old_ts = b'"timestamp":"' + _ts_text(ts_ms).encode()
        new_ts = b'"timestamp":"' + _ts_text(ts_ms - lag_ms).encode()
        return value.replace(old_id, new_id, 1).replace(old_ts, new_ts, 1)


def _power_energy(milli: int, interval_ms: int) -> bytes:
    micro_kwh = (milli * interval_ms * 2 + 3600) // 7200  # round(kW·h·1e6), half up
    return b'%s,"energyKwh":%s,"voltage":' % (_decimal(milli, 3), _decimal(micro_kwh, 6))


def _decimal(units: int, places: int) -> bytes:
    """``units`` × 10**-places as JavaScript prints it: ``2.34``, ``0.000651``, ``25``."""
    whole, frac = divmod(units, 10**places)
    digits = b"%0*d" % (places, frac)
    digits = digits.rstrip(b"0")
    return b"%d.%s" % (whole, digits) if digits else b"%d" % whole


def _default_start(opts: SimulatorOptions, now_ms: int) -> int:
    """Event time of round 0 that puts the last reading at about ``now_ms`` + run time."""
    planned = opts.planned_messages()
    if planned is None and opts.duration_s is not None:
        planned = math.ceil(opts.duration_s * 250_000)  # unthrottled: a guess at the speed
    if planned is None:
        return now_ms - opts.interval_ms
    rest = 1.0 - (opts.duplicate_fraction + opts.late_fraction + opts.invalid_fraction)
    rounds = math.ceil(planned * rest / opts.meters)
    span_ms = rounds * opts.interval_ms
    run_ms = round(planned / opts.rate * 1000) if opts.rate > 0 else 0
    return now_ms - span_ms + min(span_ms, run_ms)  # never ahead of the clock during the run


def _limited(
    sim: _Simulation, opts: SimulatorOptions, stop: Callable[[], bool] | None = None
) -> Iterator[_Batch]:
    """The simulation's batches, stopped by ``count``, ``duration_s`` or ``stop()``."""
    left = opts.count
    deadline = None if opts.duration_s is None else time.monotonic() + opts.duration_s

    def stopped() -> bool:
        if deadline is not None and time.monotonic() >= deadline:
            return True
        return stop is not None and stop()

    for batch in sim.batches(stopped):
        if left is not None:
            if len(batch) >= left:
                yield batch.head(left)
                return
            left -= len(batch)
        yield batch


def generate(opts: SimulatorOptions) -> Iterator[list[SimMessage]]:
    """The messages of a run, in production order, in batches (no Kafka involved)."""
    for batch in _limited(_Simulation(opts), opts):
        yield batch.messages()


# ---------------------------------------------------------------------------------------
# Invalid messages


def make_invalid(variant: str, value: bytes, ts_ms: int, *, pick: int = 0) -> bytes:
    """``value`` (a valid simulated reading at event time ``ts_ms``) broken as ``variant``
    says; ``pick`` chooses among the sub-cases of a variant."""
    if variant == "not_json":
        return b"<reading meter=%s>" % value[50:90]
    if variant == "truncated":
        return value[: len(value) // 2 + pick % 16]
    if variant == "empty":
        return b""
    if variant == "not_object":
        return (b"[%s]", b'"%s"', b"%s")[pick % 3] % (
            value if pick % 3 == 0 else value[14:50] if pick % 3 == 1 else b"42"
        )
    if variant == "non_utf8":
        return value.replace(b'"region":"', b'"region":"\xff\xfe', 1)
    obj: dict[str, Any] = json.loads(value)
    if variant == "missing_field":
        del obj[("meterId", "region", "timestamp", "powerKw")[pick % 4]]
    elif variant == "wrong_type":
        field, bad = (
            ("powerKw", str(obj["powerKw"])),
            ("timestamp", ts_ms),
            ("meterId", 12345),
            ("region", None),
            ("powerKw", True),
            ("energyKwh", "0.1"),
        )[pick % 6]
        obj[field] = bad
    elif variant == "negative_power":
        obj["powerKw"] = -max(float(obj["powerKw"]), 0.5)
    elif variant == "nan_power":
        obj["powerKw"] = math.nan
    elif variant == "infinite_power":
        obj["powerKw"] = math.inf if pick % 2 else -math.inf
    elif variant == "negative_energy":
        obj["energyKwh"] = -0.001
    elif variant == "no_zone_timestamp":
        obj["timestamp"] = obj["timestamp"].rstrip("Z")
    elif variant == "bad_timestamp":
        obj["timestamp"] = ("27/11/2026 06:00:17", "yesterday", "2026-13-45T99:00:00Z")[pick % 3]
    elif variant == "far_future_timestamp":
        # a century ahead of the reading: in the future of any clock, and deterministic
        obj["timestamp"] = _ts_text(ts_ms + 86_400_000 * (36_525 + pick % 365))
    elif variant == "empty_meter_id":
        obj["meterId"] = ""
    elif variant == "long_meter_id":
        obj["meterId"] = "MTR-" + "9" * 61
    else:
        raise ValueError(f"unknown invalid variant {variant!r}")
    return json.dumps(obj, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------
# Files


class _FileWriter:
    """JSON lines: ``{"key": str|null, "value": str, "kind": str, "anomaly": str|null}``;
    a value (or key) that is not UTF-8 goes as ``"value_b64"`` (``"key_b64"``) instead."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: IO[bytes] = path.open("wb")
        self._encode = msgspec.json.Encoder().encode

    def write(
        self,
        keys: list[bytes | None],
        values: list[bytes],
        kinds: list[str],
        anomalies: list[str | None],
    ) -> None:
        encode = self._encode
        lines = []
        for key, value, kind, anomaly in zip(keys, values, kinds, anomalies, strict=True):
            row: dict[str, str | None] = {"key": None}
            if key is not None:
                try:
                    row["key"] = key.decode()
                except UnicodeDecodeError:
                    del row["key"]
                    row["key_b64"] = base64.b64encode(key).decode()
            try:
                row["value"] = value.decode()
            except UnicodeDecodeError:
                row["value_b64"] = base64.b64encode(value).decode()
            row["kind"] = kind
            row["anomaly"] = anomaly
            lines.append(encode(row))
        if lines:
            self._out.write(b"\n".join(lines) + b"\n")

    def close(self) -> None:
        self._out.close()


def write_file(path: Path, messages: Iterable[SimMessage]) -> int:
    """Write ``messages`` as JSON lines (see :func:`read_file`); returns how many."""
    writer = _FileWriter(path)
    n = 0
    try:
        chunk: list[SimMessage] = []
        for msg in messages:
            chunk.append(msg)
            if len(chunk) >= 4096:
                writer.write(*_columns(chunk))
                n += len(chunk)
                chunk = []
        writer.write(*_columns(chunk))
        n += len(chunk)
    finally:
        writer.close()
    return n


def _columns(
    msgs: list[SimMessage],
) -> tuple[list[bytes | None], list[bytes], list[str], list[str | None]]:
    return (
        [m.key for m in msgs],
        [m.value for m in msgs],
        [m.kind for m in msgs],
        [m.anomaly for m in msgs],
    )


def read_file(path: Path) -> Iterator[SimMessage]:
    """The messages of a file written by :func:`write_file` or :func:`produce`, in order."""
    decode = msgspec.json.Decoder(dict[str, Any]).decode
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            row = decode(line)
            if "key_b64" in row:
                key: bytes | None = base64.b64decode(row["key_b64"])
            else:
                key = None if row.get("key") is None else str(row["key"]).encode()
            if "value_b64" in row:
                value = base64.b64decode(row["value_b64"])
            else:
                value = str(row["value"]).encode()
            yield SimMessage(
                key,
                value,
                str(row.get("kind", VALID)),
                row.get("anomaly"),
            )


# ---------------------------------------------------------------------------------------
# Producing


class _StopFlag:
    """SIGINT/SIGTERM set a flag (main thread only); a second one interrupts for real."""

    def __init__(self) -> None:
        self.set = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Reporter:
    """A rich progress bar on a terminal, else a plain line on stderr every few seconds."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.next_at = self.t0
        self.tty = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]simulate"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>10,.0f} msg/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task("simulate", total=total, rate=0.0)
            self._progress.start()

    def update(self, sent: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now < self.next_at and not force:
            return
        rate = sent / max(now - self.t0, 1e-9)
        if self._progress is not None:
            self._progress.update(self._task, completed=sent, rate=rate)
            self.next_at = now + 0.1
        else:
            of = f" of {self.total:,}" if self.total else ""
            print(f"simulate: {sent:,}{of} messages, {rate:,.0f} msg/s", file=sys.stderr)
            self.next_at = now + 5.0

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def produce(
    opts: SimulatorOptions,
    producer_config: dict[str, str],
    topic: str,
    *,
    file: Path | None = None,
    progress: bool = True,
    connect_timeout_s: float = 8.0,
    flush_timeout_s: float = 30.0,
) -> SimulatorSummary:
    """Simulate ``opts`` into ``topic`` (and ``file`` when given, exactly what was produced).

    Raises :class:`~segs.errors.KafkaError` when the cluster does not answer within
    ``connect_timeout_s``. SIGINT/SIGTERM stop the run cleanly (``interrupted`` is then set).
    """
    failed = [0]
    last_error: list[str | None] = [None]

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            failed[0] += 1
            last_error[0] = str(err.str() if hasattr(err, "str") else err)

    def on_error(err: Any) -> None:
        last_error[0] = str(err.str() if hasattr(err, "str") else err)

    config: dict[str, Any] = {**PRODUCER_DEFAULTS, **producer_config}
    config.setdefault("delivery.report.only.error", True)
    config["on_delivery"] = on_delivery
    config["error_cb"] = on_error
    try:
        producer = Producer(config, logger=_kafka_log)
    except KafkaException as exc:
        raise KafkaError(f"producer settings: {_kafka_text(exc)}") from exc
    except (TypeError, ValueError) as exc:
        raise KafkaError(f"producer settings: {exc}") from exc
    _check_cluster(
        producer, topic, str(config.get("bootstrap.servers", "?")), connect_timeout_s, last_error
    )

    sim = _Simulation(opts)
    writer = _FileWriter(file) if file is not None else None
    reporter = _Reporter(opts.planned_messages(), progress)
    kinds: Counter[str] = Counter()
    anomalies: Counter[str] = Counter()
    sent = nbytes = 0
    last_event: int | None = None
    rate = opts.rate
    step = max(1, int(rate / 50)) if rate > 0 else 1 << 30  # throttled: ~20 ms slices
    send = producer.produce
    poll = producer.poll
    t0 = time.perf_counter()
    with _StopFlag() as stop:
        try:
            for batch in _limited(sim, opts, lambda: stop.set):
                keys, values = batch.keys, batch.values
                n = len(values)
                lo = 0
                while lo < n and not stop.set:
                    hi = min(n, lo + step)
                    _send_all(send, poll, topic, keys, values, lo, hi)
                    poll(0)
                    if writer is not None:
                        writer.write(
                            keys[lo:hi], values[lo:hi], batch.kinds[lo:hi], batch.anomalies[lo:hi]
                        )
                    if hi < n:
                        kinds.update(batch.kinds[lo:hi])
                        anomalies.update(a for a in batch.anomalies[lo:hi] if a is not None)
                    elif lo == 0:
                        kinds.update(batch.counts)
                        anomalies.update(batch.anomaly_counts)
                    else:
                        kinds.update(batch.kinds[lo:hi])
                        anomalies.update(a for a in batch.anomalies[lo:hi] if a is not None)
                    nbytes += sum(map(len, values[lo:hi]))
                    sent += hi - lo
                    lo = hi
                    if rate > 0:
                        _wait(poll, t0 + sent / rate, stop)
                    reporter.update(sent)
                if lo == n:
                    last_event = batch.last_event_ms
                if stop.set:
                    break
        finally:
            if writer is not None:
                writer.close()
        left = producer.flush(flush_timeout_s)
    elapsed = time.perf_counter() - t0
    reporter.update(sent, force=True)
    reporter.close()
    if left:
        failed[0] += left
        last_error[0] = last_error[0] or f"{left} messages still queued after {flush_timeout_s:g} s"
    return SimulatorSummary(
        messages=sent,
        kinds={k: kinds[k] for k in KINDS},
        anomalies={k: anomalies[k] for k in ANOMALY_KINDS},
        bytes=nbytes,
        elapsed_s=elapsed,
        rate=sent / elapsed if elapsed > 0 else 0.0,
        delivery_errors=failed[0],
        last_error=last_error[0],
        interrupted=stop.set,
        start_ms=sim.start_ms,
        last_event_ms=last_event,
        topic=topic,
        file=file,
    )


def _kafka_text(exc: KafkaException) -> str:
    err: Any = exc.args[0] if exc.args else None
    return str(err.str()) if hasattr(err, "str") else str(exc)


def _check_cluster(
    producer: Producer, topic: str, where: str, timeout_s: float, last_error: list[str | None]
) -> None:
    """Fail in ``timeout_s`` with one line when the cluster or the topic is not there
    (asking for the topic's metadata also creates it where the broker auto-creates topics)."""
    try:
        meta = producer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        detail = last_error[0] or _kafka_text(exc)
        raise KafkaError(
            f"cannot reach Kafka at {where} within {timeout_s:g} s ({detail})"
        ) from exc
    info = meta.topics.get(topic)
    err = None if info is None else info.error
    if info is None or (err is not None and err.code() == KafkaErrorCode.UNKNOWN_TOPIC_OR_PART):
        raise KafkaError(
            f"topic {topic!r} does not exist on {where} and the broker does not create it "
            "automatically: create it first"
        )


def _send_all(
    send: Any,
    poll: Any,
    topic: str,
    keys: list[bytes | None],
    values: list[bytes],
    lo: int,
    hi: int,
) -> None:
    """``produce`` each message; a full local queue is drained with ``poll`` and retried."""
    i = lo
    while i < hi:
        try:
            for key, value in zip(keys[i:hi], values[i:hi], strict=True):
                send(topic, value, key)
                i += 1
        except BufferError:
            poll(0.05)


def _wait(poll: Any, until: float, stop: _StopFlag) -> None:
    while not stop.set and (left := until - time.perf_counter()) > 0:
        poll(min(left, 0.1))
