"""Columnar batches shared by the decoder, the window engine and the anomaly detector.

A batch of Kafka messages becomes one :class:`Readings` value: parallel numpy arrays, one
element per *valid* reading, in the order the messages were consumed (partition order).
Strings (meter ids, regions) are interned to small integer slots by :class:`Interner`, so the
hot path only ever touches integers and floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from numpy.typing import DTypeLike, NDArray

try:
    from segs.intake._fastscan import NameArena as _NameArena
except ImportError:  # built without a C compiler: meter ids in a dict, same results
    _NameArena = None  # type: ignore[assignment,misc]

_T = TypeVar("_T", bound=np.generic)
_C = TypeVar("_C")


def take_rows(columns: _C, index: NDArray[np.intp] | NDArray[np.bool_]) -> _C:
    """A columns dataclass (one numpy array per field, scalars kept) with the rows selected
    by an index array or boolean mask, order kept."""
    return take_apart(columns, [index])[0]


def take_apart(columns: _C, indexes: list[NDArray[np.intp] | NDArray[np.bool_]], *,
               consume: bool = False) -> list[_C]:
    """:func:`take_rows` for each of ``indexes``, column by column. ``consume``: each column
    of ``columns`` is emptied once every index has its rows, so the whole and its parts are
    never all held (for a caller that drops ``columns``)."""
    picked: list[dict[str, NDArray[np.generic]]] = [{} for _ in indexes]
    for f in dataclasses.fields(columns):  # type: ignore[arg-type]
        column = getattr(columns, f.name)
        if not isinstance(column, np.ndarray):
            continue
        for out, index in zip(picked, indexes, strict=True):
            out[f.name] = column[index]
        if consume:
            setattr(columns, f.name, np.empty(0, column.dtype))  # not a view: frees it
        del column
    return [dataclasses.replace(columns, **cols) for cols in picked]  # type: ignore[type-var]


def room(n: int, capacity: int) -> int:
    """The capacity a per-slot array grows to for ``n`` slots: by a quarter at least, so
    copies stay amortised O(1) a slot while the room held empty, and the old and new arrays
    alive at once while growing, stay near the slots in use."""
    return max(n, capacity + capacity // 4)


def grown(old: NDArray[_T] | None, n: int, fill: float,
          dtype: DTypeLike | None = None) -> NDArray[_T]:
    """A length-``n`` array filled with ``fill``, starting with the contents of ``old``."""
    arr: NDArray[_T] = np.full(n, fill, dtype if old is None else old.dtype)
    if old is not None:
        arr[: old.shape[0]] = old
    return arr


class Index(Protocol):
    """Name → slot look-up in C: a ``dict`` or a ``NameArena``."""

    def get(self, name: str, default: int, /) -> int: ...


class Interner:
    """Maps strings to dense integer slots (0, 1, 2, …) and back.

    :meth:`release` gives slots back; :meth:`slot` hands them out again before new ones, so
    the slots in use stay as few as the names held at once. A released slot's name is ``""``
    until it is taken again; the slots taken again are listed for :meth:`take_reused`.
    :func:`meter_interner` gives the compact kind for meter ids, which has this interface."""

    __slots__ = ("_free", "_names", "_reused", "slots")

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self._names: list[str] = []
        self._free: list[int] = []  # released slots, the lowest last
        self._reused: list[int] = []

    @property
    def names(self) -> Sequence[str]:
        """By slot: the name, ``""`` for a released slot."""
        return self._names

    @property
    def index(self) -> Index:
        """What the native scanner looks names up in, and the fastest ``get``: ``slots``."""
        return self.slots

    def __len__(self) -> int:
        """Slots ever allocated (in use or released): the bound of every slot."""
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def get(self, name: str) -> int:
        """The slot of ``name``, or -1."""
        return self.slots.get(name, -1)

    def slot(self, name: str) -> int:
        """The slot of ``name``, allocating one on first sight (a released one first)."""
        s = self.slots.get(name)
        if s is None:
            if self._free:
                s = self._free.pop()
                self._names[s] = name
                self._reused.append(s)
            else:
                s = len(self._names)
                self._names.append(name)
            self.slots[name] = s
        return s

    def release(self, slots: NDArray[np.integer]) -> None:
        """Forget the names of ``slots`` (in use, distinct); their slots are free again."""
        names, table = self._names, self.slots
        for s in slots.tolist():
            del table[names[s]]
            names[s] = ""
        self._free.extend(slots.tolist())
        self._free.sort(reverse=True)

    def held(self) -> int:
        """Names held: slots in use."""
        return len(self._names) - len(self._free)

    def in_use(self) -> NDArray[np.bool_]:
        """By slot: whether a name holds it."""
        used = np.ones(len(self._names), np.bool_)
        used[self._free] = False
        return used

    def take_reused(self) -> list[int]:
        """Slots given to a new name since the last call."""
        out, self._reused = self._reused, []
        return out


class CompactInterner(Interner):
    """An :class:`Interner` whose names live in the native ``NameArena``
    (``segs/intake/_names.h``): their bytes in one buffer and the slots in flat arrays,
    about 40 bytes a name besides its own bytes instead of about 140 in a dict of ``str``.
    Its :attr:`fields` are the names as binary COPY fields, made when read."""

    __slots__ = ("_arena",)

    def __init__(self) -> None:  # the base's attributes stay unset: every method is here
        if _NameArena is None:
            raise RuntimeError("the native extension segs.intake._fastscan is not built")
        self._arena = _NameArena()

    @property
    def names(self) -> Sequence[str]:
        return self._arena.names

    @property
    def fields(self) -> Sequence[bytes]:
        """By slot: the name as a binary COPY field (4-byte big-endian length, UTF-8)."""
        return self._arena.fields

    @property
    def index(self) -> Index:
        return self._arena

    def __len__(self) -> int:
        return len(self._arena)

    def __contains__(self, name: str) -> bool:
        return name in self._arena

    def get(self, name: str) -> int:
        return self._arena.get(name)

    def slot(self, name: str) -> int:
        return self._arena.slot(name)

    def release(self, slots: NDArray[np.integer]) -> None:
        self._arena.release(slots.tolist())

    def held(self) -> int:
        return self._arena.held()

    def in_use(self) -> NDArray[np.bool_]:
        used = np.ones(len(self._arena), np.bool_)
        used[self._arena.free_slots()] = False
        return used

    def take_reused(self) -> list[int]:
        return self._arena.take_reused()

    def nbytes(self) -> int:
        """Bytes of the arena's arrays (their capacity)."""
        return self._arena.nbytes()


def meter_interner() -> Interner:
    """The interner for meter ids: compact where the native extension is built."""
    return CompactInterner() if _NameArena is not None else Interner()


@dataclass(slots=True)
class Readings:
    """Valid readings of one batch as columns (all arrays have the same length)."""

    meter: NDArray[np.int32]  # slot in the meter Interner
    region: NDArray[np.int32]  # slot in the region Interner
    ts_ms: NDArray[np.int64]  # event time, ms since the UTC epoch
    power: NDArray[np.float64]  # powerKw
    energy: NDArray[np.float64]  # energyKwh, 0.0 when absent
    voltage: NDArray[np.float64]  # voltage, NaN when absent
    partition: NDArray[np.int32]  # source Kafka partition
    offset: NDArray[np.int64]  # source Kafka offset

    def __len__(self) -> int:
        return int(self.meter.shape[0])

    @classmethod
    def empty(cls) -> Readings:
        return cls(
            meter=np.empty(0, np.int32),
            region=np.empty(0, np.int32),
            ts_ms=np.empty(0, np.int64),
            power=np.empty(0, np.float64),
            energy=np.empty(0, np.float64),
            voltage=np.empty(0, np.float64),
            partition=np.empty(0, np.int32),
            offset=np.empty(0, np.int64),
        )

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> Readings:
        """The readings selected by an index array or boolean mask, order kept."""
        return take_rows(self, index)
