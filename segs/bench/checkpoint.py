"""Checkpoint: time of the worker's database step for N partial aggregates (1-minute rows of
N distinct meters spread over the 6 partitions of the topic, as one worker holds them with
``--workers 1``), first as new rows, then merged into those same rows, then merged once
more as a restarted worker would (``replay``): it knows nothing it wrote, only the newest
event time stored for each partition, and takes the windows starting by then for stored.
``restart`` is a restart in the middle of the window: another restarted worker's checkpoint
of N partials of that window, half of them of meters stored (merged), half of new ones.

The payload is built before the clock starts, as the worker builds it before its commit;
the timed part is what the worker runs: the cut along partitions
(:meth:`segs.checkpoint.payload.Payload.split`), the encoding of each part as COPY data
(:meth:`segs.checkpoint.payload.Payload.job`) and the transactions side by side
(:meth:`segs.checkpoint.sink.Sink.commit_all`: binary COPY, merge, positions), as many as
``CHECKPOINT_WRITERS`` in the environment says (default 2), read as the service reads it.
Up to 100,000 partials each size runs ``REPEATS`` times, each in a fresh database; the
figures are the medians, and ``*_runs`` lists every run (they spread by ±20 % on the 2-core
machine, where PostgreSQL shares the cores with everything else).
The 15-minute partials are the roll-up of the 1-minute ones (in :meth:`Payload.job`, timed),
one per meter here, so ``*_rows`` (rows written, both tables) is twice the partials.

:func:`run_checkpoint_dedup` compares ``DEDUPLICATE`` off and on: the same runs, alternating,
on writing each partial's identities (10 readings each, as the partials count) beside it."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from segs.bench.infra import Servers, fresh_database
from segs.checkpoint.payload import Payload, WrittenWindows
from segs.checkpoint.pgcopy import TextFields
from segs.checkpoint.sink import CommitStats, Positions, PositionWrite, Sink
from segs.config import load_settings
from segs.detection.detector import BaselineState
from segs.intake.readings import Interner
from segs.windows.identities import IdentityLog
from segs.windows.partials import Partials, region_ranks

_T0_MS = 1_795_759_200_000  # 2026-11-27T06:00:00Z
PARTITIONS = 6
REPEATS = 3  # runs per size up to REPEATED_UP_TO partials; larger sizes run once
REPEATED_UP_TO = 100_000
PHASES = ("new", "merge", "replay", "restart")


def _payload(n: int, salt: int, prev: dict[int, int | None],
             written: WrittenWindows, deduplicate: bool = False, first: int = 0) -> Payload:
    """Partials of meters ``first`` … ``first + n - 1`` in one window."""
    ones = np.ones(n)
    meter = np.arange(first, first + n, dtype=np.int32)
    partials = Partials(
        size_s=60, meter=meter,
        window_start_ms=np.full(n, _T0_MS, np.int64), count=np.full(n, 10, np.int64),
        power_sum=ones * (25.0 + salt), power_max=ones * (3.5 + salt), power_min=ones * 1.5,
        energy_sum=ones * 0.02, last_ts_ms=np.full(n, _T0_MS + 59_000, np.int64),
        region=np.zeros(n, np.int32), partition=(meter % PARTITIONS).astype(np.int32),
        voltage_sum=ones * 2301.5, voltage_count=np.full(n, 10, np.int64))
    positions: Positions = {p: PositionWrite(prev[p], (prev[p] or 0) + n, None)
                             for p in range(PARTITIONS)}
    payload = Payload(partials, BaselineState.empty(), positions, written.fresh(partials),
                      newest_ms=dict.fromkeys(range(PARTITIONS), _T0_MS + 59_000))
    if deduplicate:  # 10 readings a partial, other ones each phase (a merge appends them),
        # one header a window as the engine hands them over (WindowEngine.take_identities)
        payload.identities = IdentityLog.grouped(
            partials.meter, partials.window_start_ms, partials.partition,
            np.full(n, 10, np.int64),
            np.tile((np.arange(10) * 6_000 + salt * 100).astype(np.uint16), n))
    return payload


def run_checkpoint(srv: Servers, sizes: list[int]) -> list[dict[str, Any]]:
    results = []
    writers = load_settings(env=os.environ, env_file=None).checkpoint_writers  # as the service
    for n in sizes:
        # names encoded before the clock starts, as the worker keeps them encoded
        meters = TextFields([f"MTR-{i:08d}" for i in range(n + n // 2)]).fields()
        region_names = Interner()
        region_names.slot("north")
        regions, rank = TextFields(region_names.names).fields(), region_ranks(region_names)
        runs = [_run(srv, n, writers, meters, regions, rank)
                for _ in range(REPEATS if n <= REPEATED_UP_TO else 1)]
        row: dict[str, Any] = {"partials": n, "partitions": PARTITIONS, "writers": writers}
        for phase in PHASES:
            row[f"{phase}_s"] = statistics.median(r[f"{phase}_s"] for r in runs)
            row[f"{phase}_runs"] = [r[f"{phase}_s"] for r in runs]
            row[f"{phase}_rows"] = runs[0][f"{phase}_rows"]
        row["merge_rows_per_s"] = n / row["merge_s"]
        results.append(row)
    return results


def run_checkpoint_dedup(srv: Servers, sizes: list[int]) -> list[dict[str, Any]]:
    """Per size, ``REPEATS`` rounds of a run with ``DEDUPLICATE`` off then one with it on,
    each in a fresh database; medians per phase and the cost of on over off."""
    results = []
    writers = load_settings(env=os.environ, env_file=None).checkpoint_writers
    for n in sizes:
        meters = TextFields([f"MTR-{i:08d}" for i in range(n + n // 2)]).fields()
        region_names = Interner()
        region_names.slot("north")
        regions, rank = TextFields(region_names.names).fields(), region_ranks(region_names)
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(REPEATS):
            for dedup in (False, True):
                runs[dedup].append(_run(srv, n, writers, meters, regions, rank, dedup))
        row: dict[str, Any] = {"partials": n, "partitions": PARTITIONS, "writers": writers}
        for phase in PHASES:
            for dedup, name in ((False, "off"), (True, "on")):
                row[f"{phase}_{name}_s"] = statistics.median(r[f"{phase}_s"] for r in runs[dedup])
                row[f"{phase}_{name}_runs"] = [r[f"{phase}_s"] for r in runs[dedup]]
            row[f"{phase}_cost"] = row[f"{phase}_on_s"] / row[f"{phase}_off_s"] - 1
        results.append(row)
    return results


def _run(srv: Servers, n: int, writers: int, meters: Sequence[bytes], regions: Sequence[bytes],
         rank: NDArray[np.int64], deduplicate: bool = False) -> dict[str, Any]:
    """One checkpoint of ``n`` new partials, then one merging into them and one replaying
    them, in a fresh database."""
    row: dict[str, Any] = {}
    with fresh_database(srv.postgres_url) as db:
        sink = Sink(db, consumer_group="segs-bench", topic="raw_readings", writers=writers)
        sink.open()
        try:
            sink.ping()
            prev: dict[int, int | None] = dict.fromkeys(range(PARTITIONS))
            written = WrittenWindows()
            for salt, phase in enumerate(PHASES):
                if phase in ("replay", "restart"):  # a restarted worker's, as it takes
                    written = WrittenWindows()  # its partitions
                    for p, pos in sink.load_positions(range(PARTITIONS)).items():
                        written.stored_through(p, pos.stored_newest(0))  # no watermarks
                payload = _payload(n, salt, prev, written, deduplicate,
                                   first=n // 2 if phase == "restart" else 0)
                t0 = time.perf_counter()
                done = sink.commit_all([p.commit_job(meters, regions, rank)
                                        for p in payload.split(sink.writers)])
                row[f"{phase}_s"] = time.perf_counter() - t0
                stats = [s for s in done if isinstance(s, CommitStats)]
                if len(stats) != len(done):
                    raise RuntimeError(f"checkpoint failed: {done}")
                row[f"{phase}_rows"] = sum(sum(s.rows.values()) for s in stats)
                prev = {p: pos.next_offset for p, pos in payload.positions.items()}
        finally:
            sink.close()
    return row
