"""Mergeable partial aggregates: the one arithmetic shared by memory and the database.

A partial is (count, power_sum, power_max, power_min, energy_sum, last_ts_ms, region,
partition, voltage_sum, voltage_count): the voltage sum and count cover the readings that
carried a voltage. Two partials of the same (meter, window) merge by adding counts and sums
and taking max/min; region and partition come from the partial that is greatest by the tuple
``(last_ts_ms, region compared by code point, partition)``. Every rule is commutative and
associative, so any split of a window's readings, merged in any order, gives the same row.
The SQL upsert does the same with ``(last_reading_at, region COLLATE "C", source_partition)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import Interner, Readings, take_rows


class PartialRow(NamedTuple):
    """One partial aggregate with its region as a string (for tests and the sink)."""

    count: int  # type: ignore[assignment]  # shadows tuple.count, by design
    power_sum: float
    power_max: float
    power_min: float
    energy_sum: float
    last_ts_ms: int
    region: str
    partition: int
    voltage_sum: float = 0.0  # of the readings that carried a voltage
    voltage_count: int = 0

    @property
    def avg(self) -> float:
        return self.power_sum / self.count

    @property
    def voltage_avg(self) -> float | None:
        return self.voltage_sum / self.voltage_count if self.voltage_count else None


def merge(a: PartialRow, b: PartialRow) -> PartialRow:
    """The merge the SQL upsert performs: sums add, extremes combine, latest tuple wins."""
    later = (
        a if (a.last_ts_ms, a.region, a.partition) >= (b.last_ts_ms, b.region, b.partition) else b
    )
    return PartialRow(
        count=a.count + b.count,
        power_sum=a.power_sum + b.power_sum,
        power_max=max(a.power_max, b.power_max),
        power_min=min(a.power_min, b.power_min),
        energy_sum=a.energy_sum + b.energy_sum,
        last_ts_ms=later.last_ts_ms,
        region=later.region,
        partition=later.partition,
        voltage_sum=a.voltage_sum + b.voltage_sum,
        voltage_count=a.voltage_count + b.voltage_count,
    )


_NO_VOLTAGE: NDArray[np.float64] = np.zeros(0, np.float64)  # sentinels: "not given"
_NO_VOLTAGE_COUNT: NDArray[np.int64] = np.zeros(0, np.int64)


@dataclass(slots=True)
class Partials:
    """Partial aggregates of one window size as columns, one row per (meter, window)."""

    size_s: int
    meter: NDArray[np.int32]
    window_start_ms: NDArray[np.int64]
    count: NDArray[np.int64]
    power_sum: NDArray[np.float64]
    power_max: NDArray[np.float64]
    power_min: NDArray[np.float64]
    energy_sum: NDArray[np.float64]
    last_ts_ms: NDArray[np.int64]
    region: NDArray[np.int32]
    partition: NDArray[np.int32]
    # of the readings that carried a voltage; left out: none did (zeros are filled in)
    voltage_sum: NDArray[np.float64] = field(default_factory=lambda: _NO_VOLTAGE)
    voltage_count: NDArray[np.int64] = field(default_factory=lambda: _NO_VOLTAGE_COUNT)

    def __post_init__(self) -> None:
        n = len(self.meter)
        if self.voltage_sum is _NO_VOLTAGE:
            self.voltage_sum = np.zeros(n, np.float64)
        if self.voltage_count is _NO_VOLTAGE_COUNT:
            self.voltage_count = np.zeros(n, np.int64)

    def __len__(self) -> int:
        return int(self.meter.shape[0])

    @classmethod
    def empty(cls, size_s: int) -> Partials:
        return cls.concat(size_s, [])

    @classmethod
    def concat(cls, size_s: int, parts: list[Partials]) -> Partials:
        def col(name: str, dtype: type[np.generic]) -> NDArray[np.generic]:
            if not parts:
                return np.empty(0, dtype)
            return np.concatenate([getattr(p, name) for p in parts]).astype(dtype, copy=False)

        return cls(
            size_s=size_s,
            meter=col("meter", np.int32),  # type: ignore[arg-type]
            window_start_ms=col("window_start_ms", np.int64),  # type: ignore[arg-type]
            count=col("count", np.int64),  # type: ignore[arg-type]
            power_sum=col("power_sum", np.float64),  # type: ignore[arg-type]
            power_max=col("power_max", np.float64),  # type: ignore[arg-type]
            power_min=col("power_min", np.float64),  # type: ignore[arg-type]
            energy_sum=col("energy_sum", np.float64),  # type: ignore[arg-type]
            last_ts_ms=col("last_ts_ms", np.int64),  # type: ignore[arg-type]
            region=col("region", np.int32),  # type: ignore[arg-type]
            partition=col("partition", np.int32),  # type: ignore[arg-type]
            voltage_sum=col("voltage_sum", np.float64),  # type: ignore[arg-type]
            voltage_count=col("voltage_count", np.int64),  # type: ignore[arg-type]
        )

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> Partials:
        return take_rows(self, index)

    def row(self, i: int, regions: Interner) -> PartialRow:
        """Row ``i`` as a :class:`PartialRow` with the region name resolved."""
        return PartialRow(
            count=int(self.count[i]),
            power_sum=float(self.power_sum[i]),
            power_max=float(self.power_max[i]),
            power_min=float(self.power_min[i]),
            energy_sum=float(self.energy_sum[i]),
            last_ts_ms=int(self.last_ts_ms[i]),
            region=regions.names[int(self.region[i])],
            partition=int(self.partition[i]),
            voltage_sum=float(self.voltage_sum[i]),
            voltage_count=int(self.voltage_count[i]),
        )


def of_readings(r: Readings, size_s: int) -> Partials:
    """One partial per reading (not merged: keys may repeat)."""
    power = r.power.astype(np.float64)
    return Partials(
        size_s=size_s,
        meter=r.meter.astype(np.int32),
        window_start_ms=r.ts_ms // (size_s * 1000) * (size_s * 1000),
        count=np.ones(len(r), np.int64),
        power_sum=power,
        power_max=power,
        power_min=power,
        energy_sum=r.energy.astype(np.float64),
        last_ts_ms=r.ts_ms.astype(np.int64),
        region=r.region.astype(np.int32),
        partition=r.partition.astype(np.int32),
        voltage_sum=np.nan_to_num(r.voltage, nan=0.0),
        voltage_count=(~np.isnan(r.voltage)).astype(np.int64),
    )


def region_ranks(regions: Interner) -> NDArray[np.int64]:
    """Rank of every region slot when the names are sorted by code point."""
    names = regions.names
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), np.int64)
    rank[order] = np.arange(len(names), dtype=np.int64)
    return rank


def combine(partials: Partials, region_rank: NDArray[np.int64]) -> Partials:
    """Merge rows with the same (meter, window_start_ms) into one; output sorted by key.

    ``region_rank`` is :func:`region_ranks` of the Interner the region slots come from.
    """
    n = len(partials)
    if n == 0:
        return partials
    p = partials
    rank = region_rank[p.region] if n else np.empty(0, np.int64)
    # primary key last: meter, window, then the "latest" tuple so a group's last row wins
    order = np.lexsort((p.partition, rank, p.last_ts_ms, p.window_start_ms, p.meter))
    s = p.take(order)
    new_group = np.empty(n, np.bool_)
    new_group[0] = True
    np.not_equal(s.meter[1:], s.meter[:-1], out=new_group[1:])
    new_group[1:] |= s.window_start_ms[1:] != s.window_start_ms[:-1]
    starts = np.flatnonzero(new_group)
    if len(starts) == n:
        return s
    ends = np.append(starts[1:], n) - 1
    return Partials(
        size_s=p.size_s,
        meter=s.meter[starts],
        window_start_ms=s.window_start_ms[starts],
        count=np.add.reduceat(s.count, starts),
        power_sum=np.add.reduceat(s.power_sum, starts),
        power_max=np.maximum.reduceat(s.power_max, starts),
        power_min=np.minimum.reduceat(s.power_min, starts),
        energy_sum=np.add.reduceat(s.energy_sum, starts),
        last_ts_ms=s.last_ts_ms[ends],
        region=s.region[ends],
        partition=s.partition[ends],
        voltage_sum=np.add.reduceat(s.voltage_sum, starts),
        voltage_count=np.add.reduceat(s.voltage_count, starts),
    )


def roll_up(partials: Partials, size_s: int, region_rank: NDArray[np.int64]) -> Partials:
    """The partials of the coarser windows of ``size_s`` seconds that ``partials`` nest in.

    Windows are aligned to the epoch, so a window of ``partials.size_s`` lies in exactly one
    window of a multiple of its size: each row's start is floored to ``size_s`` and the rows
    that then share a (meter, window) are merged by :func:`combine` (output sorted by key).
    """
    if size_s % partials.size_s:
        raise ValueError(f"{partials.size_s} s windows do not nest in {size_s} s windows")
    size_ms = size_s * 1000
    p = partials
    coarse = Partials(size_s, p.meter, p.window_start_ms // size_ms * size_ms, p.count,
                      p.power_sum, p.power_max, p.power_min, p.energy_sum, p.last_ts_ms,
                      p.region, p.partition, p.voltage_sum, p.voltage_count)
    return combine(coarse, region_rank)
