"""The reading model: meters, rounds, batches; :func:`generate` without Kafka.

Model
=====
``meters`` meters, each with a base load (1.5–5 kW), a region, a firmware, a signal level and
a fixed *phase* inside the reading interval. Round ``r`` is one reading of every meter, at
event time ``start_ms + r * interval_ms + phase``; within a round meters go in phase order, so
the valid stream is in event-time order. ``seq`` is ``r + 1``. Messages are keyed by meter id
and carry compact JSON in the original simulator's field order
(:data:`~segs.tools.simulator.encoding.EXAMPLE`).

Everything is drawn from one ``numpy`` generator seeded by ``seed``: the same options give the
same messages, whatever the machine, rate or wall clock (except the default ``start_ms``,
which follows the clock).

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
is one ``bytes % tuple`` of 9 fields. :func:`~segs.tools.simulator.producer.produce` calls
``Producer.produce`` in a tight loop and ``poll(0)`` once per batch.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Final

import numpy as np

from segs.times import NEVER
from segs.tools.simulator.batch import Batch
from segs.tools.simulator.encoding import (
    FIRMWARES,
    MASK48,
    MULT,
    S_MAX,
    S_MIN,
    TEMPLATE,
    V_MAX,
    V_MIN,
    Fragments,
    obj_array,
    sec_text,
)
from segs.tools.simulator.inject import MARGIN, WARMUP, add_disorder, pick_anomalies
from segs.tools.simulator.options import (
    VALID,
    SimMessage,
    SimulatorOptions,
    region_names,
    wall_clock_ms,
)

_AHEAD_MS: Final = 3_000  # a round is held back while it is this far ahead of the clock
_CHUNK: Final = 8192  # meters per batch


class Simulation:
    """Per-meter state and the lookup tables; :meth:`batches` yields the stream."""

    def __init__(self, opts: SimulatorOptions, now_ms: int | None = None) -> None:
        self.opts = opts
        now = wall_clock_ms() if now_ms is None else now_ms
        self.interval_ms = opts.interval_ms
        self.start_ms = opts.start_ms if opts.start_ms is not None else default_start(opts, now)
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
        firmware = rng.integers(0, len(FIRMWARES), m, dtype=np.int64)
        self.status_row = firmware * 2 * (S_MAX - S_MIN + 1)
        self.signal = rng.integers(-90, -50, m, dtype=np.int64)
        self.salt = rng.integers(0, 1 << 48, m, dtype=np.int64).astype(np.uint64)
        ids = rng.integers(0, 1 << 16, (m, 5), dtype=np.int64).tolist()
        self.ema = np.zeros(m)
        self.last_anomaly_ms = np.full(m, NEVER, np.int64)
        self.last_anomaly_round = np.full(m, -(2**40), np.int64)

        numbers = number.tolist()
        self.keys: list[bytes | None] = [b"MTR-%08d" % k for k in numbers]
        self.text = Fragments(ids, numbers, self.interval_ms, region_names(opts.regions))
        self.sec_cache: dict[int, bytes] = {}

        f = opts
        rest = 1.0 - (f.duplicate_fraction + f.late_fraction + f.invalid_fraction)
        q = [f.duplicate_fraction, f.late_fraction, f.invalid_fraction, f.out_of_order_fraction]
        self.q_edges = np.cumsum([x / rest for x in q])
        self.anomaly_fraction = f.anomaly_fraction

    # -- the stream ---------------------------------------------------------------------

    def batches(self, stopped: Callable[[], bool] = lambda: False) -> Iterator[Batch]:
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
        while (wait := last_ts_ms - self.ahead_ms - wall_clock_ms()) > 0:
            if stopped():
                return False
            time.sleep(min(wait / 1000.0, 0.1))
        return True

    def _sec(self, sec: int) -> bytes:
        text = self.sec_cache.get(sec)
        if text is None:
            if len(self.sec_cache) > 4096:
                self.sec_cache.clear()
            text = self.sec_cache[sec] = sec_text(sec)
        return text

    def _chunk(self, r: int, a: int, b: int) -> Batch:
        rng = self.rng
        n = b - a
        base = self.base[a:b]
        ema = self.ema[a:b]  # a view: updated in place below
        ts = self.start_ms + r * self.interval_ms + self.phase[a:b]

        power = base * rng.uniform(0.8, 1.2, n)
        if r > 0:  # keep the detector quiet: inside both thresholds, with a margin
            low = np.maximum(base * 0.8, ema * (0.5 * (1 + MARGIN)))
            high = np.minimum(base * 1.2, ema * (2.0 * (1 - MARGIN)))
            power = np.minimum(np.maximum(power, low), high)
        milli = np.clip(np.rint(power * 1000.0).astype(np.int64), self.p_low[a:b], self.p_high[a:b])

        status = np.zeros(n, np.int64)
        anomalies: list[str | None] = [None] * n
        anomaly_counts: Counter[str] = Counter()
        if self.anomaly_fraction > 0 and r >= WARMUP:
            hit = pick_anomalies(self, r, a, b, ts, milli)
            for i, kind in hit:
                status[i] = 1
                anomalies[i] = kind
                anomaly_counts[kind] += 1

        kw = milli / 1000.0  # exactly what the detector will parse
        ema[:] = kw if r == 0 else 0.8 * ema + 0.2 * kw

        sec = ts // 1000
        uniq, where = np.unique(sec, return_inverse=True)
        sec_texts = obj_array([self._sec(s) for s in uniq.tolist()])[where]
        seq = r + 1
        tail = (np.uint64(seq) * np.uint64(MULT) + self.salt[a:b]) & np.uint64(MASK48)
        volt = np.clip(np.rint(rng.normal(2300.0, 15.0, n)).astype(np.int64), V_MIN, V_MAX)
        sig = np.clip(self.signal[a:b] + rng.integers(-3, 4, n), S_MIN, S_MAX)
        values = list(
            map(
                TEMPLATE.__mod__,
                zip(
                    self.text.pre[a:b].tolist(),
                    tail.tolist(),
                    self.text.mid[a:b].tolist(),
                    sec_texts.tolist(),
                    self.text.ms_tab[ts - sec * 1000].tolist(),
                    self.text.pe_tab[milli].tolist(),
                    self.text.vr_tab[
                        self.region[a:b] * (V_MAX - V_MIN + 1) + volt - V_MIN
                    ].tolist(),
                    repeat(seq, n),
                    self.text.st_tab[
                        self.status_row[a:b] + status * (S_MAX - S_MIN + 1) + sig - S_MIN
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
            return Batch(keys, values, kinds, anomalies, counts, anomaly_counts, last_ts)

        u = rng.random(n)
        u[status == 1] = 2.0  # anomaly readings stay as they are
        e = self.q_edges
        dup = np.flatnonzero(u < e[0])
        late = np.flatnonzero((u >= e[0]) & (u < e[1]))
        bad = np.flatnonzero((u >= e[1]) & (u < e[2]))
        ooo = np.flatnonzero((u >= e[2]) & (u < e[3]))
        folded = np.concatenate([dup, late])
        ema[folded] = kw[folded] + (ema[folded] - kw[folded]) * 0.8  # the detector folds copies
        return add_disorder(
            self,
            r,
            a,
            ts,
            Batch(keys, values, kinds, anomalies, Counter(), anomaly_counts, last_ts),
            dup,
            late,
            bad,
            ooo,
        )


def default_start(opts: SimulatorOptions, now_ms: int) -> int:
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


def limited(
    sim: Simulation, opts: SimulatorOptions, stop: Callable[[], bool] | None = None
) -> Iterator[Batch]:
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
    for batch in limited(Simulation(opts), opts):
        yield batch.messages()
