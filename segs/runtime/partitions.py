"""The partition book: what a worker knows of each partition assigned to it, in one record.

Rules:

* A partition is *assigned* from the assign callback until its revoke (or loss): it has a
  record. It is *positioned* once the consumer was sought to its stored position; only then
  may its messages be processed (:meth:`PartitionBook.admit`). Messages of a partition still
  waiting were fetched from an arbitrary offset and are read again after the seek.
* ``stored`` is the position in the database, the compare-and-set value of the next
  checkpoint; ``consumed`` the next offset after the last processed message. A checkpoint
  stores ``consumed`` wherever the two differ.
* A rewind forgets what is not stored: every partition waits for its stored position again.
  The stored watermark survives it (it only rises) and so does the time last seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from segs.checkpoint.sink import Position, Positions, PositionWrite
from segs.times import NEVER


@dataclass(slots=True)
class PartitionState:
    positioned: bool = False  # sought to its stored position: its messages count
    stored: int | None = None  # next offset in the database (compare-and-set value)
    consumed: int | None = None  # next offset after the last processed message
    stored_wm: int = NEVER  # watermark in the database, or NEVER
    last_seen_ms: int | None = None  # wall ms of its last message or positioning


class PartitionBook:
    """The records of the assigned partitions."""

    def __init__(self) -> None:
        self._parts: dict[int, PartitionState] = {}

    def __len__(self) -> int:
        return len(self._parts)

    def __contains__(self, p: object) -> bool:
        return p in self._parts

    def __iter__(self) -> Iterator[int]:
        return iter(self._parts)

    def __getitem__(self, p: int) -> PartitionState:
        return self._parts[p]

    @property
    def waiting(self) -> bool:
        """Some assigned partition waits for its stored position."""
        return not all(st.positioned for st in self._parts.values())

    def waiting_partitions(self) -> list[int]:
        return sorted(p for p, st in self._parts.items() if not st.positioned)

    def positioned(self) -> list[int]:
        return sorted(p for p, st in self._parts.items() if st.positioned)

    def is_positioned(self, p: int) -> bool:
        st = self._parts.get(p)
        return st is not None and st.positioned

    # ------------------------------------------------------------------ assignment

    def assign(self, parts: Iterable[int]) -> None:
        """New partitions, waiting for their position (known ones keep their record)."""
        for p in parts:
            self._parts.setdefault(p, PartitionState())

    def position(self, stored: Mapping[int, Position | None], now_ms: int) -> None:
        """Partitions sought to their stored position (None: the database has none, the
        consumer starts elsewhere); assigned partitions only."""
        for p, pos in stored.items():
            st = self._parts[p]
            st.stored = pos.next_offset if pos else None
            if pos:
                st.consumed = pos.next_offset
                if pos.watermark_ms is not None:
                    st.stored_wm = pos.watermark_ms
            st.positioned = True
            st.last_seen_ms = now_ms

    def forget(self, parts: Iterable[int]) -> None:
        """Revoked or lost partitions: their records go."""
        for p in parts:
            self._parts.pop(p, None)

    def rewind(self) -> None:
        """Forget what is not stored: every partition waits for its stored position."""
        for st in self._parts.values():
            st.positioned = False
            st.stored = st.consumed = None

    # ------------------------------------------------------------------ processing

    def admit(self, partitions: NDArray[np.int32]) -> tuple[list[int], NDArray[np.bool_] | None]:
        """Of a batch with these message partitions: the partitions present that may be
        processed, and which messages to keep (None: all of them)."""
        present: list[int] = np.unique(partitions).tolist()
        parts = self._parts
        if all(p in parts and parts[p].positioned for p in present):
            return present, None
        ok = [p for p in present if p in parts and parts[p].positioned]
        return ok, np.isin(partitions, ok)

    def processed(self, present: Sequence[int], partitions: NDArray[np.int32],
                  offsets: NDArray[np.int64], now_ms: int) -> None:
        """A processed batch: each present partition is consumed up to its newest offset."""
        parts = self._parts
        for p in present:
            st = parts[p]
            st.consumed = int(offsets[partitions == p].max()) + 1
            st.last_seen_ms = now_ms

    # ------------------------------------------------------------------ checkpoints

    def watermarks(self, engine: Mapping[int, int], now_ms: int, *, lateness_ms: int,
                   idle_advance_ms: int) -> dict[int, int]:
        """Watermark per positioned partition: the newest of the stored one, the engine's,
        and, for a partition silent for ``idle_advance_ms``, wall clock minus lateness."""
        idle_wm = now_ms - lateness_ms
        wms = {}
        for p, st in self._parts.items():
            if not st.positioned:
                continue
            wm = max(st.stored_wm, engine.get(p, NEVER))
            seen = now_ms if st.last_seen_ms is None else st.last_seen_ms
            if now_ms - seen >= idle_advance_ms:
                wm = max(wm, idle_wm)
            if wm > NEVER:
                wms[p] = wm
        return wms

    def to_store(self, wms: Mapping[int, int], *, rising_watermarks: bool = False,
                 empty_end: Callable[[int], int | None] = lambda p: None) -> Positions:
        """The positions the next checkpoint stores: every positioned partition consumed
        past its stored position. With ``rising_watermarks`` (regional aggregates wait for
        every partition's stored watermark) also one whose watermark rose, at its consumed
        offset or, never read, at ``empty_end(p)`` when that says it holds no message."""
        positions: Positions = {}
        for p, st in self._parts.items():
            if st.positioned and st.consumed is not None and st.consumed != st.stored:
                positions[p] = PositionWrite(st.stored, st.consumed, wms.get(p))
        if rising_watermarks:
            for p, st in self._parts.items():
                if not st.positioned or p in positions:
                    continue
                wm = wms.get(p)
                if wm is None or wm <= st.stored_wm:
                    continue
                nxt = st.consumed if st.consumed is not None else empty_end(p)
                if nxt is not None:
                    positions[p] = PositionWrite(st.stored, nxt, wm)
        return positions

    def stored_now(self, positions: Positions) -> None:
        """A written transaction's positions are the stored ones now (of partitions still
        assigned: a revoke or loss waits for the checkpoint in flight)."""
        for p, (_, nxt, wm) in positions.items():
            st = self._parts.get(p)
            if st is None:
                continue
            st.stored = nxt
            if st.positioned and st.consumed is None:
                st.consumed = nxt
            if wm is not None:
                st.stored_wm = max(wm, st.stored_wm)

    def committable(self) -> list[tuple[int, int]]:
        """(partition, stored offset) of every positioned partition with a stored position."""
        return [(p, st.stored) for p, st in self._parts.items()
                if st.positioned and st.stored is not None]

    def consumed_offsets(self) -> list[tuple[int, int]]:
        return [(p, st.consumed) for p, st in self._parts.items() if st.consumed is not None]
