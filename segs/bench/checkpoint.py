"""Checkpoint: time of :meth:`segs.sink.Sink.commit` for N partial aggregates (1-minute
rows of N distinct meters), first as new rows, then merged into those same rows.

The rows are built before the clock starts, as the worker builds them before its commit;
the timed part is the whole transaction (binary COPY, merge, positions). The sink derives
the 15-minute rows from the 1-minute partials, so ``*_rows`` (rows written, both tables)
is twice the partials."""

from __future__ import annotations

import time
from typing import Any

from segs.bench.infra import Servers, fresh_database
from segs.sink import Sink

_T0_MS = 1_795_759_200_000  # 2026-11-27T06:00:00Z


def _partials(n: int, salt: int) -> list[tuple[Any, ...]]:
    return [(f"MTR-{i:08d}", "north", _T0_MS, 10, 25.0 + salt, 3.5 + salt, 1.5,
             0.02, _T0_MS + 59_000, i % 6) for i in range(n)]


def run_checkpoint(srv: Servers, sizes: list[int]) -> list[dict[str, Any]]:
    results = []
    for n in sizes:
        with fresh_database(srv.postgres_url) as db:
            sink = Sink(db, consumer_group="segs-bench", topic="raw_readings")
            sink.open()
            try:
                sink.ping()
                row: dict[str, Any] = {"partials": n}
                prev: int | None = None
                for phase, salt in (("new_s", 0), ("merge_s", 1)):
                    rows = _partials(n, salt)
                    nxt = (prev or 0) + n
                    t0 = time.perf_counter()
                    stats = sink.commit(rows, [], {0: (prev, nxt, None)})
                    row[phase] = time.perf_counter() - t0
                    row[phase.replace("_s", "_rows")] = sum(stats.rows.values())
                    prev = nxt
                row["merge_rows_per_s"] = n / row["merge_s"]
                results.append(row)
            finally:
                sink.close()
    return results
