"""What one checkpoint writes, and its split into transactions that can run side by side.

A checkpoint's :class:`Payload` holds the drained 1-minute partials, the changed detector
baselines and the next position of every covered partition. Positions are per partition,
so a payload can be cut along partitions into several payloads, each one a complete
checkpoint of its partitions — as if those partitions alone had been checkpointed — and
written in its own transaction on its own connection (:meth:`segs.checkpoint.sink.Sink.commit_all`),
``CHECKPOINT_WRITERS`` of them: PostgreSQL runs each upsert on one core, so transactions side
by side use more of them (``benchmarks/README.md``, "Checkpoint").

The cut is exact only when no partial or baseline mixes readings of partitions that land
in different parts. Readings are keyed by meter id, so a meter's readings come from one
partition; :class:`MeterPartitions` watches for the exception (a producer that changed its
partitioning) and such a payload is written whole, in one transaction.

Rows the worker has never written are sent apart from the others, as *fresh*
(:class:`WrittenWindows` tells them): the sink inserts them plainly, without the
``ON CONFLICT`` probe and speculative insertion that a merge costs per row, and merges them
only if one of them was there after all (another worker wrote it, or this one before a
restart). Which way a row goes changes the time, never the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from segs.checkpoint.dedup import decide, identity_column, undecided_windows
from segs.checkpoint.pgcopy import BytesColumn, CopyData, copy_data
from segs.checkpoint.sink import BaselineRow, CommitJob, Deferred, Encoded, Positions
from segs.detection.detector import BaselineState
from segs.intake.readings import Readings, grown, room, take_apart
from segs.times import NEVER
from segs.windows.identities import IdentityLog
from segs.windows.partials import Partials, roll_up
from segs.windows.sizes import BY_SECONDS


@dataclass(slots=True)
class Payload:
    """What one checkpoint writes; kept verbatim for retries after a database failure.

    Partials and baselines stay numpy columns (tens of bytes a row) until :meth:`commit_job`
    encodes them as binary COPY data for the transaction (:mod:`segs.checkpoint.pgcopy`)."""

    partials: Partials  # 1-minute partials
    baselines: BaselineState
    positions: Positions
    # window size → per 1-minute partial, whether its window of that size is one this worker
    # never wrote for the meter (WrittenWindows.fresh); a size missing here: none is
    fresh: dict[int, NDArray[np.bool_]] = field(default_factory=dict)
    # with DEDUPLICATE: the identities counted into the partials, stored with them, and the
    # readings the worker could not decide (segs.checkpoint.dedup); None: off
    identities: IdentityLog | None = None
    undecided: Readings | None = None
    # per partition of ``positions``: the newest event time of its readings, stored with it
    newest_ms: dict[int, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(len(self.partials) or len(self.baselines) or self.positions
                    or (self.undecided is not None and len(self.undecided)))

    def meters(self) -> NDArray[np.int32]:
        """Every meter slot the payload names (with repeats): their names must stay."""
        held = [self.partials.meter, self.baselines.meter]
        if self.identities is not None:
            held.append(self.identities.windows()[0])
        if self.undecided is not None:
            held.append(self.undecided.meter)
        return np.concatenate(held)

    def commit_job(self, meters: Sequence[bytes], regions: Sequence[bytes],
            region_rank: NDArray[np.int64]) -> CommitJob:
        """The arguments of :meth:`segs.checkpoint.sink.Sink.commit` for this payload: the 1-minute
        partials and their roll-up into every coarser window size the sink stores, each
        size as the rows that may be stored already and the fresh ones.

        ``meters`` and ``regions`` are the encoded names by slot
        (:class:`segs.checkpoint.pgcopy.TextFields`), ``region_rank`` the order of the region names
        (:func:`segs.windows.partials.region_ranks`), which decides a merged window's region.

        With undecided readings the partials are encoded in the transaction, once the stored
        identities of their windows are read (:class:`segs.checkpoint.sink.Deferred`)."""
        b = self.baselines
        baselines = copy_data(
            [("source_partition", b.partition), ("baseline", b.baseline),
             ("samples", b.samples), ("last_outage_ms", b.last_outage_ms),
             ("last_spike_ms", b.last_spike_ms), ("last_drop_ms", b.last_drop_ms),
             ("newest_reading_ms", b.newest_ms)],
            [("meter_id", b.meter, meters)])
        u, ids = self.undecided, self.identities
        if u is None or not len(u) or ids is None:
            enc = _encode(self.partials, ids, self.fresh, meters, regions, region_rank)
            return CommitJob(enc.partials, baselines, self.positions, enc.fresh, enc.windows,
                             None, self.newest_ms)
        undecided: Readings = u
        identities: IdentityLog = ids
        slots, starts = undecided_windows(undecided, self.partials.size_s * 1000)

        def finish(stored: list[bytes | None]) -> Encoded:
            d = decide(self.partials, identities, self.fresh, undecided, stored, region_rank)
            enc = _encode(d.partials, d.identities, d.fresh, meters, regions, region_rank)
            return enc._replace(duplicates=d.duplicates)

        names = [meters[m][4:].decode() for m in slots.tolist()]  # fields: length, UTF-8
        windows = np.union1d(self.partials.window_start_ms, starts).tolist()  # may cover
        return CommitJob({}, baselines, self.positions, {}, windows,
                         Deferred(names, starts.tolist(), finish), self.newest_ms)

    def split(self, parts: int, *, consume: bool = False) -> list[Payload]:
        """This payload as at most ``parts`` payloads over disjoint sets of partitions,
        balanced by partial count (largest partition first into the lightest part).

        Only exact when no partial or baseline mixes partitions of two parts; the caller
        checks that with :class:`MeterPartitions`. Empty parts are left out. ``consume``:
        the caller drops this payload, whose partials and baselines are emptied column by
        column as the parts take them, so that a checkpoint never holds them twice.
        """
        pp, bp = self.partials.partition, self.baselines.partition
        ids, counts = np.unique(pp, return_counts=True)
        up = [] if self.undecided is None else np.unique(self.undecided.partition).tolist()
        weight = dict.fromkeys([*self.positions, *np.unique(bp).tolist(), *up], 0)
        weight.update(zip(ids.tolist(), counts.tolist(), strict=True))
        partitions = sorted(weight)
        if parts <= 1 or len(partitions) <= 1:
            return [self] if self else []
        loads = [0] * parts
        groups: list[list[int]] = [[] for _ in range(parts)]
        for p in sorted(partitions, key=lambda q: (-weight[q], q)):
            lightest = loads.index(min(loads))
            groups[lightest].append(p)
            loads[lightest] += weight[p] + 1
        groups = [g for g in groups if g]
        masks = [np.isin(pp, np.array(g, np.int32)) for g in groups]
        del pp
        partials = take_apart(self.partials, list(masks), consume=consume)
        baselines = take_apart(self.baselines, [np.isin(bp, g) for g in groups], consume=consume)
        del bp
        out = []
        for group, rows, part_partials, part_baselines in zip(
                groups, masks, partials, baselines, strict=True):
            keep = np.array(group, np.int32)
            out.append(Payload(
                part_partials,
                part_baselines,
                {p: pos for p, pos in self.positions.items() if p in group},
                {size: is_fresh[rows] for size, is_fresh in self.fresh.items()},
                None if self.identities is None
                else self.identities.of_partitions(keep),
                None if self.undecided is None
                else self.undecided.take(np.isin(self.undecided.partition, keep)),
                {p: t for p, t in self.newest_ms.items() if p in group},
            ))
        return out


def baseline_state(rows: Sequence[BaselineRow], slot: Callable[[str], int]) -> BaselineState:
    """Stored baselines as detector state, meter ids turned into slots by ``slot``."""
    return BaselineState(
        meter=np.fromiter((slot(r.meter_id) for r in rows), np.int32, len(rows)),
        partition=np.array([r.source_partition for r in rows], np.int32),
        baseline=np.array([r.baseline for r in rows], np.float64),
        samples=np.array([r.samples for r in rows], np.int64),
        last_outage_ms=np.array([r.last_outage_ms for r in rows], np.int64),
        last_spike_ms=np.array([r.last_spike_ms for r in rows], np.int64),
        last_drop_ms=np.array([r.last_drop_ms for r in rows], np.int64),
        newest_ms=np.array([NEVER if r.newest_reading_ms is None else r.newest_reading_ms
                            for r in rows], np.int64),
    )


def _encode(p: Partials, identities: IdentityLog | None, fresh: dict[int, NDArray[np.bool_]],
            meters: Sequence[bytes], regions: Sequence[bytes],
            region_rank: NDArray[np.int64]) -> Encoded:
    """1-minute partials (with their identities, when given) and their roll-up into every
    coarser size, each size as the rows that may be stored already and the fresh ones."""
    stored: dict[int, CopyData] = {}
    fresh_rows: dict[int, CopyData] = {}
    blobs = [] if identities is None else [("identities", *identity_column(p, identities))]
    for size in BY_SECONDS:
        is_fresh = fresh.get(size)
        split = [(stored, None)] if is_fresh is None else [
            (stored, ~is_fresh), (fresh_rows, is_fresh)]
        for into, mask in split:
            if mask is not None and not mask.any():
                continue
            if size == p.size_s:  # the rows of p, gathered as they are sent
                rows = None if mask is None or mask.all() else np.flatnonzero(mask)
                into[size] = _partials_copy(p, meters, regions, blobs, rows)
            else:  # all of a coarse window's partials share its freshness: split, roll up
                part = p if mask is None else _rows(p, mask)
                into[size] = _partials_copy(roll_up(part, size, region_rank), meters, regions)
    windows = np.unique(p.window_start_ms).tolist()  # for the regional roll-up
    return Encoded(stored, fresh_rows, windows)


def _rows(p: Partials, mask: NDArray[np.bool_]) -> Partials:
    """The partials ``mask`` selects; ``p`` itself, not a copy, when it selects them all
    (a checkpoint of only new windows, or only stored ones, would hold them twice)."""
    return p if mask.all() else p.take(mask)


def _partials_copy(p: Partials, meters: Sequence[bytes], regions: Sequence[bytes],
                   blobs: Sequence[BytesColumn] = (),
                   rows: NDArray[np.intp] | None = None) -> CopyData:
    return copy_data(
        [("window_start_ms", p.window_start_ms), ("sample_count", p.count),
         ("power_sum", p.power_sum), ("power_max", p.power_max), ("power_min", p.power_min),
         ("energy_sum", p.energy_sum), ("last_ts_ms", p.last_ts_ms),
         ("source_partition", p.partition), ("voltage_sum", p.voltage_sum),
         ("voltage_count", p.voltage_count)],
        [("meter_id", p.meter, meters), ("region", p.region, regions)], blobs=blobs,
        rows=rows)


class MeterPartitions:
    """The partition each meter's last reading came from, and whether some meter's readings
    came from more than one partition since :meth:`take_mixed` was last called."""

    def __init__(self) -> None:
        self._home: NDArray[np.int32] = np.full(1024, -1, np.int32)
        self._mixed = False

    def note(self, meter: NDArray[np.int32], partition: NDArray[np.int32]) -> None:
        if meter.size == 0:
            return
        top = int(meter.max()) + 1
        if top > self._home.shape[0]:
            self._home = grown(self._home, room(top, self._home.shape[0]), -1)
        before = self._home[meter]
        if not self._mixed and bool(((before >= 0) & (before != partition)).any()):
            self._mixed = True
        self._home[meter] = partition  # one of a meter's readings wins; if they differ, mixed
        if not self._mixed and bool((self._home[meter] != partition).any()):
            self._mixed = True  # one meter on two partitions within this batch

    def take_mixed(self) -> bool:
        mixed, self._mixed = self._mixed, False
        return mixed

    def release(self, slots: NDArray[np.intp]) -> None:
        """Evicted meters: their slots have no last partition."""
        self._home[slots[slots < self._home.shape[0]]] = -1


class WrittenWindows:
    """Per meter slot and window size, the latest window this worker has drained to write:
    which windows of a checkpoint are *fresh*, never written by this worker.

    A fresh window is almost always a new row. It is not one when another worker wrote it
    (partitions moved, or a producer spread a meter over partitions) or this worker did
    before a restart; the sink then merges it, so a wrong guess costs time, not exactness.
    A window older than the latest one is never called fresh, so one that really is new
    is merged (a late reading for a window nothing was written for). Nor is a window that
    starts by the newest event time stored for its partition (:meth:`stored_through`):
    after a restart or a move, the replayed readings of such windows mostly find their rows.
    """

    def __init__(self, sizes: tuple[int, ...] = tuple(BY_SECONDS)) -> None:
        self._latest = {size: np.full(1024, NEVER, np.int64) for size in sizes}
        self._stored = np.full(0, NEVER, np.int64)  # per partition: newest event ms stored

    def stored_through(self, partition: int, newest_ms: int) -> None:
        """Rows of ``partition`` may exist for windows starting by ``newest_ms`` (the
        newest event time of its stored position; NEVER: none)."""
        if partition >= self._stored.shape[0]:
            self._stored = grown(self._stored, partition + 1, NEVER)
        self._stored[partition] = newest_ms

    def release(self, slots: NDArray[np.intp]) -> None:
        """Evicted meters: their slots' next meters have written no window."""
        for latest in self._latest.values():
            latest[slots[slots < latest.shape[0]]] = NEVER

    def fresh(self, partials: Partials) -> dict[int, NDArray[np.bool_]]:
        """Per size, which of ``partials`` (distinct (meter, window) keys of windows that
        nest in each size) fall in a window of that size fresh for their meter; the
        windows count as written from now on."""
        meter = partials.meter
        stored: NDArray[np.int64] | None = None
        if self._stored.shape[0] and len(meter):
            part = partials.partition
            if int(part.max()) >= self._stored.shape[0]:
                self._stored = grown(self._stored, int(part.max()) + 1, NEVER)
            stored = self._stored[part]
        out: dict[int, NDArray[np.bool_]] = {}
        for size, latest in self._latest.items():
            if len(meter) and int(meter.max()) >= latest.shape[0]:
                latest = grown(latest, room(int(meter.max()) + 1, latest.shape[0]), NEVER)
                self._latest[size] = latest
            window = partials.window_start_ms // (size * 1000)
            out[size] = window > latest[meter]
            if stored is not None:
                out[size] &= window > stored // (size * 1000)
            np.maximum.at(latest, meter, window)
        return out
