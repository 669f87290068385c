"""Injected anomalies and disorder, drawn from the run's generator in a fixed order.

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
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray

from segs.tools.simulator.batch import Batch, gather
from segs.tools.simulator.encoding import reading_id, ts_text
from segs.tools.simulator.invalid import INVALID_VARIANTS, make_invalid
from segs.tools.simulator.options import (
    ANOMALY_KINDS,
    DUPLICATE,
    INVALID,
    LATE,
    OUT_OF_ORDER,
    VALID,
)

if TYPE_CHECKING:
    from segs.tools.simulator.model import Simulation

WARMUP: Final = 12  # readings of a meter before its first anomaly (detector needs 10)
_SPACING_MS: Final = 600_000  # event time between two anomalies of a meter
MARGIN: Final = 0.03  # normal readings stay this far inside the detector's thresholds
_LATE_MS: Final = (70_000, 3_600_000)
_EXTRA_DELAY: Final = 16  # duplicates, late copies and invalid messages: 0..16 positions later
_OOO_DELAY: Final = 8  # out-of-order readings: 1..8 positions later


def pick_anomalies(
    sim: Simulation, r: int, a: int, b: int, ts: NDArray[np.int64], milli: NDArray[np.int64]
) -> list[tuple[int, str]]:
    rng = sim.rng
    base = sim.base[a:b]
    ema = sim.ema[a:b]
    eligible = (
        (ts - sim.last_anomaly_ms[a:b] >= _SPACING_MS)
        & (r - sim.last_anomaly_round[a:b] >= WARMUP)
        & (np.abs(ema - base) <= 0.1 * base)
    )
    # aim at anomaly_fraction of this chunk's readings, drawn among the eligible ones
    p = sim.anomaly_fraction * (b - a) / max(1, int(eligible.sum()))
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
        change > 1.0 + MARGIN,
        np.where(kind == 1, (change < -0.5 - MARGIN) & (kw >= 0.1), (kw < 0.1) & (baseline > 1.0)),
    )
    out: list[tuple[int, str]] = []
    for i, k, v, ok in zip(
        hit.tolist(), kind.tolist(), value.tolist(), fires.tolist(), strict=True
    ):
        if ok:
            milli[i] = v
            sim.last_anomaly_ms[a + i] = ts[i]
            sim.last_anomaly_round[a + i] = r
            out.append((i, ANOMALY_KINDS[k]))
    return out


def add_disorder(
    sim: Simulation,
    r: int,
    a: int,
    ts: NDArray[np.int64],
    batch: Batch,
    dup: NDArray[np.intp],
    late: NDArray[np.intp],
    bad: NDArray[np.intp],
    ooo: NDArray[np.intp],
) -> Batch:
    rng = sim.rng
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
        x_values.append(late_copy(sim, values[i], int(ts[i]), lag, r, a + i))
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
    return Batch(
        gather(keys + x_keys, order),
        gather(values + x_values, order),
        kinds + x_kinds,
        anomalies + [None] * len(x_values),
        counts,
        batch.anomaly_counts,
        batch.last_event_ms,
        order,
    )


def late_copy(sim: Simulation, value: bytes, ts_ms: int, lag_ms: int, r: int, slot: int) -> bytes:
    old_id = value[14:50]
    new_id = reading_id(sim.opts.seed, int(sim.number[slot]), r, "late")
    old_ts = b'"timestamp":"' + ts_text(ts_ms).encode()
    new_ts = b'"timestamp":"' + ts_text(ts_ms - lag_ms).encode()
    return value.replace(old_id, new_id, 1).replace(old_ts, new_ts, 1)
