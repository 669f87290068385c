"""Per-meter consumption anomaly detection (outage, spike, drop) over columnar batches.

Semantics
=========
Every meter slot holds a *baseline* (an exponential moving average of powerKw), *samples*
(how many readings were folded into it), the event time of the last alert of each kind, the
partition of its last reading and the newest event time folded (with ``DEDUPLICATE``: a
reading of a window only the checkpoint can decide is folded only when newer). Readings
are processed one by one per meter, in batch order (= partition order); for one reading
``(power, ts_ms)``:

1. **Seed.** If ``samples == 0``: ``baseline = power``, ``samples = 1``; nothing is checked.
2. **Check** (only when ``samples >= min_samples``, against the baseline *before* this
   reading). With ``change = (power - baseline) / max(baseline, 0.1)`` the first matching
   rule decides the kind:

   - ``outage`` if ``power < 0.1 and baseline > 1.0`` — severity ``high``;
   - ``spike`` if ``change > spike_threshold`` — ``high`` if ``change > 2.0`` else ``medium``;
   - ``drop`` if ``change < -drop_threshold`` — ``medium`` if ``change < -0.8`` else ``low``.

   The alert is emitted only if ``ts_ms - last_alert[kind] >= cooldown_ms``, and then
   ``last_alert[kind] = ts_ms``. A kind that matches while in cooldown emits nothing and
   does *not* fall through to a later rule. Event time going backwards never emits.
3. **Fold.** ``baseline = 0.8 * baseline + 0.2 * power`` (exactly this float arithmetic),
   ``samples += 1``.

So with the default ``min_samples = 10`` the 11th reading of a meter is the first checked.
``min_samples`` below 1 behaves as 1 (the seeding reading is never checked).

:meth:`AnomalyDetector.check` gives, for any batch, bit for bit what that reading-by-reading
pass gives: it processes *rounds* (round k = the k-th reading of every meter in the batch)
vectorized across meters, and once rounds get small (a few meters with many readings) it
finishes those meters with a tight scalar loop for the baselines and vectorized checks.

State and checkpoints
=====================
The state of a slot is one :class:`BaselineState` row; "never alerted" is
:data:`segs.times.NEVER`. A slot never seen (or forgotten) has ``samples == 0`` and
``partition == -1``. Slots touched by :meth:`~AnomalyDetector.check` become *dirty*;
:meth:`~AnomalyDetector.take_dirty` hands them to the checkpoint and clears the mark. A slot
is *held* once its stored state was loaded or looked up (or it was folded into): a meter
evicted for idleness (:meth:`~AnomalyDetector.release`) is looked up again when it returns. The
checkpoint owns what it took: a failed write is retried with that same state, and when the
worker loses ownership it discards the whole detector and reloads baselines from the
database, so nothing is ever handed back.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from segs.intake.readings import Readings, room, take_rows
from segs.times import NEVER

KINDS: Final = ("outage", "spike", "drop")
OUTAGE: Final = 0
SPIKE: Final = 1
DROP: Final = 2

SEVERITIES: Final = ("low", "medium", "high")
LOW: Final = 0
MEDIUM: Final = 1
HIGH: Final = 2

# Below this many meters in a round, the remaining readings go through the scalar path: a
# small vectorized round costs more in numpy calls than the loop does in steps.
_SCALAR_BELOW: Final = 256


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """Thresholds of the detector (``change`` is a ratio: 1.0 = +100 %)."""

    spike_threshold: float = 1.0
    drop_threshold: float = 0.5
    min_samples: int = 10
    cooldown_ms: int = 300_000

    def __post_init__(self) -> None:
        for name in ("spike_threshold", "drop_threshold"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {self.min_samples!r}")
        if self.cooldown_ms < 0:
            raise ValueError(f"cooldown_ms must be >= 0, got {self.cooldown_ms!r}")


@dataclass(slots=True)
class Detections:
    """Alerts of one batch as columns, one row per alert, ordered by ``index``."""

    index: NDArray[np.int64]  # position of the reading in the batch
    kind: NDArray[np.int8]  # index into KINDS
    severity: NDArray[np.int8]  # index into SEVERITIES
    baseline: NDArray[np.float64]  # baseline the reading was checked against
    current: NDArray[np.float64]  # the reading's powerKw
    change: NDArray[np.float64]  # (current - baseline) / max(baseline, 0.1)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            index=np.empty(0, np.int64),
            kind=np.empty(0, np.int8),
            severity=np.empty(0, np.int8),
            baseline=np.empty(0, np.float64),
            current=np.empty(0, np.float64),
            change=np.empty(0, np.float64),
        )


_NO_NEWEST: NDArray[np.int64] = np.zeros(0, np.int64)  # sentinel: "not given"


@dataclass(slots=True)
class BaselineState:
    """Detector state of some meter slots as columns (one row per slot), for checkpoints."""

    meter: NDArray[np.int32]  # slot in the meter Interner
    baseline: NDArray[np.float64]
    samples: NDArray[np.int64]
    last_outage_ms: NDArray[np.int64]  # NEVER when never alerted
    last_spike_ms: NDArray[np.int64]
    last_drop_ms: NDArray[np.int64]
    partition: NDArray[np.int32]  # source partition of the slot's last reading
    # the newest event time folded (NEVER: none); left out: NEVER for every slot
    newest_ms: NDArray[np.int64] = field(default_factory=lambda: _NO_NEWEST)

    def __post_init__(self) -> None:
        if self.newest_ms is _NO_NEWEST:
            self.newest_ms = np.full(len(self.meter), NEVER, np.int64)

    def __len__(self) -> int:
        return int(self.meter.shape[0])

    @classmethod
    def empty(cls) -> BaselineState:
        never = np.empty(0, np.int64)
        return cls(
            meter=np.empty(0, np.int32),
            baseline=np.empty(0, np.float64),
            samples=np.empty(0, np.int64),
            last_outage_ms=never,
            last_spike_ms=never.copy(),
            last_drop_ms=never.copy(),
            partition=np.empty(0, np.int32),
        )

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> BaselineState:
        return take_rows(self, index)


@dataclass(slots=True)
class _Found:
    """Alerts found by one step, before they are merged and ordered."""

    index: NDArray[np.int64]
    kind: NDArray[np.int8]
    severity: NDArray[np.int8]
    baseline: NDArray[np.float64]
    current: NDArray[np.float64]
    change: NDArray[np.float64]


class AnomalyDetector:
    """Spike / drop / outage detector with per-meter-slot state in growable numpy arrays."""

    __slots__ = (
        "_baseline",
        "_dirty",
        "_held",
        "_last",
        "_newest",
        "_partition",
        "_samples",
        "settings",
    )

    def __init__(self, settings: DetectorSettings | None = None, *, capacity: int = 1024) -> None:
        self.settings = settings if settings is not None else DetectorSettings()
        cap = max(int(capacity), 1)
        self._baseline = np.zeros(cap, np.float64)
        self._samples = np.zeros(cap, np.int64)
        self._last = np.full((len(KINDS), cap), NEVER, np.int64)  # [kind, slot]
        self._partition = np.full(cap, -1, np.int32)
        self._dirty = np.zeros(cap, np.bool_)
        self._newest = np.full(cap, NEVER, np.int64)  # newest event time folded
        self._held = np.zeros(cap, np.bool_)  # state known: loaded, looked up or folded

    # -- detection -------------------------------------------------------------------------

    def check(self, r: Readings) -> Detections:
        """Fold a batch into the baselines and return its alerts (see the module docstring)."""
        n = len(r)
        if n == 0:
            return Detections.empty()
        meter = r.meter.astype(np.intp, copy=False)
        self._reserve(int(meter.max()) + 1)

        order = np.argsort(meter, kind="stable")
        sorted_meter = meter[order]
        first = np.empty(n, np.bool_)
        first[0] = True
        np.not_equal(sorted_meter[1:], sorted_meter[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], n)
        group_meter = sorted_meter[starts]
        self._partition[group_meter] = r.partition[order[ends - 1]]
        self._dirty[group_meter] = True
        self._held[group_meter] = True
        np.maximum.at(self._newest, meter, r.ts_ms)

        found: list[_Found] = []
        rounds = int((ends - starts).max())
        if rounds == 1:
            self._round(r, order, found)
            return _merge(found)

        rank = np.arange(n) - np.repeat(starts, ends - starts)  # rank within meter, by order
        round_size = np.bincount(rank)
        by_round = order[np.argsort(rank, kind="stable")]
        offset = 0
        for k in range(rounds):
            size = int(round_size[k])
            if size < _SCALAR_BELOW and k + 1 < rounds:
                self._scalar(r, order[rank >= k], found)
                break
            self._round(r, by_round[offset : offset + size], found)
            offset += size
        return _merge(found)

    def _round(self, r: Readings, idx: NDArray[np.intp], found: list[_Found]) -> None:
        """One reading for each of some distinct meters: all vectorized."""
        m = r.meter[idx]
        p = r.power[idx]
        b = self._baseline[m]
        s = self._samples[m]
        self._baseline[m] = np.where(s == 0, p, 0.8 * b + 0.2 * p)
        self._samples[m] = s + 1
        sel = np.flatnonzero(s >= max(self.settings.min_samples, 1))
        if sel.size == 0:
            return
        b, p = b[sel], p[sel]
        kind, severity, change = self._classify(b, p)
        cand = np.flatnonzero(kind >= 0)
        if cand.size == 0:
            return
        sel = sel[cand]
        kind = kind[cand]
        mc = m[sel]
        tc = r.ts_ms[idx[sel]]
        emit = tc - self._last[kind, mc] >= self.settings.cooldown_ms
        self._last[kind[emit], mc[emit]] = tc[emit]
        keep = cand[emit]
        found.append(
            _Found(
                index=idx[sel[emit]].astype(np.int64),
                kind=kind[emit],
                severity=severity[keep],
                baseline=b[keep],
                current=p[keep],
                change=change[keep],
            )
        )

    def _scalar(self, r: Readings, idx: NDArray[np.intp], found: list[_Found]) -> None:
        """Readings of a few meters, ``idx`` ordered by meter then batch order.

        Baselines come from a plain Python loop (the recurrence is sequential); the checks
        are vectorized; the cooldown is a loop over the (rare) candidates only.
        """
        m = r.meter[idx]
        n = int(m.shape[0])
        first = np.empty(n, np.bool_)
        first[0] = True
        np.not_equal(m[1:], m[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], n)
        group_meter = m[starts]
        s0 = self._samples[group_meter]

        powers: list[float] = r.power[idx].tolist()
        before: list[float] = []  # baseline before each reading (seed: the reading itself)
        push = before.append
        finals: list[float] = []
        for st, en, b, s in zip(
            starts.tolist(),
            ends.tolist(),
            self._baseline[group_meter].tolist(),
            s0.tolist(),
            strict=True,
        ):
            if s == 0:
                b = powers[st]
                push(b)
                st += 1
            for x in powers[st:en]:
                push(b)
                b = 0.8 * b + 0.2 * x
            finals.append(b)
        self._baseline[group_meter] = finals
        counts = ends - starts
        self._samples[group_meter] = s0 + counts

        samples_before = np.repeat(s0 - starts, counts) + np.arange(n)
        sel = np.flatnonzero(samples_before >= max(self.settings.min_samples, 1))
        if sel.size == 0:
            return
        b_arr = np.array(before, np.float64)[sel]
        p_arr = r.power[idx[sel]]
        kind, severity, change = self._classify(b_arr, p_arr)
        cand = np.flatnonzero(kind >= 0)
        if cand.size == 0:
            return
        sel_c = sel[cand]
        last = self._last
        cooldown = self.settings.cooldown_ms
        cache: dict[tuple[int, int], int] = {}
        emitted: list[int] = []
        for j, k, mm, t in zip(
            cand.tolist(),
            kind[cand].tolist(),
            m[sel_c].tolist(),
            r.ts_ms[idx[sel_c]].tolist(),
            strict=True,
        ):
            key = (k, mm)
            prev = cache.get(key)
            if prev is None:
                prev = int(last[k, mm])
            if t - prev >= cooldown:
                cache[key] = t
                emitted.append(j)
            else:
                cache[key] = prev
        for (k, mm), t in cache.items():
            last[k, mm] = t
        if not emitted:
            return
        keep = np.array(emitted, np.intp)
        found.append(
            _Found(
                index=idx[sel[keep]].astype(np.int64),
                kind=kind[keep],
                severity=severity[keep],
                baseline=b_arr[keep],
                current=p_arr[keep],
                change=change[keep],
            )
        )

    def _classify(
        self, b: NDArray[np.float64], p: NDArray[np.float64]
    ) -> tuple[NDArray[np.int8], NDArray[np.int8], NDArray[np.float64]]:
        """Kind (-1 = none), severity and change of readings ``p`` against baselines ``b``."""
        change = (p - b) / np.maximum(b, 0.1)
        outage = (p < 0.1) & (b > 1.0)
        spike = ~outage & (change > self.settings.spike_threshold)
        drop = ~outage & ~spike & (change < -self.settings.drop_threshold)
        kind = np.full(b.shape[0], -1, np.int8)
        kind[drop] = DROP
        kind[spike] = SPIKE
        kind[outage] = OUTAGE
        severity = np.full(b.shape[0], LOW, np.int8)
        severity[drop & (change < -0.8)] = MEDIUM
        severity[spike] = MEDIUM
        severity[spike & (change > 2.0)] = HIGH
        severity[outage] = HIGH
        return kind, severity, change

    def unseen(self, r: Readings) -> NDArray[np.bool_]:
        """Which readings cannot have been folded before, whatever their identity: the first
        of their (meter, timestamp) in the batch and newer than every reading the meter's
        baseline holds. For readings whose window cannot be decided in memory: a re-send
        then never reaches the detector twice (an older reading is not folded at all)."""
        n = len(r)
        if n == 0:
            return np.zeros(0, np.bool_)
        self._reserve(int(r.meter.max()) + 1)
        fresh = r.ts_ms > self._newest[r.meter]
        order = np.lexsort((np.arange(n), r.ts_ms, r.meter))
        m, t = r.meter[order], r.ts_ms[order]
        repeat = np.zeros(n, np.bool_)
        repeat[order[1:]] = (m[1:] == m[:-1]) & (t[1:] == t[:-1])
        return fresh & ~repeat

    # -- state -------------------------------------------------------------------------------

    def take_dirty(self, partitions: Collection[int] | None = None) -> BaselineState:
        """State of the slots changed since the last call (only ``partitions``' if given).

        Clears their dirty mark: the caller keeps the result until it is stored.
        """
        mask = self._dirty.copy()
        if partitions is not None:
            mask &= np.isin(self._partition, np.fromiter(partitions, np.int32))
        slots = np.flatnonzero(mask)
        self._dirty[slots] = False
        return self._state(slots)

    def load(self, state: BaselineState) -> None:
        """Replace the state of the given slots (e.g. read from the database on assign).

        Loaded slots are clean: they equal what is stored.
        """
        if len(state) == 0:
            return
        slots = state.meter.astype(np.intp, copy=False)
        self._reserve(int(slots.max()) + 1)
        self._baseline[slots] = state.baseline
        self._samples[slots] = state.samples
        self._last[OUTAGE, slots] = state.last_outage_ms
        self._last[SPIKE, slots] = state.last_spike_ms
        self._last[DROP, slots] = state.last_drop_ms
        self._partition[slots] = state.partition
        self._newest[slots] = state.newest_ms
        self._dirty[slots] = False
        self._held[slots] = True

    def unheld(self, meter: NDArray[np.int32]) -> NDArray[np.intp]:
        """The distinct slots among ``meter`` whose stored state is not held: never looked
        up since they were made, forgotten or released. Look them up, then :meth:`load`
        what is stored and :meth:`hold` the rest (a meter with nothing stored is new)."""
        if meter.size == 0:
            return np.empty(0, np.intp)
        self._reserve(int(meter.max()) + 1)
        if self._held[meter].all():
            return np.empty(0, np.intp)
        slots = np.unique(meter).astype(np.intp)
        return slots[~self._held[slots]]

    def hold(self, slots: NDArray[np.intp]) -> None:
        """``slots`` have no stored state: their first state (never seen) is theirs."""
        self._reserve(int(slots.max()) + 1 if slots.size else 0)
        self._held[slots] = True

    def release(self, slots: NDArray[np.intp]) -> None:
        """Reset clean ``slots`` to never seen and not held (their meters were evicted;
        their state is stored and is looked up when they come back)."""
        slots = slots[slots < self._samples.shape[0]]
        self._reset(slots)

    def forget_partitions(self, partitions: Collection[int]) -> None:
        """Reset the slots whose last reading came from ``partitions`` to never seen (clean).

        Checkpoint them first (``take_dirty(partitions)``): their dirty state is dropped.
        """
        if not partitions:
            return
        self._reset(np.flatnonzero(np.isin(self._partition, np.fromiter(partitions, np.int32))))

    def _reset(self, slots: NDArray[np.intp]) -> None:
        self._baseline[slots] = 0.0
        self._samples[slots] = 0
        self._last[:, slots] = NEVER
        self._partition[slots] = -1
        self._newest[slots] = NEVER
        self._dirty[slots] = False
        self._held[slots] = False

    def snapshot(self, slots: NDArray[np.integer] | None = None) -> BaselineState:
        """State of ``slots`` (default: every slot ever seen and not forgotten); read only."""
        if slots is None:
            chosen = np.flatnonzero(self._samples > 0)
        else:
            chosen = np.asarray(slots, np.intp)
            self._reserve(int(chosen.max()) + 1 if chosen.size else 0)
        return self._state(chosen)

    def _state(self, slots: NDArray[np.intp]) -> BaselineState:
        return BaselineState(
            meter=slots.astype(np.int32),
            baseline=self._baseline[slots],
            samples=self._samples[slots],
            last_outage_ms=self._last[OUTAGE, slots],
            last_spike_ms=self._last[SPIKE, slots],
            last_drop_ms=self._last[DROP, slots],
            partition=self._partition[slots],
            newest_ms=self._newest[slots],
        )

    def _reserve(self, size: int) -> None:
        """Grow every per-slot array (:func:`room`) so slots ``0 .. size-1`` exist."""
        cap = self._samples.shape[0]
        if size <= cap:
            return
        extra = room(size, cap) - cap
        self._baseline = np.concatenate([self._baseline, np.zeros(extra, np.float64)])
        self._samples = np.concatenate([self._samples, np.zeros(extra, np.int64)])
        self._last = np.concatenate(
            [self._last, np.full((len(KINDS), extra), NEVER, np.int64)], axis=1
        )
        self._partition = np.concatenate([self._partition, np.full(extra, -1, np.int32)])
        self._dirty = np.concatenate([self._dirty, np.zeros(extra, np.bool_)])
        self._newest = np.concatenate([self._newest, np.full(extra, NEVER, np.int64)])
        self._held = np.concatenate([self._held, np.zeros(extra, np.bool_)])


def _merge(found: list[_Found]) -> Detections:
    """Alerts of all steps as one :class:`Detections`, ordered by batch position."""
    if not found:
        return Detections.empty()
    if len(found) == 1:
        f = found[0]
        order = np.argsort(f.index, kind="stable")
        return Detections(
            f.index[order],
            f.kind[order],
            f.severity[order],
            f.baseline[order],
            f.current[order],
            f.change[order],
        )
    index = np.concatenate([f.index for f in found])
    order = np.argsort(index, kind="stable")
    return Detections(
        index=index[order],
        kind=np.concatenate([f.kind for f in found])[order],
        severity=np.concatenate([f.severity for f in found])[order],
        baseline=np.concatenate([f.baseline for f in found])[order],
        current=np.concatenate([f.current for f in found])[order],
        change=np.concatenate([f.change for f in found])[order],
    )
