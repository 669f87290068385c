"""The identities the window engine holds: per cell, the offsets counted in its window.

A reading's identity within its 1-minute window is its cell (meter and window, see
:mod:`segs.windows.engine`) and its millisecond offset from the window start (16 bits,
:mod:`segs.windows.identities`). The :class:`IdentitySlab` keeps each cell's offsets in a
region of one uint16 arena (2 bytes a reading, plus the regions' room to grow): an *old*
run, sorted, of the offsets handed to the checkpoint already, then a *new* run, sorted, of
those counted since. A lookup is a binary search in both runs, vectorised over the batch;
an insert appends to the new run (readings come mostly in time order) or merges into it.
A batch copies only the regions of the cells it touches, but for the arena's growth and
compaction, each paid for by the offsets added or released since the last one.

The new runs are what the next checkpoint stores, so no separate log is kept per reading:
:meth:`IdentitySlab.take_new` hands them over. A cell that takes a new window forgets the
old one's offsets and keeps its region; a drain releases the regions of closed windows
(:meth:`segs.windows.engine.WindowEngine.drain`), and the arena is compacted once released
regions outweigh the rest.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import grown
from segs.windows.identities import OFFSET_BITS

_MIN_ROOM = 2  # a region's first capacity, in offsets
_MAX_ARENA = (1 << 31) - 1  # region starts are int32
_CHUNK = 1 << 20  # offsets moved per step by copy_ranges


def spans(start: NDArray[np.int64], length: NDArray[np.int64]) -> NDArray[np.int64]:
    """Concatenated ``arange(start[i], start[i] + length[i])`` for every i."""
    total = int(length.sum())
    ends = np.cumsum(length)
    out: NDArray[np.int64] = np.arange(total, dtype=np.int64)
    out += np.repeat(start - (ends - length), length)
    return out


def copy_ranges(dst: NDArray[np.uint16], dst_start: NDArray[np.int64], src: NDArray[np.uint16],
                src_start: NDArray[np.int64], length: NDArray[np.int64]) -> None:
    """``dst[dst_start[i]:][:length[i]] = src[src_start[i]:][:length[i]]`` for every i, about
    ``_CHUNK`` offsets a step: the index arrays (8 bytes an offset) stay small however many
    offsets a drain or a compaction moves."""
    ends = np.cumsum(length)
    i, n = 0, length.shape[0]
    while i < n:
        j = max(int(np.searchsorted(ends, (ends[i - 1] if i else 0) + _CHUNK, "right")), i + 1)
        d, s, k = dst_start[i:j], src_start[i:j], length[i:j]
        dst[spans(d, k)] = src[spans(s, k)]
        i = j


def gather_ranges(src: NDArray[np.uint16], start: NDArray[np.int64],
                  length: NDArray[np.int64]) -> NDArray[np.uint16]:
    """The ranges ``src[start[i]:][:length[i]]`` one after the other."""
    out = np.empty(int(length.sum()), np.uint16)
    copy_ranges(out, np.cumsum(length) - length, src, start, length)
    return out


class IdentitySlab:
    """The counted identities of the windows the cells hold (see the module docstring).

    Per cell: ``at`` (region start), ``cap`` (its room), ``old`` (length of the old run)
    and ``n`` (old + new run). ``cap == 0``: no region. Released regions and those left by
    a cell that outgrew its own are *garbage*, reclaimed by :meth:`compact`."""

    compact_min: ClassVar[int] = 1 << 16  # garbage offsets below which nothing is compacted

    def __init__(self, ring: int = 1) -> None:
        """Cells are ``meter * ring + window % ring``: a cell's neighbour below (cyclically)
        holds the meter's previous window, whose size sizes a new region."""
        self.ring = ring
        self._arena = np.empty(0, np.uint16)
        self._top = 0  # arena offsets handed out as regions (owned or garbage)
        self._owned = 0  # offsets of the regions cells own
        self.held = 0  # offsets held (sum of n)
        self._at = np.empty(0, np.int32)  # int32: 4 bytes a cell, held offsets < 2**31
        self._cap = np.empty(0, np.int32)
        self._old = np.empty(0, np.int32)
        self._n = np.empty(0, np.int32)

    def grow(self, cells: int) -> None:
        """Room for ``cells`` cells (new ones empty)."""
        old = self._n.shape[0]
        if cells <= old:
            return
        self._at = grown(self._at, cells, 0)
        self._cap = grown(self._cap, cells, 0)
        self._old = grown(self._old, cells, 0)
        self._n = grown(self._n, cells, 0)

    def nbytes(self) -> tuple[int, int]:
        """(the arena, the per-cell arrays) in bytes."""
        return (int(self._arena.nbytes),
                int(self._at.nbytes + self._cap.nbytes + self._old.nbytes + self._n.nbytes))

    # ------------------------------------------------------------------------- lookups

    def first_new(self, cell: NDArray[np.intp], offset: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which readings are counted: the first of their (cell, offset) in the batch, and
        not held by the cell. Their offsets are added to the cells' new runs."""
        n = cell.shape[0]
        counted = np.zeros(n, np.bool_)
        if n == 0:
            return counted
        key: NDArray[np.int64] = (cell.astype(np.int64) << OFFSET_BITS) | offset
        uniq, first = np.unique(key, return_index=True)
        ucell = uniq >> OFFSET_BITS
        uoff = (uniq & 0xFFFF).astype(np.uint16)
        at, old, held = self._at[ucell].astype(np.int64), self._old[ucell], self._n[ucell]
        u = uniq.shape[0]
        found = self._search(np.concatenate([at, at + old]),
                             np.concatenate([at + old, at + held]),
                             np.concatenate([uoff, uoff]))
        new = ~(found[:u] | found[u:])
        if new.any():
            self._insert(ucell[new], uoff[new])
        counted[first[new]] = True
        return counted

    def _search(self, lo: NDArray[np.int64], hi: NDArray[np.int64],
                value: NDArray[np.uint16]) -> NDArray[np.bool_]:
        """Whether ``value[i]`` is in the sorted ``arena[lo[i]:hi[i]]``: a lower bound by
        bisection, all queries at once."""
        arena = self._arena
        last = arena.shape[0] - 1
        if last < 0:
            return np.zeros(lo.shape[0], np.bool_)
        end = hi
        lo = lo.copy()
        for _ in range(int((hi - lo).max(initial=0)).bit_length()):
            mid = (lo + hi) >> 1
            active = lo < hi
            less = active & (arena[np.minimum(mid, last)] < value)
            lo = np.where(less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        found: NDArray[np.bool_] = (lo < end) & (arena[np.minimum(lo, last)] == value)
        return found

    # ------------------------------------------------------------------------- inserts

    def _insert(self, cell: NDArray[np.int64], offset: NDArray[np.uint16]) -> None:
        """Add new offsets (sorted by cell, then offset; none held) to the cells' new runs."""
        start = np.flatnonzero(np.concatenate([[True], cell[1:] != cell[:-1]]))
        cells = cell[start]
        add = np.diff(np.append(start, cell.shape[0]))
        need = self._n[cells].astype(np.int64) + add
        short = need > self._cap[cells]
        if short.any():
            self._relocate(cells[short], need[short])
        at = self._at[cells].astype(np.int64)
        old, held = self._old[cells], self._n[cells].astype(np.int64)
        arena = self._arena
        # in order: the cell's new run is empty, or all of its new offsets come after it
        tail = arena[np.maximum(at + held - 1, 0)]
        in_order = (held == old) | (tail < offset[start])
        rank = np.arange(offset.shape[0], dtype=np.int64) - np.repeat(start, add)
        ok = np.repeat(in_order, add)
        arena[(np.repeat(at + held, add) + rank)[ok]] = offset[ok]
        if not in_order.all():
            self._merge(at[~in_order] + old[~in_order], (held - old)[~in_order],
                        offset[~ok], add[~in_order])
        self._n[cells] = need
        self.held += int(add.sum())

    def _merge(self, run: NDArray[np.int64], length: NDArray[np.int64],
               offset: NDArray[np.uint16], add: NDArray[np.int64]) -> None:
        """Merge ``add[i]`` offsets each (one group after the other) into the sorted runs
        ``arena[run[i]:run[i]+length[i]]``, which have room after them: one sort of all."""
        arena = self._arena
        group = np.arange(run.shape[0], dtype=np.int64)
        have = spans(run, length)
        key = np.concatenate([
            (np.repeat(group, length) << OFFSET_BITS) | arena[have],
            (np.repeat(group, add) << OFFSET_BITS) | offset])
        key.sort()
        arena[spans(run, length + add)] = (key & 0xFFFF).astype(np.uint16)

    def _relocate(self, cells: NDArray[np.int64], need: NDArray[np.int64]) -> None:
        """Move cells that outgrow their regions to new ones at the top, twice as large; a
        cell without one gets room for as many offsets as the meter's previous window holds
        (a meter reads at a steady rate), so it rarely moves and leaves no garbage."""
        cap = np.maximum(np.maximum(2 * self._cap[cells].astype(np.int64), need), _MIN_ROOM)
        fresh = self._cap[cells] == 0
        if fresh.any() and self.ring > 1:
            c = cells[fresh]
            prev = np.where(c % self.ring == 0, c + self.ring - 1, c - 1)
            cap[fresh] = np.maximum(cap[fresh], self._n[prev])
        self._reserve(int(cap.sum()))
        at = self._top + np.cumsum(cap) - cap
        held = self._n[cells].astype(np.int64)
        copy_ranges(self._arena, at, self._arena, self._at[cells].astype(np.int64), held)
        self._owned += int(cap.sum() - self._cap[cells].sum(dtype=np.int64))
        self._top += int(cap.sum())
        self._at[cells] = at
        self._cap[cells] = cap

    def _reserve(self, extra: int) -> None:
        """Room for ``extra`` offsets at the top: compact first when garbage is a third of
        the arena, grow by half otherwise (the copy is amortised over what filled it)."""
        if self._top + extra <= self._arena.shape[0]:
            return
        if 2 * (self._top - self._owned) > self._owned:
            self.compact(extra, force=True)
            if self._top + extra <= self._arena.shape[0]:
                return
        if self._top + extra > _MAX_ARENA:
            raise OverflowError("the identity slab holds at most 2**31 offsets")
        size = min(max(self._top + extra, self._arena.shape[0] * 3 // 2, 1024), _MAX_ARENA)
        arena = np.empty(size, np.uint16)
        arena[:self._top] = self._arena[:self._top]
        self._arena = arena

    # ------------------------------------------------------------------------- the log

    def take_new(self, cells: NDArray[np.intp]) -> tuple[NDArray[np.intp], NDArray[np.int64],
                                                         NDArray[np.uint16]]:
        """The new runs of ``cells``: which of them have one (indices into ``cells``), their
        lengths and their offsets one run after the other; each joins its old run, merged
        only where the two overlap (readings mostly come in time order)."""
        old, held = self._old[cells], self._n[cells]
        has = np.flatnonzero(held > old)
        mine = cells[has]
        o = old[has].astype(np.int64)
        count = held[has].astype(np.int64) - o
        at = self._at[mine].astype(np.int64)
        offsets = gather_ranges(self._arena, at + o, count)
        overlap = (o > 0) & (self._arena[np.maximum(at + o - 1, 0)] > offsets[np.cumsum(count)
                                                                              - count])
        if overlap.any():
            self._merge(at[overlap], o[overlap], offsets[np.repeat(overlap, count)],
                        count[overlap])
        self._old[mine] = held[has]
        return has, count, offsets

    # ------------------------------------------------------------------------- forgetting

    def forget(self, cells: NDArray[np.intp], *, release: bool) -> None:
        """The (distinct) cells' windows are gone: their offsets stop counting. ``release``: their
        regions become garbage (closed windows); else each keeps its region for the next
        window, which likely has as many readings."""
        self.held -= int(self._n[cells].sum(dtype=np.int64))
        self._n[cells] = 0
        self._old[cells] = 0
        if release:
            self._owned -= int(self._cap[cells].sum(dtype=np.int64))
            self._cap[cells] = 0
            self._at[cells] = 0

    def compact(self, extra: int = 0, *, force: bool = False) -> None:
        """Move the held offsets into a new arena, dropping garbage and empty regions, once
        garbage outweighs what cells own (or ``force``), with room for ``extra`` more."""
        garbage = self._top - self._owned
        if not force and (garbage < self.compact_min or garbage <= self._owned):
            return
        # empty regions are dropped too: a cell that needs one again gets a new one
        cells = np.flatnonzero(self._n > 0)
        empty = np.flatnonzero((self._n == 0) & (self._cap > 0))
        self._cap[empty] = 0
        self._at[empty] = 0
        cap = self._cap[cells].astype(np.int64)
        at = np.cumsum(cap) - cap
        top = int(cap.sum())
        arena = np.empty(min(max(top + extra + top // 4, 1024), _MAX_ARENA), np.uint16)
        held = self._n[cells].astype(np.int64)
        copy_ranges(arena, at, self._arena, self._at[cells].astype(np.int64), held)
        self._arena, self._top, self._owned = arena, top, top
        self._at[cells] = at
