"""Tumbling event-time windows per meter, kept as mergeable partials in numpy arrays.

State of one :class:`WindowEngine` (one window size) is a ring of ``R`` cells per meter
slot, flattened to 1-D arrays indexed ``meter * R + window_index % R``. A batch is applied
with a handful of vectorised ufuncs (``np.add.at`` / ``np.maximum.at`` / ``np.minimum.at``),
no per-reading Python.

Late-data policy (nothing is ever dropped):

* a reading for the window its cell holds is added to the cell;
* a reading for a newer window than its cell holds first moves the cell's pending partial
  to the *overflow* list (drained with everything else) and takes the cell over;
* a reading for an older window than its cell holds becomes a one-reading partial in
  overflow;
* a reading whose window end is ≤ its partition's watermark as it was before the batch
  is *late*: :meth:`WindowEngine.add` counts it, and its window is reported by
  :meth:`WindowEngine.closed` once more so it is re-published.

Watermark per partition = highest event time seen − ``allowed_lateness_ms``, raised to
``now − allowed_lateness_ms`` by :meth:`WindowEngine.advance_idle` when the partition saw
no reading for ``idle_advance_ms`` of wall clock.

Re-sent readings (``deduplicate=True``, 1-minute windows only): a cell whose window started
after its partition's *threshold* (:meth:`WindowEngine.set_threshold`: the newest event time
stored for the partition, so nothing of that window can be stored) is *known*: it holds every
identity counted in its window (:mod:`segs.windows.slab`), and a reading for it is
counted or dropped as a duplicate right here, until a drain finds the window closed and
releases them. Every other reading (a window at or before the threshold, one closed at a
drain, one older than its cell holds) is *undecided*: it is kept raw, counted in no
partial, and decided in the checkpoint's transaction against the stored identities
(:mod:`segs.checkpoint.dedup`). A cell never becomes known after it took its window, and
windows only move forward in a cell, so an undecided window stays undecided. A slot given
back (:meth:`WindowEngine.release`, an evicted meter) starts again from no window, so the
threshold is also at least the end of the newest window any released cell held.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import Interner, Readings, grown, room
from segs.times import NEVER
from segs.windows.identities import IdentityLog
from segs.windows.partials import Partials, combine, of_readings, region_ranks
from segs.windows.slab import IdentitySlab

__all__ = ["Partials", "WindowEngine"]


_MIN_CAPACITY = 1024


class _Unreported(NamedTuple):
    """Windows that left their cells (overflow) and are still to be reported closed."""

    meter: NDArray[np.int32]
    window: NDArray[np.int64]  # window index: start // size
    partition: NDArray[np.int32]


class Added(NamedTuple):
    """What :meth:`WindowEngine.add_distinct` did with a batch, by reading."""

    late: int
    counted: NDArray[np.bool_]  # counted now: a new identity of a known window
    undecided: NDArray[np.bool_]  # kept raw for the checkpoint to decide
    duplicates: int  # dropped: identity counted already


def default_ring(size_s: int, allowed_lateness_ms: int) -> int:
    """Cells per meter: the window being filled and those still open by the lateness, ≥ 2.
    Between two checkpoints a meter's readings span one or two windows; a rarer older one
    goes to overflow, exact but dearer, so more cells would be memory held for nothing."""
    size_ms = size_s * 1000
    return max(2, -(-(allowed_lateness_ms + size_ms) // size_ms))


class WindowEngine:
    """Partial aggregates of one window size for every meter slot."""

    _win: NDArray[np.int64]
    _count: NDArray[np.int32]
    _psum: NDArray[np.float64]
    _pmax: NDArray[np.float64]
    _pmin: NDArray[np.float64]
    _esum: NDArray[np.float64]
    _vsum: NDArray[np.float64]
    _vcnt: NDArray[np.int32]
    _last: NDArray[np.int64]
    _region: NDArray[np.int32]
    _part: NDArray[np.int32]
    _open: NDArray[np.bool_]
    _known: NDArray[np.bool_]
    _scratch: NDArray[np.int64]

    def __init__(
        self,
        size_s: int,
        *,
        regions: Interner,
        allowed_lateness_ms: int = 5000,
        idle_advance_ms: int = 10000,
        ring: int | None = None,
        report_closed: bool = False,
        deduplicate: bool = False,
    ) -> None:
        """``report_closed=True`` only for a caller that asks :meth:`closed` (the worker
        does not: it publishes closed windows from the database). Windows are then kept
        until reported, which grows by every meter's window every window when nobody asks."""
        if size_s <= 0:
            raise ValueError(f"window size must be positive, got {size_s}")
        self.size_s = size_s
        self.size_ms = size_s * 1000
        self.regions = regions
        self.allowed_lateness_ms = allowed_lateness_ms
        self.idle_advance_ms = idle_advance_ms
        self.ring = ring if ring is not None else default_ring(size_s, allowed_lateness_ms)
        self.report_closed = report_closed
        if self.ring < 1:
            raise ValueError(f"ring must be ≥ 1, got {self.ring}")
        self.deduplicate = deduplicate
        if deduplicate and self.size_ms > 1 << 16:
            raise ValueError("identities are 16-bit offsets: windows of at most 65 s")
        self._ids = IdentitySlab(self.ring)
        # new identities taken from the slab (at a drain, or of a window a cell left), by
        # window, until take_identities hands them to the checkpoint
        self._waiting: list[IdentityLog] = []
        self._undecided: list[Readings] = []
        self._capacity = 0  # meter slots
        self._alloc_cells(0)
        # per partition
        self._max_ts = np.empty(0, np.int64)
        self._threshold = np.empty(0, np.int64)  # newest event time stored (deduplicate)
        self._wm = np.empty(0, np.int64)
        self._last_wall = np.empty(0, np.int64)
        self._seen = np.empty(0, np.bool_)
        # overflow: pending partials and windows that still have to be reported closed
        self._over: list[Partials] = []
        self._over_open: list[_Unreported] = []
        self._rank = np.empty(0, np.int64)
        # (deduplicate) the end of the newest window a released slot's cells held, for a
        # caller that cannot seed returning meters (release(floor=True))
        self._evicted_through = NEVER
        self.use_packed_keys = True  # False forces the general (slower) latest-tuple path

    # -----------------------------------------------------------------------------------
    # storage

    def _alloc_cells(self, capacity: int) -> None:
        n = capacity * self.ring
        first = self._capacity == 0
        self._win = grown(None if first else self._win, n, NEVER)  # window index held
        self._count = grown(None if first else self._count, n, 0, np.int32)
        self._psum = grown(None if first else self._psum, n, 0.0)
        self._pmax = grown(None if first else self._pmax, n, -np.inf)
        self._pmin = grown(None if first else self._pmin, n, np.inf)
        self._esum = grown(None if first else self._esum, n, 0.0)
        self._vsum = grown(None if first else self._vsum, n, 0.0)  # readings with a voltage
        self._vcnt = grown(None if first else self._vcnt, n, 0, np.int32)
        self._last = grown(None if first else self._last, n, NEVER)  # ts of latest reading
        self._region = grown(None if first else self._region, n, -1, np.int32)
        self._part = grown(None if first else self._part, n, -1, np.int32)
        self._open = grown(None if first else self._open, n, False)  # not reported closed
        self._known = grown(None if first else self._known, n, False)  # identities complete
        if self.deduplicate:
            self._ids.grow(n)
        self._scratch = grown(None if first else self._scratch, n, 0)
        self._capacity = capacity

    def _ensure_meters(self, n: int) -> None:
        if n > self._capacity:
            self._alloc_cells(max(room(n, self._capacity), _MIN_CAPACITY))

    def _ensure_partitions(self, n: int) -> None:
        old = self._wm.shape[0]
        if n <= old:
            return
        size = max(n, 2 * old, 8)

        def ext(a: NDArray[np.generic], fill: int | bool) -> NDArray[np.generic]:
            b = np.full(size, fill, a.dtype)
            b[:old] = a
            return b

        self._max_ts = ext(self._max_ts, NEVER)  # type: ignore[assignment]
        self._threshold = ext(self._threshold, NEVER)  # type: ignore[assignment]
        self._wm = ext(self._wm, NEVER)  # type: ignore[assignment]
        self._last_wall = ext(self._last_wall, NEVER)  # type: ignore[assignment]
        self._seen = ext(self._seen, False)  # type: ignore[assignment]

    def _ranks(self) -> NDArray[np.int64]:
        if self._rank.shape[0] != len(self.regions):
            self._rank = region_ranks(self.regions)
        return self._rank

    def _reset_pending(self, cells: NDArray[np.intp]) -> None:
        self._count[cells] = 0
        self._psum[cells] = 0.0
        self._pmax[cells] = -np.inf
        self._pmin[cells] = np.inf
        self._esum[cells] = 0.0
        self._vsum[cells] = 0.0
        self._vcnt[cells] = 0
        self._last[cells] = NEVER

    def _cell_partials(self, cells: NDArray[np.intp], win: NDArray[np.int64]) -> Partials:
        return Partials(
            size_s=self.size_s,
            meter=(cells // self.ring).astype(np.int32),
            window_start_ms=win * self.size_ms,
            count=self._count[cells].astype(np.int64),
            power_sum=self._psum[cells],
            power_max=self._pmax[cells],
            power_min=self._pmin[cells],
            energy_sum=self._esum[cells],
            last_ts_ms=self._last[cells],
            region=self._region[cells],
            partition=self._part[cells],
            voltage_sum=self._vsum[cells],
            voltage_count=self._vcnt[cells].astype(np.int64),
        )

    # -----------------------------------------------------------------------------------
    # updates

    def add(self, r: Readings, now_ms: int) -> int:
        """Apply a batch of readings; returns how many of them were late. With
        ``deduplicate``, by :meth:`add_distinct`."""
        if self.deduplicate:
            return self.add_distinct(r, now_ms).late
        if len(r) == 0:
            return 0
        late, w, cell, old, new = self._place(r, now_ms)
        moved = new != old
        if moved.any():
            self._evict(cell[moved], old[moved])
        stale = w != new  # the cell holds a newer window
        if stale.any():
            self._to_overflow(r.take(stale), w[stale])
            keep = ~stale
            r, w, cell = r.take(keep), w[keep], cell[keep]
        self._accumulate(r, w, cell)
        return late

    def _place(self, r: Readings, now_ms: int) -> tuple[
            int, NDArray[np.int64], NDArray[np.intp], NDArray[np.int64], NDArray[np.int64]]:
        """The step both ways of adding share: grow the tables, count the late readings,
        advance the watermarks and move each reading's cell to the newest window among its
        readings. Returns (late, window index, cell, the cell's window before and after)."""
        part = r.partition
        if int(part.min()) < 0:
            raise ValueError("partitions must be ≥ 0")
        self._ensure_partitions(int(part.max()) + 1)
        self._ensure_meters(int(r.meter.max()) + 1)
        w = r.ts_ms // self.size_ms
        late = int(np.count_nonzero((w + 1) * self.size_ms <= self._wm[part]))
        self._advance(part, r.ts_ms, now_ms)
        cell = r.meter.astype(np.intp) * self.ring + (w % self.ring)
        old = self._win[cell]
        np.maximum.at(self._win, cell, w)
        return late, w, cell, old, self._win[cell]

    def add_distinct(self, r: Readings, now_ms: int) -> Added:
        """Apply a batch, each identity counted once (see the module docstring): the first
        reading of a new identity of a known window is counted, later ones are dropped as
        duplicates, readings of other windows are kept undecided for the checkpoint."""
        n = len(r)
        counted = np.zeros(n, np.bool_)
        if n == 0:
            return Added(0, counted, counted.copy(), 0)
        late, w, cell, old, new = self._place(r, now_ms)
        part, ts, size_ms = r.partition, r.ts_ms, self.size_ms
        moved = new != old
        if moved.any():
            self._evict(cell[moved], old[moved])
            self._left_window(cell[moved], old[moved])
            took = moved & (w == new)
            cells = cell[took]
            self._known[cells] = True  # unless one of its readings' partitions stored it
            stored = np.maximum(self._threshold[part[took]], self._evicted_through)
            self._known[cells[w[took] * size_ms <= stored]] = False
        decided = (w == new) & self._known[cell]
        undecided = ~decided
        if undecided.any():
            self._undecided.append(r.take(undecided))
        idx = np.flatnonzero(decided)
        if idx.size == 0:
            return Added(late, counted, undecided, 0)
        off = ts[idx] - w[idx] * size_ms
        sel = idx[self._ids.first_new(cell[idx], off)]
        counted[sel] = True
        self._accumulate(r if sel.size == n else r.take(sel), w[sel], cell[sel])
        return Added(late, counted, undecided, int(idx.size - sel.size))

    def _left_window(self, cells: NDArray[np.intp], old: NDArray[np.int64]) -> None:
        """Cells that took a newer window than ``old``: the new identities of the old one
        wait for the checkpoint (its partial went to overflow), the rest is forgotten."""
        cells, first = np.unique(cells, return_index=True)
        self._hold_new(cells, old[first])
        self._ids.forget(cells, release=False)
        self._known[cells] = False

    def _hold_new(self, cells: NDArray[np.intp], win: NDArray[np.int64] | None = None) -> None:
        """Take the new identities of ``cells`` (of window ``win``, default the one each
        holds) from the slab to wait for the checkpoint, with their partial's partition."""
        has, count, offsets = self._ids.take_new(cells)
        if has.size:
            cells = cells[has]
            w = self._win[cells] if win is None else win[has]
            self._waiting.append(IdentityLog.grouped(
                (cells // self.ring).astype(np.int32), w * self.size_ms,
                self._part[cells].copy(), count, offsets))

    def set_threshold(self, partition: int, newest_stored_ms: int) -> None:
        """The newest event time stored for ``partition`` (by any life of any worker): a
        window starting after it has nothing stored, so its cell can be known."""
        self._ensure_partitions(partition + 1)
        self._threshold[partition] = newest_stored_ms

    def threshold(self, partition: int) -> int:
        """The newest event time stored for ``partition``, as set (NEVER: none)."""
        if partition >= self._threshold.shape[0]:
            return NEVER
        return int(self._threshold[partition])

    def newest(self, partition: int) -> int:
        """The newest event time of ``partition`` seen or stored: the next threshold."""
        if partition >= self._max_ts.shape[0]:
            return NEVER
        return max(int(self._max_ts[partition]), int(self._threshold[partition]))

    def take_identities(self) -> IdentityLog:
        """Identities counted since the last call, for the checkpoint to store."""
        if self.deduplicate:
            self._hold_new(np.flatnonzero(self._known))
        waiting, self._waiting = self._waiting, []
        return IdentityLog.concat(waiting)

    def take_undecided(self) -> Readings:
        """Readings kept for the checkpoint to decide, in arrival order."""
        out, self._undecided = concat_readings(self._undecided), []
        return out

    def _advance(self, part: NDArray[np.int32], ts: NDArray[np.int64], now_ms: int) -> None:
        p0 = int(part[0])
        if (part == p0).all():
            self._max_ts[p0] = max(int(self._max_ts[p0]), int(ts.max()))
            touched: NDArray[np.intp] | int = p0
        else:
            np.maximum.at(self._max_ts, part, ts)
            touched = np.flatnonzero(np.bincount(part))
        self._seen[touched] = True
        self._last_wall[touched] = now_ms
        self._wm[touched] = np.maximum(
            self._wm[touched], self._max_ts[touched] - self.allowed_lateness_ms
        )

    def _evict(self, cells: NDArray[np.intp], old: NDArray[np.int64]) -> None:
        """Cells taking a newer window: pending partial → overflow, open window → overflow."""
        cells, first = np.unique(cells, return_index=True)
        old = old[first]
        pend = self._count[cells] > 0
        if pend.any():
            pc = cells[pend]
            self._over.append(self._cell_partials(pc, old[pend]))
            self._reset_pending(pc)
        if not self.report_closed:
            return
        opened = self._open[cells]
        if opened.any():
            oc = cells[opened]
            meters = (oc // self.ring).astype(np.int32)
            self._over_open.append(_Unreported(meters, old[opened], self._part[oc].copy()))
            self._open[oc] = False

    def _to_overflow(self, r: Readings, w: NDArray[np.int64]) -> None:
        """Readings for windows older than their cell holds: one-reading partials."""
        self._over.append(of_readings(r, self.size_s))
        if self.report_closed:
            self._over_open.append(
                _Unreported(r.meter.astype(np.int32), w.copy(), r.partition.astype(np.int32)))

    def _accumulate(self, r: Readings, w: NDArray[np.int64], cell: NDArray[np.intp]) -> None:
        if len(r) == 0:
            return
        # an array, not the scalar 1: ufunc.at has no fast path for broadcast scalars
        np.add.at(self._count, cell, np.ones(len(cell), np.int32))
        np.add.at(self._psum, cell, r.power)
        np.maximum.at(self._pmax, cell, r.power)
        np.minimum.at(self._pmin, cell, r.power)
        np.add.at(self._esum, cell, r.energy)
        has_voltage = ~np.isnan(r.voltage)  # absent voltages are NaN
        if has_voltage.any():
            np.add.at(self._vsum, cell[has_voltage], r.voltage[has_voltage])
            np.add.at(self._vcnt, cell[has_voltage],
                      np.ones(int(has_voltage.sum()), np.int32))
        if self.report_closed:
            self._open[cell] = True
        self._update_latest(r, w, cell)

    def _update_latest(self, r: Readings, w: NDArray[np.int64], cell: NDArray[np.intp]) -> None:
        """Per cell keep region/partition of the reading greatest by (ts, region, partition)."""
        rank = self._ranks()
        size_ms = self.size_ms
        bits_off = max(1, (size_ms - 1).bit_length())
        bits_rank = max(1, (len(rank) - 1).bit_length())
        bits_part = max(1, (self._wm.shape[0] - 1).bit_length())  # every partition seen
        if self.use_packed_keys and bits_off + bits_rank + bits_part <= 62:
            sh_p, sh_t = bits_part, bits_part + bits_rank
            key = (
                ((r.ts_ms - w * size_ms) << sh_t)
                | (rank[r.region] << sh_p)
                | r.partition.astype(np.int64)
            )
            last = self._last[cell]
            cur = np.where(
                last == NEVER,
                -1,
                ((last - w * size_ms) << sh_t)
                | (rank[np.maximum(self._region[cell], 0)] << sh_p)
                | self._part[cell].astype(np.int64),
            )
            scratch = self._scratch
            scratch[cell] = cur
            np.maximum.at(scratch, cell, key)
            win = key == scratch[cell]
        else:
            win = self._latest_general(r, cell, rank)
        cw = cell[win]
        self._last[cw] = r.ts_ms[win]
        self._region[cw] = r.region[win]
        self._part[cw] = r.partition[win]

    def _latest_general(
        self, r: Readings, cell: NDArray[np.intp], rank: NDArray[np.int64]
    ) -> NDArray[np.bool_]:
        """Mask of readings that beat their cell's latest tuple (one per cell at most)."""
        rr = rank[r.region]
        order = np.lexsort((r.partition, rr, r.ts_ms, cell))
        c_sorted = cell[order]
        last_of_group = np.append(c_sorted[1:] != c_sorted[:-1], True)
        cand = order[last_of_group]
        c = cell[cand]
        ts, rk, pt = r.ts_ms[cand], rr[cand], r.partition[cand]
        o_ts = self._last[c]
        o_rk = rank[np.maximum(self._region[c], 0)]
        o_pt = self._part[c]
        beats = (ts > o_ts) | ((ts == o_ts) & ((rk > o_rk) | ((rk == o_rk) & (pt >= o_pt))))
        mask = np.zeros(len(r), np.bool_)
        mask[cand[beats]] = True
        return mask

    def advance_idle(self, now_ms: int) -> None:
        """Raise the watermark of partitions silent for ``idle_advance_ms`` of wall clock."""
        idle = self._seen & (self._last_wall <= now_ms - self.idle_advance_ms)
        self._wm[idle] = np.maximum(self._wm[idle], now_ms - self.allowed_lateness_ms)

    def watermarks(self) -> dict[int, int]:
        return {int(p): int(self._wm[p]) for p in np.flatnonzero(self._seen)}

    # -----------------------------------------------------------------------------------
    # output

    def drain(self) -> Partials:
        """All pending partials (distinct (meter, window) keys); pending is reset. With
        ``deduplicate``, cells whose window is closed forget its identities (memory holds
        those of open windows only): a later reading for it is undecided."""
        if self.deduplicate:
            held = np.flatnonzero(self._known)
            self._hold_new(held)  # drained with their partials
            part = np.maximum(self._part[held], 0)
            closed = held[(self._win[held] + 1) * self.size_ms <= self._wm[part]]
            self._ids.forget(closed, release=True)
            self._known[closed] = False
            self._ids.compact()
        cells = np.flatnonzero(self._count > 0)
        out = self._cell_partials(cells, self._win[cells])
        self._reset_pending(cells)
        if self._over:
            out = combine(Partials.concat(self.size_s, [out, *self._over]), self._ranks())
            self._over = []
        return out

    def closed(self) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
        """(meter slots, window starts) of windows newly closed by the watermarks."""
        if not self.report_closed:
            raise RuntimeError("closed() needs an engine made with report_closed=True")
        size_ms = self.size_ms
        cells = np.flatnonzero(self._open)
        part = self._part[cells]
        done = (self._win[cells] + 1) * size_ms <= self._wm[part]
        cells = cells[done]
        self._open[cells] = False
        meters = [(cells // self.ring).astype(np.int32)]
        starts = [self._win[cells] * size_ms]
        if self._over_open:
            m = np.concatenate([o.meter for o in self._over_open])
            w = np.concatenate([o.window for o in self._over_open])
            p = np.concatenate([o.partition for o in self._over_open])
            done = (w + 1) * size_ms <= self._wm[p]
            meters.append(m[done])
            starts.append(w[done] * size_ms)
            keep = ~done
            self._over_open = [_Unreported(m[keep], w[keep], p[keep])] if keep.any() else []
        m_all = np.concatenate(meters)
        s_all = np.concatenate(starts)
        if len(meters) > 1 and len(m_all):
            order = np.lexsort((s_all, m_all))
            m_all, s_all = m_all[order], s_all[order]
            first = np.append(True, (m_all[1:] != m_all[:-1]) | (s_all[1:] != s_all[:-1]))
            m_all, s_all = m_all[first], s_all[first]
        return m_all, s_all

    def drop_partitions(self, partitions: Collection[int]) -> None:
        """Forget cells, overflow and watermarks of ``partitions`` (after a revoke)."""
        ps = np.fromiter(partitions, np.int64, len(partitions))
        if ps.size == 0:
            return
        self._clear(np.flatnonzero(np.isin(self._part, ps)))
        self._over = [o.take(~np.isin(o.partition, ps)) for o in self._over]
        self._over = [o for o in self._over if len(o)]
        self._waiting = [g.take(~np.isin(g.partition, ps)) for g in self._waiting]
        self._undecided = [u.take(~np.isin(u.partition, ps)) for u in self._undecided]
        kept: list[_Unreported] = []
        for m, w, p in self._over_open:
            k = ~np.isin(p, ps)
            if k.any():
                kept.append(_Unreported(m[k], w[k], p[k]))
        self._over_open = kept
        known = ps[ps < self._wm.shape[0]]
        known = known[known >= 0]
        self._max_ts[known] = NEVER
        self._threshold[known] = NEVER
        self._wm[known] = NEVER
        self._last_wall[known] = NEVER
        self._seen[known] = False

    def idle(self, n: int, after_ms: int) -> NDArray[np.bool_]:
        """By meter slot below ``n``: the engine holds nothing of it a drain or checkpoint
        still needs (partial, overflow, identity, undecided reading) and its newest reading
        in a cell is ``after_ms`` of event time older than its partition's newest (seen or
        stored). A slot with no reading in any cell is idle. Ask after :meth:`drain` and
        the takes, which leave only open windows' identities behind."""
        idle = np.ones(n, np.bool_)
        cap, ring = min(self._capacity, n), self.ring
        if cap == 0:
            return idle
        last = self._last[: cap * ring].reshape(cap, ring)
        col = last.argmax(axis=1)
        newest = last[np.arange(cap), col]
        part = self._part[np.arange(cap) * ring + col]
        known = np.maximum(self._max_ts, self._threshold)
        cutoff = np.where(known == NEVER, NEVER, known - after_ms)
        read = newest != NEVER
        idle[:cap] = ~read
        idle[:cap][read] = newest[read] < cutoff[part[read]]
        busy = (self._count[: cap * ring] > 0) | self._known[: cap * ring]
        idle[:cap] &= ~busy.reshape(cap, ring).any(axis=1)
        held = [o.meter for o in self._over] + [u.meter for u in self._undecided]
        held += [log.windows()[0] for log in self._waiting]
        for meter in held:
            idle[meter[meter < n]] = False
        return idle

    def release(self, slots: NDArray[np.intp], *, floor: bool = False) -> None:
        """Give ``slots`` (idle, see :meth:`idle`) their first state back: never read.

        With ``deduplicate`` a meter that comes back must not take a window it had as
        known (its readings may be stored): either the caller seeds its new slot from its
        stored newest event time (:meth:`seed`), or, with ``floor``, no cell of any meter
        takes as known a window up to the newest one the released cells held."""
        slots = slots[slots < self._capacity]
        cells = (slots[:, None] * self.ring + np.arange(self.ring)).ravel()
        top = int(self._win[cells].max(initial=NEVER))
        if self.deduplicate and floor and top != NEVER:
            self._evicted_through = max(self._evicted_through, (top + 1) * self.size_ms - 1)
        self._clear(cells)

    def _clear(self, cells: NDArray[np.intp]) -> None:
        """``cells`` as never used: no window, partial, identity or latest reading."""
        self._reset_pending(cells)
        if self.deduplicate:
            self._ids.forget(cells, release=True)
            self._known[cells] = False
        self._win[cells] = NEVER
        self._last[cells] = NEVER
        self._open[cells] = False
        self._region[cells] = -1
        self._part[cells] = -1

    def seed(self, slots: NDArray[np.intp], newest_ms: NDArray[np.int64]) -> None:
        """(deduplicate) Meters come back with readings stored up to ``newest_ms``: every
        empty cell of their slots holds that window, so a reading up to it is undecided
        and only a later window is known, as if the meter had never left."""
        if not self.deduplicate or slots.size == 0:
            return
        self._ensure_meters(int(slots.max()) + 1)
        cells = (slots[:, None] * self.ring + np.arange(self.ring)).ravel()
        win = np.repeat(np.where(newest_ms == NEVER, NEVER, newest_ms // self.size_ms),
                        self.ring)
        empty = (self._count[cells] == 0) & ~self._known[cells]
        cells, win = cells[empty], win[empty]
        self._win[cells] = np.maximum(self._win[cells], win)

    def pending_readings(self) -> int:
        return (int(self._count.sum(dtype=np.int64)) + sum(int(o.count.sum()) for o in self._over)
                + sum(len(u) for u in self._undecided))

    def pending_windows(self) -> int:
        return int(np.count_nonzero(self._count)) + sum(len(o) for o in self._over)


def concat_readings(parts: list[Readings]) -> Readings:
    """Batches of readings as one, in order."""
    if not parts:
        return Readings.empty()
    if len(parts) == 1:
        return parts[0]
    return Readings(**{f: np.concatenate([getattr(p, f) for p in parts])
                       for f in Readings.__dataclass_fields__})
