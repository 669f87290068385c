"""Re-sent readings decided in the checkpoint's transaction, and identities as stored.

The window engine decides in memory every reading of a window whose identities it holds
completely (:mod:`segs.windows.engine`); the others reach the checkpoint raw (*undecided*).
In its transaction the checkpoint reads the stored identities of exactly their windows (one
query, :meth:`segs.checkpoint.sink.Sink.commit`), then :func:`decide` keeps the first reading
of each identity that is neither stored nor in the checkpoint's own partials, and merges the
kept ones into those partials (1-minute rows, and so the 15-minute roll-up). Positions commit
in the same transaction, so a replay after a failure meets exactly what was stored.

Identities are stored per 1-minute row as ``bytea``: its readings' millisecond offsets from
the window start, 16-bit little-endian, in no particular order across merges (a merge
appends). NULL means *not known* (a row written before schema V009 or with
``DEDUPLICATE=off``): a reading merged into such a row is counted, and the row stays NULL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import Readings
from segs.windows.identities import OFFSET_BITS, IdentityLog, window_keys
from segs.windows.partials import Partials, combine, of_readings


@dataclass(slots=True)
class Decided:
    """A checkpoint's 1-minute partials after its undecided readings were decided."""

    partials: Partials
    identities: IdentityLog
    fresh: dict[int, NDArray[np.bool_]]  # as Payload.fresh, for ``partials``
    duplicates: int


def undecided_windows(u: Readings, size_ms: int) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
    """The distinct (meter slot, window start) of undecided readings, in key order: the
    windows whose stored identities :func:`decide` needs, in that order."""
    keys = np.unique(window_keys(u.meter, u.ts_ms // size_ms * size_ms, size_ms))
    return (keys >> 32).astype(np.int32), (keys & 0xFFFF_FFFF) * size_ms


def offsets_of(stored: bytes | None) -> NDArray[np.uint16]:
    """A stored identities value as offsets (NULL: none known)."""
    return np.frombuffer(stored, "<u2") if stored else np.empty(0, np.uint16)


def decide(partials: Partials, identities: IdentityLog, fresh: dict[int, NDArray[np.bool_]],
           undecided: Readings, stored: Sequence[bytes | None],
           region_rank: NDArray[np.int64]) -> Decided:
    """Keep the undecided readings whose identity is new, in arrival order, and merge them
    into ``partials`` (1-minute, with their ``identities``). ``stored`` holds the stored
    identities of :func:`undecided_windows` in its order (None: no row, or not known).
    A window that gets a kept reading is no longer *fresh* at any size: it may be stored."""
    size_ms = partials.size_s * 1000
    start = undecided.ts_ms // size_ms * size_ms
    ukey = window_keys(undecided.meter, start, size_ms)
    wkeys, inverse = np.unique(ukey, return_inverse=True)
    # what is counted already in these windows: stored, and in this checkpoint's partials
    offs = [offsets_of(s) for s in stored]
    have_w = [np.repeat(np.arange(len(offs), dtype=np.int64), [len(o) for o in offs])]
    have_o = [np.concatenate(offs).astype(np.int64) if offs else np.empty(0, np.int64)]
    meter, window_start, length = identities.windows()  # matched window by window
    gkey = window_keys(meter, window_start, size_ms)
    pos = np.minimum(np.searchsorted(wkeys, gkey), len(wkeys) - 1)
    mine = wkeys[pos] == gkey
    have_w.append(np.repeat(pos[mine].astype(np.int64), length[mine]))
    have_o.append(identities.offset[np.repeat(mine, length)].astype(np.int64))
    have = (np.concatenate(have_w) << OFFSET_BITS) | np.concatenate(have_o)
    offset = undecided.ts_ms - start
    key = (inverse.astype(np.int64) << OFFSET_BITS) | offset
    uniq, first = np.unique(key, return_index=True)
    kept = np.sort(first[~np.isin(uniq, have)])
    duplicates = len(undecided) - len(kept)
    if len(kept) == 0:
        return Decided(partials, identities, fresh, duplicates)
    new = undecided.take(kept)
    one_each = of_readings(new, partials.size_s)
    merged = combine(Partials.concat(partials.size_s, [partials, one_each]), region_rank)
    ids = IdentityLog.concat([identities, IdentityLog(
        new.meter.astype(np.int32), start[kept], offset[kept].astype(np.uint16),
        new.partition.astype(np.int32))])
    out_fresh = {}
    for size_s, is_fresh in fresh.items():
        coarse_ms = size_s * 1000
        fresh_keys = np.setdiff1d(
            window_keys(partials.meter[is_fresh], partials.window_start_ms[is_fresh], coarse_ms),
            window_keys(new.meter, new.ts_ms, coarse_ms))
        out_fresh[size_s] = np.isin(
            window_keys(merged.meter, merged.window_start_ms, coarse_ms), fresh_keys)
    return Decided(merged, ids, out_fresh, duplicates)


def identity_column(partials: Partials, identities: IdentityLog) -> tuple[bytes, NDArray[np.int64]]:
    """Each 1-minute partial's identities as stored: all rows' bytes one after the other and
    the bounds of row i at ``bounds[i]:bounds[i + 1]`` (binary COPY, ``pgcopy.BytesColumn``)."""
    size_ms = partials.size_s * 1000
    n = len(partials)
    bounds = np.zeros(n + 1, np.int64)
    if n == 0:
        return b"", bounds
    rkey = window_keys(partials.meter, partials.window_start_ms, size_ms)
    order = np.argsort(rkey, kind="stable")
    # matched window by window: per identity only its row and offset are made
    meter, window_start, length = identities.windows()
    gkey = window_keys(meter, window_start, size_ms)
    sorted_keys = rkey[order]
    pos = np.minimum(np.searchsorted(sorted_keys, gkey), n - 1)
    mine = sorted_keys[pos] == gkey  # identities of other rows (the other part of a split)
    row = order[pos[mine]]
    key = np.repeat(row.astype(np.int64), length[mine])  # row, then offset
    key <<= OFFSET_BITS
    key |= identities.offset[np.repeat(mine, length)]
    key.sort()
    np.cumsum(np.bincount(row, length[mine], minlength=n).astype(np.int64) * 2, out=bounds[1:])
    return key.astype("<u2").tobytes(), bounds  # the low 16 bits: the offsets
