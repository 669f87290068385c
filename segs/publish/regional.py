"""Regional 1-minute aggregates: per (region, window), once every input partition passed it.

The alert and tariff services read the topic ``aggregates_1m_regional``
(``KAFKA_TOPIC_REGIONAL_AGG_1M``). A region's meters spread over every partition, so no
worker alone knows when a region's window is complete; the database does. Rules:

* **Dirty windows.** Every checkpoint transaction that writes 1-minute rows appends, in the
  same transaction, one ``regional_dirty`` row per window it wrote (:meth:`Sink.commit`), so
  a crash never loses one, and a late reading makes its window dirty again.
* **Closed everywhere.** A dirty window is computed once the stored watermark of *every*
  partition of the input topic (``stream_positions``, whoever owns it) has passed its end;
  a partition with no stored watermark holds everything back (workers store the watermark
  of idle and empty partitions too). :func:`oldest_waiting_s` is the gauge an operator
  watches for a partition that does.
* **One computer.** After its checkpoint a worker tries the transaction-scoped advisory lock
  of its consumer group; the holder computes the closed dirty windows, upserts their rows in
  ``aggregates_1m_regional`` (unpublished), and deletes exactly the dirty rows it read, all
  in one transaction. Computes never overlap, so a newer computation is never overwritten
  by an older one; a dirty row appended meanwhile survives and the window is computed again.
* **Exact.** The figures are a function of the window's stored ``aggregates_1m`` rows alone
  (:func:`figures`): per meter ``power_sum / sample_count``; their total summed with
  ``math.fsum`` (correctly rounded, so independent of row order, worker and host), maxima
  and minima exact, ``load_percentage`` rounded as the original service rounded it.
* **Published** by the claim pattern of closed windows (:meth:`Sink.claim_closed`): a chunk of
  unpublished rows is claimed (``claimed_until``: other publishers skip it until then),
  delivered with no transaction open, and marked published only if it is still the version
  claimed (``xmin``); a row recomputed meanwhile is written once more, unpublished, so the
  newest value is the last one on the topic. A crash between compute and publish leaves rows
  unpublished, and the next computer publishes them: at-least-once, latest value winning.
* **Large regions.** The meter list is read from ``aggregates_1m`` at publish time. With
  ``REGIONAL_METER_LIST=none``, or when the message would exceed the topic's
  ``max.message.bytes``, it goes out with ``active_meters: []`` and
  ``active_meters_omitted: true``: an empty array, not a missing field, because the alert
  service iterates over it and would otherwise drop the whole message.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import msgspec
import psycopg
from psycopg.rows import TupleRow

from segs.config import DEFAULT_REGION_CAPACITY_KW
from segs.errors import DatabaseError
from segs.publish.outputs import Headers, Message
from segs.times import iso_ms
from segs.windows.sizes import REGIONAL_GRANULARITY

log = logging.getLogger("segs.regional")

WINDOW_MS = 60_000
GRANULARITY = REGIONAL_GRANULARITY  # the label value of stream_aggregates_published_total
_LOCK_CLASS = 0x5E65  # first key of the advisory lock; the second is hashtext(group)
_MAX_WINDOWS = 120  # windows computed per pass at most (oldest first); the rest next time
_CHUNK = 32  # region-windows per publishing chunk (each may carry a long meter list)
CLAIM_S = 30  # a claim not marked within this long is taken to be abandoned
_RECORD_OVERHEAD = 512  # room for Kafka's record framing
_TYPE = ("type", b"regional_1m_aggregate")
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Figures:
    """One region-window: the stored row and the message, but for the meter list."""

    region: str
    window_start_ms: int
    meter_count: int
    total_consumption: float
    avg_consumption: float
    max_consumption: float
    min_consumption: float
    load_percentage: float


def round_2(x: float) -> float:
    """``x`` rounded to 2 decimals as JavaScript's ``parseFloat(x.toFixed(2))`` does: from
    the exact binary value, a tie going up (``0.125`` → 0.13, while ``1.005``, stored as
    1.00499…, → 1.0)."""
    if not math.isfinite(x):
        return x
    return float(Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def figures(region: str, window_start_ms: int, avgs: Sequence[float], maxes: Sequence[float],
            capacity_kw: float) -> Figures:
    """The regional figures of one window from its meters' average and maximum powers
    (one entry per meter with a reading in the window; at least one)."""
    total = math.fsum(avgs)
    return Figures(region, window_start_ms, len(avgs), total, total / len(avgs), max(maxes),
                   min(avgs), round_2(total / capacity_kw * 100))


def capacity(capacities: Mapping[str, float], region: str) -> float:
    return capacities.get(region, DEFAULT_REGION_CAPACITY_KW)


def encode(f: Figures, meters: Sequence[str] | None, limit: int
           ) -> tuple[bytes, bytes, Headers, bool]:
    """(key, value, headers, list omitted) of one region-window's message; ``meters`` None
    means the list is omitted, as it is when the message would exceed ``limit`` bytes."""
    key = f.region.encode()
    headers = [_TYPE, ("region", key)]
    value: dict[str, Any] = {
        "region": f.region,
        "timestamp": iso_ms(f.window_start_ms),
        "windowStart": iso_ms(f.window_start_ms),
        "windowEnd": iso_ms(f.window_start_ms + WINDOW_MS),
        "meter_count": f.meter_count,
        "total_consumption": f.total_consumption,
        "avg_consumption": f.avg_consumption,
        "max_consumption": f.max_consumption,
        "min_consumption": f.min_consumption,
        "load_percentage": f.load_percentage,
        "active_meters": list(meters) if meters is not None else [],
        "active_meters_omitted": meters is None,
    }
    budget = limit - _RECORD_OVERHEAD - len(key) - sum(len(n) + len(v) for n, v in headers)
    body = _encode(value)
    if meters is not None and len(body) > budget:
        value["active_meters"], value["active_meters_omitted"] = [], True
        body = _encode(value)
    return key, body, headers, bool(value["active_meters_omitted"])



@dataclass(slots=True)
class PassStats:
    """What one regional pass did (:meth:`Regional.run`)."""

    computer: bool = False  # this worker held the lock
    windows: int = 0  # windows computed
    rows: int = 0  # region-windows stored
    published: int = 0  # regional messages delivered
    omitted: int = 0  # … of them without their meter list
    waiting_s: float = 0.0  # age of the oldest region-window not yet published
    horizon_ms: int | None = None  # every partition's stored watermark is past this
    holding: list[int] = field(default_factory=list)  # … partitions at it, or without one
    # region → (window start ms, load_percentage) of its newest window delivered
    loads: dict[str, tuple[int, float]] = field(default_factory=dict)


_HORIZON = """
SELECT kafka_partition, watermark_ms FROM stream_positions
WHERE consumer_group = %s AND topic = %s AND kafka_partition < %s
"""
_DIRTY = """
SELECT id, (extract(epoch FROM window_start) * 1000)::int8 FROM regional_dirty
WHERE consumer_group = %s
"""
# One window of aggregates_1m, per region: each meter's average and maximum power.
_WINDOW = """
SELECT region, array_agg(power_sum / sample_count), array_agg(max_power)
FROM aggregates_1m
WHERE window_start = 'epoch'::timestamptz + %s * interval '1 millisecond'
GROUP BY region
"""
_UPSERT = """
INSERT INTO aggregates_1m_regional AS r (region, window_start, window_end, meter_count,
    total_consumption, avg_consumption, max_consumption, min_consumption, load_percentage,
    published, claimed_until)
SELECT k.region, 'epoch'::timestamptz + k.start_ms * interval '1 millisecond',
    'epoch'::timestamptz + (k.start_ms + 60000) * interval '1 millisecond', k.n, k.total,
    k.avg, k.mx, k.mn, k.load, false, NULL
FROM unnest(%s::text[], %s::int8[], %s::int4[], %s::float8[], %s::float8[], %s::float8[],
            %s::float8[], %s::float8[]) AS k(region, start_ms, n, total, avg, mx, mn, load)
ON CONFLICT (region, window_start) DO UPDATE SET
    meter_count = EXCLUDED.meter_count, total_consumption = EXCLUDED.total_consumption,
    avg_consumption = EXCLUDED.avg_consumption, max_consumption = EXCLUDED.max_consumption,
    min_consumption = EXCLUDED.min_consumption, load_percentage = EXCLUDED.load_percentage,
    published = false, claimed_until = NULL, updated_at = now()
"""
# A region of a recomputed window with no meter left in it (a late reading moved its last
# meter to another region) keeps its row, emptied: meter_count 0 and zeros, published once
# more, so the topic's latest message for it no longer lists a meter it does not have.
_GONE = """
UPDATE aggregates_1m_regional SET meter_count = 0, total_consumption = 0,
    avg_consumption = 0, max_consumption = 0, min_consumption = 0, load_percentage = 0,
    published = false, claimed_until = NULL, updated_at = now()
WHERE window_start = 'epoch'::timestamptz + %s * interval '1 millisecond'
  AND NOT (region = ANY(%s::text[])) AND meter_count <> 0
"""
_CLAIM = f"""
WITH c AS (
    SELECT region, window_start FROM aggregates_1m_regional
    WHERE NOT published AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY window_start, region
    LIMIT %s
    FOR UPDATE SKIP LOCKED)
UPDATE aggregates_1m_regional AS a SET claimed_until = now() + interval '{CLAIM_S} s'
FROM c WHERE a.region = c.region AND a.window_start = c.window_start
RETURNING a.xmin::text, a.region, (extract(epoch FROM a.window_start) * 1000)::int8,
    a.meter_count, a.total_consumption, a.avg_consumption, a.max_consumption,
    a.min_consumption, a.load_percentage
"""
_METERS = """
SELECT region, array_agg(meter_id ORDER BY meter_id COLLATE "C") FROM aggregates_1m
WHERE window_start = 'epoch'::timestamptz + %s * interval '1 millisecond'
  AND region = ANY(%s::text[])
GROUP BY region
"""
# After delivery (as Sink.claim_closed): a row still at the version claimed is published; a
# row written since (recomputed) is written once more, unpublished, so that any other claim
# of it in flight fails its own check too. On a failed delivery the claim is released.
_MARK = """
WITH marked AS (
    UPDATE aggregates_1m_regional AS a
    SET published = %s AND (a.xmin::text = k.version), claimed_until = NULL
    FROM unnest(%s::text[], %s::int8[], %s::text[]) AS k(region, start_ms, version)
    WHERE a.region = k.region
      AND a.window_start = 'epoch'::timestamptz + k.start_ms * interval '1 millisecond'
    RETURNING a.published)
SELECT count(*) FILTER (WHERE published) FROM marked
"""
_OLDEST = """
SELECT least(
    (SELECT min(window_start) FROM regional_dirty WHERE consumer_group = %s),
    (SELECT min(window_start) FROM aggregates_1m_regional WHERE NOT published))
"""

Connect = Callable[[], AbstractContextManager[psycopg.Connection[TupleRow]]]


class Regional:
    """The regional roll-up of one worker: compute when elected, publish, measure."""

    def __init__(self, connect: Connect, *, group: str, topic: str,
                 capacities: Mapping[str, float], meter_list: bool) -> None:
        self._connect = connect
        self.group = group
        self.topic = topic
        self.capacities = dict(capacities)
        self.meter_list = meter_list

    def run(self, partitions: int, deliver: Callable[[list[Message]], None], limit: int, *,
            stop: Callable[[], bool] = lambda: False) -> PassStats:
        """One pass after a checkpoint: compute the closed dirty windows if this worker gets
        the lock, then (only then) publish what is unpublished, chunk by chunk until none
        is left or ``stop()``. ``partitions`` is the input topic's partition count,
        ``deliver`` hands messages to Kafka durably (produce + flush) or raises, ``limit``
        is the largest message the topic takes. Raises :class:`DatabaseError`."""
        out = PassStats()
        try:
            out.computer = self._compute(partitions, out, stop)
            if out.computer:
                while not stop() and self._publish_chunk(deliver, limit, out):
                    pass
            out.waiting_s = self._oldest_waiting_s()
        except psycopg.Error as exc:
            raise DatabaseError(_one_line(exc)) from exc
        return out

    # ------------------------------------------------------------------ compute

    def _compute(self, partitions: int, out: PassStats, stop: Callable[[], bool]) -> bool:
        """Roll up the closed dirty windows, oldest first, in one transaction; at least
        one, then until ``stop()`` (the rest waits for the next pass). False when another
        worker holds the lock."""
        with self._connect() as conn, conn.transaction():
            got = conn.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                               (_LOCK_CLASS, self.group)).fetchone()
            if not got or not got[0]:
                return False
            wms: dict[int, int | None] = dict(
                conn.execute(_HORIZON, (self.group, self.topic, partitions)).fetchall())
            horizon, out.holding = closed_horizon(wms, partitions)
            out.horizon_ms = horizon
            if horizon is None:
                return True
            dirty: dict[int, list[int]] = {}
            for row_id, start_ms in conn.execute(_DIRTY, (self.group,)).fetchall():
                dirty.setdefault(int(start_ms), []).append(int(row_id))
            closed: list[int] = []
            for start_ms in sorted(s for s in dirty if s + WINDOW_MS <= horizon):
                if len(closed) >= _MAX_WINDOWS or (closed and stop()):
                    break
                out.rows += self._compute_window(conn, start_ms)
                closed.append(start_ms)
            done = [i for s in closed for i in dirty[s]]
            if done:
                conn.execute("DELETE FROM regional_dirty WHERE id = ANY(%s)", (done,))
            out.windows = len(closed)
        return True

    def _compute_window(self, conn: psycopg.Connection[TupleRow], start_ms: int) -> int:
        rows = [figures(region, start_ms, avgs, maxes, capacity(self.capacities, region))
                for region, avgs, maxes in conn.execute(_WINDOW, (start_ms,)).fetchall()]
        conn.execute(_GONE, (start_ms, [f.region for f in rows]))
        if rows:
            conn.execute(_UPSERT, (
                [f.region for f in rows], [f.window_start_ms for f in rows],
                [f.meter_count for f in rows], [f.total_consumption for f in rows],
                [f.avg_consumption for f in rows], [f.max_consumption for f in rows],
                [f.min_consumption for f in rows], [f.load_percentage for f in rows]))
        return len(rows)

    # ------------------------------------------------------------------ publish

    def _publish_chunk(self, deliver: Callable[[list[Message]], None], limit: int,
                       out: PassStats) -> bool:
        """Claim, deliver and mark one chunk; False when there was nothing to claim."""
        with self._connect() as conn:  # commits (ends the claim) on leaving
            got = conn.execute(_CLAIM, (_CHUNK,)).fetchall()
        if not got:
            return False
        claimed = sorted(((version, Figures(region, int(start), *values))
                          for version, region, start, *values in got),
                         key=lambda c: (c[1].window_start_ms, c[1].region))
        keys = ([f.region for _, f in claimed], [f.window_start_ms for _, f in claimed],
                [version for version, _ in claimed])
        try:
            messages: list[Message] = []
            by_window: dict[int, list[Figures]] = {}
            for _, f in claimed:
                by_window.setdefault(f.window_start_ms, []).append(f)
            for start, rows in by_window.items():
                meters = self._meters(start, [f.region for f in rows])
                for f in rows:
                    listed = meters.get(f.region, [] if f.meter_count == 0 else None)
                    key, value, headers, omitted = encode(f, listed, limit)
                    messages.append((key, value, headers))
                    out.omitted += omitted
            deliver(messages)
        except BaseException:
            with self._connect() as conn:  # the claim is released: the next pass retries
                conn.execute(_MARK, (False, *keys))
            raise
        with self._connect() as conn:
            marked = conn.execute(_MARK, (True, *keys)).fetchone()
        if marked and marked[0] < len(got):
            log.debug("%d region-windows changed while delivered: they are published again",
                      len(got) - marked[0])
        out.published += len(got)
        for _, f in claimed:
            start = f.window_start_ms
            if start >= out.loads.get(f.region, (start, 0.0))[0]:
                out.loads[f.region] = (start, float(f.load_percentage))
        return True

    def _meters(self, start_ms: int, regions: list[str]) -> dict[str, list[str] | None]:
        if not self.meter_list:
            return {}
        with self._connect() as conn:
            return dict(conn.execute(_METERS, (start_ms, regions)).fetchall())

    def _oldest_waiting_s(self) -> float:
        with self._connect() as conn:
            row = conn.execute(_OLDEST, (self.group,)).fetchone()
        if not row or row[0] is None:
            return 0.0
        oldest_s = float(row[0].timestamp())
        return max(0.0, time.time() - oldest_s - WINDOW_MS / 1000)


def closed_horizon(watermarks: Mapping[int, int | None], partitions: int
                   ) -> tuple[int | None, list[int]]:
    """The time up to which every partition ``0 … partitions-1`` has passed (the lowest
    stored watermark; None when a partition has none stored), and the partitions at it —
    the ones holding regional output back."""
    missing = [p for p in range(partitions) if watermarks.get(p) is None]
    if missing or partitions <= 0:
        return None, missing
    low = min(int(watermarks[p]) for p in range(partitions))  # type: ignore[arg-type]
    return low, [p for p in range(partitions) if watermarks[p] == low]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
