"""What a worker holds for reading identities with DEDUPLICATE on (issue 21, bounded state).

    .venv/bin/python -m segs.bench.identities [--meters 100000] [--seconds 240]

One reading per meter per second of event time (a fixed millisecond phase per meter), 1 %
re-sent in the same or the next batch, in time order, in batches of ``BATCH_SIZE``'s
default, partition = meter % 6; a drain and ``take_identities`` every 60 s of event time
(``FLUSH_INTERVAL_1M``'s default). Just before each drain it reports the engine's identity
bytes per *held* reading: one counted in memory whose window was open at the last drain, or
counted since (what the engine must keep). Then, under :mod:`tracemalloc`, the traced bytes
of a worker's share of the pipeline benchmark (``--cut-meters`` meters for 100 s) and the
peak of its final checkpoint's cut and encoding, as :meth:`segs.runtime.worker.Worker.drain`
and the checkpoint thread make them.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray

from segs.checkpoint.payload import Payload, WrittenWindows
from segs.checkpoint.pgcopy import TextFields
from segs.detection.detector import AnomalyDetector
from segs.intake.readings import Interner, Readings
from segs.windows.engine import WindowEngine
from segs.windows.partials import region_ranks

BATCH = 50_000
PARTITIONS = 6
BASE_MS = 1_780_000_000_000 // 60_000 * 60_000
LATENESS_MS = 5_000  # ALLOWED_LATENESS's default


def identity_bytes(eng: WindowEngine) -> tuple[int, int, int]:
    """(the slab's arena, its per-cell arrays, identities taken and not yet handed over)."""
    arena, cells = eng._ids.nbytes()
    return arena, cells, sum(g.nbytes() for g in eng._waiting)


def stream(meters: int, seconds: int, rng: np.random.Generator) -> Iterator[Readings]:
    phase = rng.integers(0, 1000, meters)
    slot = np.arange(meters, dtype=np.int32)
    m_left, t_left = np.empty(0, np.int32), np.empty(0, np.int64)
    for s in range(seconds):
        again = rng.random(meters) < 0.01
        m = np.concatenate([m_left, slot, slot[again]])
        t = np.concatenate([t_left, BASE_MS + s * 1000 + phase, BASE_MS + s * 1000 + phase[again]])
        while len(m) >= BATCH or (s == seconds - 1 and len(m)):
            yield readings(m[:BATCH], t[:BATCH])
            m, t = m[BATCH:], t[BATCH:]
        m_left, t_left = m, t


def readings(m: NDArray[np.int32], t: NDArray[np.int64]) -> Readings:
    n = len(m)
    return Readings(m, np.zeros(n, np.int32), t, np.ones(n), np.ones(n), np.full(n, 230.0),
                    (m % PARTITIONS).astype(np.int32), np.arange(n, dtype=np.int64))


def held_bytes(meters: int, seconds: int) -> None:
    regions = Interner()
    regions.slot("r")
    eng = WindowEngine(60, regions=regions, deduplicate=True)
    windows: list[NDArray[np.int64]] = []  # per batch, the windows of its counted readings
    epochs: list[int] = []
    epoch, retired, next_cut, n, add_s = 0, -1, BASE_MS + 60_000, 0, 0.0
    for r in stream(meters, seconds, np.random.default_rng(1)):
        now = int(r.ts_ms.max())
        t0 = time.perf_counter()
        counted = eng.add_distinct(r, now).counted
        add_s += time.perf_counter() - t0
        n += len(r)
        windows.append(r.ts_ms[counted] // 60_000)
        epochs.append(epoch)
        if now < next_cut:
            continue
        w = np.concatenate(windows)
        since = np.repeat(np.array(epochs) == epoch, [len(x) for x in windows])
        held = int(np.count_nonzero(since | (w > retired)))
        arena, cells, waiting = identity_bytes(eng)
        print(f"held {held:>11,}: arena {arena / held:.2f} B, per-cell arrays "
              f"{cells / held:.2f} B, waiting {waiting / held:.2f} B, total "
              f"{(arena + cells + waiting) / held:.2f} B a reading")
        eng.drain()
        eng.take_identities()
        epoch, retired = epoch + 1, (now - LATENESS_MS) // 60_000 - 1
        next_cut += 60_000
    print(f"{n:,} readings, add_distinct {add_s / n * 1e9:.0f} ns a reading")


def cut_peak(meters: int) -> None:
    names, regions = Interner(), Interner()
    for i in range(meters):
        names.slot(f"meter-{i:06d}")
    regions.slot("r")
    tracemalloc.start()
    eng = WindowEngine(60, regions=regions, deduplicate=True)
    det, written = AnomalyDetector(), WrittenWindows()
    phase = np.random.default_rng(1).integers(0, 1000, meters)
    slot = np.arange(meters, dtype=np.int32)
    for s in range(100):
        r = readings(slot, BASE_MS + s * 1000 + phase)
        eng.add_distinct(r, int(r.ts_ms.max()))
        det.check(r)
    state, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    partials = eng.drain()
    payload = Payload(partials, det.take_dirty(), {}, written.fresh(partials))
    payload.identities = eng.take_identities()
    payload.undecided = eng.take_undecided()
    count = len(payload.identities)
    parts = payload.split(2)
    del payload
    fields, region_fields = TextFields(names.names).fields(), TextFields(regions.names).fields()
    jobs = [part.commit_job(fields, region_fields, region_ranks(regions)) for part in parts]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{meters:,} meters × 100 s: {count:,} identities, {state / 1e6:.1f} MB traced "
          f"before the final checkpoint, its cut and encoding +{(peak - state) / 1e6:.1f} MB "
          f"at the peak ({len(jobs)} parts)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=100_000)
    ap.add_argument("--seconds", type=int, default=240, help="event time of the stream")
    ap.add_argument("--cut-meters", type=int, default=50_000,
                    help="meters of the checkpoint measurement (0: skip it)")
    args = ap.parse_args(argv)
    held_bytes(args.meters, args.seconds)
    if args.cut_meters:
        cut_peak(args.cut_meters)


if __name__ == "__main__":
    main()
