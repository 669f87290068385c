"""Columnar batches shared by the decoder, the window engine and the anomaly detector.

A batch of Kafka messages becomes one :class:`Readings` value: parallel numpy arrays, one
element per *valid* reading, in the order the messages were consumed (partition order).
Strings (meter ids, regions) are interned to small integer slots by :class:`Interner`, so the
hot path only ever touches integers and floats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import DTypeLike, NDArray

_T = TypeVar("_T", bound=np.generic)
_C = TypeVar("_C")


def take_rows(columns: _C, index: NDArray[np.intp] | NDArray[np.bool_]) -> _C:
    """A columns dataclass (one numpy array per field, scalars kept) with the rows selected
    by an index array or boolean mask, order kept."""
    picked = {f.name: value[index] for f in dataclasses.fields(columns)  # type: ignore[arg-type]
              if isinstance(value := getattr(columns, f.name), np.ndarray)}
    return dataclasses.replace(columns, **picked)  # type: ignore[type-var]


def grown(old: NDArray[_T] | None, n: int, fill: float,
          dtype: DTypeLike | None = None) -> NDArray[_T]:
    """A length-``n`` array filled with ``fill``, starting with the contents of ``old``."""
    arr: NDArray[_T] = np.full(n, fill, dtype if old is None else old.dtype)
    if old is not None:
        arr[: old.shape[0]] = old
    return arr


class Interner:
    """Maps strings to dense integer slots (0, 1, 2, …) and back."""

    __slots__ = ("names", "slots")

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def slot(self, name: str) -> int:
        """The slot of ``name``, allocating the next one on first sight."""
        s = self.slots.get(name)
        if s is None:
            s = len(self.names)
            self.slots[name] = s
            self.names.append(name)
        return s


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
