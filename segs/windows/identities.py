"""Reading identities as the checkpoint stores them: per identity its meter, window, offset.

A reading is identified by ``(meterId, timestamp)``; within its 1-minute window that is the
meter and the millisecond offset from the window start (0 … 59,999, 16 bits). The window
engine holds those of open windows in a slab (:mod:`segs.windows.slab`); what it counted
since the last checkpoint is handed over as an :class:`IdentityLog` and stored beside each
1-minute partial (``aggregates_1m.identities``), so a restarted worker, or the next owner of
the partition, decides late re-sends in the checkpoint's transaction
(:mod:`segs.checkpoint.dedup`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

OFFSET_BITS = 16


class IdentityLog:
    """Identities with the window and the partition of the partial they belong to.

    Read as one row per identity (``meter``, ``window_start_ms``, ``offset``,
    ``partition``), held as one header per window and the offsets one window after the
    other: 2 bytes an identity rather than 18, which matters while a checkpoint holds
    millions. Rows given one by one (the constructor) are windows of one identity each.
    The per-identity columns are made on each read; :meth:`windows` gives the headers."""

    __slots__ = ("_length", "_meter", "_partition", "_window_start_ms", "offset")

    def __init__(self, meter: NDArray[np.int32], window_start_ms: NDArray[np.int64],
                 offset: NDArray[np.uint16], partition: NDArray[np.int32]) -> None:
        self._meter, self._window_start_ms, self._partition = meter, window_start_ms, partition
        self.offset = offset  # ms from the window start
        self._length: NDArray[np.int64] | None = None  # None: a window per identity

    @classmethod
    def grouped(cls, meter: NDArray[np.int32], window_start_ms: NDArray[np.int64],
                partition: NDArray[np.int32], length: NDArray[np.int64],
                offset: NDArray[np.uint16]) -> IdentityLog:
        """``length[i]`` identities of window i (of ``meter[i]``, …), offsets in order."""
        log = cls(meter, window_start_ms, offset, partition)
        log._length = length
        return log

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def _rows(self, header: NDArray[np.generic]) -> NDArray[np.generic]:
        return header if self._length is None else np.repeat(header, self._length)

    @property
    def meter(self) -> NDArray[np.int32]:
        return self._rows(self._meter)  # type: ignore[return-value]

    @property
    def window_start_ms(self) -> NDArray[np.int64]:
        return self._rows(self._window_start_ms)  # type: ignore[return-value]

    @property
    def partition(self) -> NDArray[np.int32]:
        return self._rows(self._partition)  # type: ignore[return-value]

    def windows(self) -> tuple[NDArray[np.int32], NDArray[np.int64], NDArray[np.int64]]:
        """(meter, window start, identities) of each window, in the order of ``offset``.
        The same window may come more than once."""
        if self._length is None:
            return self._meter, self._window_start_ms, np.ones(len(self), np.int64)
        return self._meter, self._window_start_ms, self._length

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._meter, self._window_start_ms, self._partition,
                                      self.offset, self._length) if a is not None)

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
        if all(g._length is None for g in logs):
            return cls(np.concatenate([g._meter for g in logs]),
                       np.concatenate([g._window_start_ms for g in logs]),
                       np.concatenate([g.offset for g in logs]),
                       np.concatenate([g._partition for g in logs]))
        return cls.grouped(np.concatenate([g._meter for g in logs]),
                           np.concatenate([g._window_start_ms for g in logs]),
                           np.concatenate([g._partition for g in logs]),
                           np.concatenate([g.windows()[2] for g in logs]),
                           np.concatenate([g.offset for g in logs]))

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> IdentityLog:
        """The identities selected by an index array or boolean mask, order kept. A mask
        that takes or leaves whole windows (one by partition does) keeps the headers."""
        if self._length is not None and index.dtype == np.bool_:
            length = self._length
            whole = index[np.cumsum(length) - length] if len(length) else index[:0]
            if np.array_equal(np.repeat(whole, length), index):
                return IdentityLog.grouped(self._meter[whole], self._window_start_ms[whole],
                                           self._partition[whole], length[whole],
                                           self.offset[index])
        return IdentityLog(self.meter[index], self.window_start_ms[index], self.offset[index],
                           self.partition[index])

    def of_partitions(self, partitions: NDArray[np.int32]) -> IdentityLog:
        """The identities of ``partitions``' partials: ``take(isin(partition, partitions))``
        decided window by window, without a per-identity partition column."""
        if self._length is None:
            return self.take(np.isin(self._partition, partitions))
        whole = np.isin(self._partition, partitions)
        return IdentityLog.grouped(self._meter[whole], self._window_start_ms[whole],
                                   self._partition[whole], self._length[whole],
                                   self.offset[np.repeat(whole, self._length)])


def window_keys(meter: NDArray[np.integer], window_start_ms: NDArray[np.int64],
                size_ms: int) -> NDArray[np.int64]:
    """One int64 per (meter, window): meter slot in the high bits, window index below."""
    return (meter.astype(np.int64) << 32) | (window_start_ms // size_ms)
