"""Meters idle for ``METER_IDLE_EVICT`` of event time give their memory back (issue 20).

A worker holds per meter slot: its name (interner, encoded COPY field), window cells, detector
state, the latest window it wrote and the partition of its last reading. Without eviction every
meter id ever read keeps its slot. Here, at each checkpoint cut, a meter whose cells are empty
and whose newest reading is ``after_ms`` older than its partition's newest, and which the cut
does not name, gives its slot back; the slot goes to the next new name.

Why that loses nothing: a cut is drained only when every earlier cut is stored
(:meth:`segs.runtime.checkpointer.Checkpointer.cut`), so the stored baseline of a meter this
cut does not name is its whole detector state; its windows are stored too, and later readings
for them merge into their rows. When the meter returns, :func:`recall` reads its baseline
back before any reading of it is checked, one query per batch for all returning meters;
with ``DEDUPLICATE`` its new cells start at its stored newest event time
(:meth:`WindowEngine.seed`), so a re-send of a reading stored before it left is a duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from segs.checkpoint.payload import MeterPartitions, WrittenWindows, baseline_state
from segs.checkpoint.pgcopy import TextFields
from segs.checkpoint.sink import BaselineRow
from segs.detection.detector import AnomalyDetector, BaselineState
from segs.intake.readings import Interner, Readings
from segs.times import NEVER
from segs.windows.engine import WindowEngine

Lookup = Callable[[list[str]], Sequence[BaselineRow]]  # meter ids → their stored baselines
TRIM_AFTER = 10_000  # meters evicted at once after which the freed heap goes back to the OS


def evict_idle(after_ms: int, named: NDArray[np.int32], *, meters: Interner, fields: TextFields,
               windows: WindowEngine, detector: AnomalyDetector, written: WrittenWindows,
               homes: MeterPartitions, recalled: bool = True) -> int:
    """Release the slots of idle meters not in ``named`` (the slots the cut just drained
    names: :meth:`segs.checkpoint.payload.Payload.meters`); returns how many. ``recalled``:
    returning meters go through :func:`recall` (the worker's do, with the detector on)."""
    idle = windows.idle(len(meters), after_ms) & meters.in_use()
    idle[named] = False
    slots = np.flatnonzero(idle)
    if slots.size:
        meters.release(slots)
        fields.release(slots)
        detector.release(slots)
        windows.release(slots, floor=not recalled)
        written.release(slots)
        homes.release(slots)
    return int(slots.size)


def recall(readings: Readings, *, meters: Interner, detector: AnomalyDetector,
           windows: WindowEngine, lookup: Lookup, threshold: Callable[[int], int]) -> None:
    """Give the detector the stored state of the batch's meters it does not hold (returned
    after eviction, forgotten with a partition, or new) with one ``lookup``, and seed their
    cells with it (:meth:`WindowEngine.seed`). Raises what ``lookup`` raises, before
    anything changed."""
    slots = detector.unheld(readings.meter)
    if not slots.size:
        return
    names = meters.names
    state = load_baselines(lookup([names[s] for s in slots.tolist()]), meters=meters,
                           detector=detector, threshold=threshold)
    detector.hold(slots)
    if state is not None:
        windows.seed(state.meter.astype(np.intp), state.newest_ms)


def load_baselines(rows: Sequence[BaselineRow], *, meters: Interner, detector: AnomalyDetector,
                   threshold: Callable[[int], int]) -> BaselineState | None:
    """Stored baselines into the detector; one stored before V009 (no newest event time)
    counts as new as ``threshold`` of its partition (the newest event time stored)."""
    if not rows:
        return None
    state = baseline_state(rows, meters.slot)
    before = state.newest_ms == NEVER
    state.newest_ms[before] = [threshold(p) for p in state.partition[before].tolist()]
    detector.load(state)
    return state
