"""Reading identities of open 1-minute windows: which (meter, timestamp) are counted already.

A reading is identified by ``(meterId, timestamp)``; within its window that is the meter's
cell and the millisecond offset from the window start (0 … 59,999, 16 bits). The index holds
one ``cell << 16 | offset`` key per counted reading of every window a cell holds, in one
sorted int64 array with a parallel int32 *generation* tag: a cell's generation moves on
whenever it takes a new window or is reset, so the keys of its old window stop matching
without being searched for and removed (12 bytes a reading). They are dropped in one pass
once they are more than half of the index. A drain retires the windows closed by then
(:meth:`segs.windows.engine.WindowEngine.drain`).

New identities are also kept in arrival order (:class:`IdentityLog`) until the checkpoint
drains them: they are stored beside their 1-minute partial (``aggregates_1m.identities``),
so a restarted worker, or the next owner of the partition, decides late re-sends in the
checkpoint's transaction (:mod:`segs.checkpoint.dedup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import take_rows

OFFSET_BITS = 16
_COMPACT_MIN = 1 << 16  # keys below which the index is never compacted


@dataclass(slots=True)
class IdentityLog:
    """Identities counted since the last drain, one row each: its window and offset."""

    meter: NDArray[np.int32]
    window_start_ms: NDArray[np.int64]
    offset: NDArray[np.uint16]  # ms from the window start
    partition: NDArray[np.int32]

    def __len__(self) -> int:
        return int(self.meter.shape[0])

    @classmethod
    def empty(cls) -> IdentityLog:
        return cls(np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.uint16),
                   np.empty(0, np.int32))

    @classmethod
    def concat(cls, logs: list[IdentityLog]) -> IdentityLog:
        if not logs:
            return cls.empty()
        if len(logs) == 1:
            return logs[0]
        return cls(np.concatenate([g.meter for g in logs]),
                   np.concatenate([g.window_start_ms for g in logs]),
                   np.concatenate([g.offset for g in logs]),
                   np.concatenate([g.partition for g in logs]))

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> IdentityLog:
        return take_rows(self, index)


def window_keys(meter: NDArray[np.integer], window_start_ms: NDArray[np.int64],
                size_ms: int) -> NDArray[np.int64]:
    """One int64 per (meter, window): meter slot in the high bits, window index below."""
    return (meter.astype(np.int64) << 32) | (window_start_ms // size_ms)


class IdentityIndex:
    """The counted identities of the windows the cells hold (see the module docstring)."""

    def __init__(self) -> None:
        self._key = np.empty(0, np.int64)
        self._tag = np.empty(0, np.int32)
        self.live = 0  # keys of current generations

    def __len__(self) -> int:
        return int(self._key.shape[0])

    def nbytes(self) -> int:
        return int(self._key.nbytes + self._tag.nbytes)

    def first_new(self, cell: NDArray[np.intp], offset: NDArray[np.int64],
                  gen: NDArray[np.int32]) -> NDArray[np.bool_]:
        """Which readings are counted: the first of their (cell, offset) in the batch, and
        not in the index under the cell's generation ``gen`` (per cell). Their keys are
        added; ``gen`` must be the cells' current generations."""
        n = cell.shape[0]
        counted = np.zeros(n, np.bool_)
        if n == 0:
            return counted
        key: NDArray[np.int64] = (cell.astype(np.int64) << OFFSET_BITS) | offset
        uniq, first = np.unique(key, return_index=True)
        ucell: NDArray[np.int64] = uniq >> OFFSET_BITS
        tag: NDArray[np.int32] = gen[ucell]
        pos: NDArray[np.intp] = np.searchsorted(self._key, uniq)
        inside = pos < self._key.shape[0]
        hit = np.zeros(uniq.shape[0], np.bool_)
        hit[inside] = self._key[pos[inside]] == uniq[inside]
        live = np.zeros(uniq.shape[0], np.bool_)
        live[hit] = self._tag[pos[hit]] == tag[hit]
        reuse = hit & ~live  # a key of an old generation: its slot takes the new one
        self._tag[pos[reuse]] = tag[reuse]
        add = ~hit
        if add.any():
            self._key = np.insert(self._key, pos[add], uniq[add])
            self._tag = np.insert(self._tag, pos[add], tag[add])
        new = ~live
        counted[first[new]] = True
        self.live += int(np.count_nonzero(new))
        return counted

    def retired(self, keys: int) -> None:
        """``keys`` keys stopped matching (their cells moved on); compact when they are
        most of the index."""
        self.live -= keys

    def compact(self, gen: NDArray[np.int32]) -> None:
        """Drop keys of old generations when they are more than half of the index."""
        n = self._key.shape[0]
        if n < _COMPACT_MIN or n < 2 * self.live:
            return
        keep = self._tag == gen[self._key >> OFFSET_BITS]
        self._key, self._tag = self._key[keep], self._tag[keep]
        self.live = int(self._key.shape[0])
