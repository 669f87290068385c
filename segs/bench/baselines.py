"""Baselines: the checkpoint's upsert of N meters' detector state, first new, then stored.

``python -m segs.bench.baselines --meters 500000 --rounds 4`` writes the baselines of
``meters`` meters over the 6 partitions in one commit each round
(:meth:`segs.checkpoint.sink.Sink.commit`, binary COPY and upsert, as a checkpoint writes
them): the first round inserts them, every later one rewrites each of them, as every
checkpoint does for the meters that read something since the one before. ``--fillfactor``
sets ``meter_baselines``' fill factor after the migration (to compare with the schema's).

Prints per round the commit's seconds, then how many of the rewrites were HOT updates (no
index entries) and the table's size with its indexes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psycopg

from segs.bench.infra import fresh_database
from segs.bench.publish import PARTITIONS, _server
from segs.checkpoint.pgcopy import TextFields, copy_data
from segs.checkpoint.sink import Sink
from segs.times import NEVER

_T0_MS = 1_795_759_200_000  # 2026-11-27T06:00:00Z


def run(url: str, *, meters: int, rounds: int, fillfactor: int | None) -> dict[str, object]:
    names = TextFields([f"MTR-{m:08d}" for m in range(meters)]).fields()
    slot = np.arange(meters, dtype=np.int32)
    never = np.full(meters, NEVER, np.int64)
    seconds = []
    with fresh_database(url) as db:
        if fillfactor is not None:
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE meter_baselines SET (fillfactor = {int(fillfactor)})")
        sink = Sink(db, consumer_group="segs-bench", topic="raw_readings")
        sink.open()
        try:
            for r in range(rounds):
                data = copy_data(
                    [("source_partition", slot % PARTITIONS),
                     ("baseline", np.full(meters, 2.5 + r)),
                     ("samples", np.full(meters, 10 * (r + 1), np.int64)),
                     ("last_outage_ms", never), ("last_spike_ms", never),
                     ("last_drop_ms", never),
                     ("newest_reading_ms", np.full(meters, _T0_MS + r * 60_000, np.int64))],
                    [("meter_id", slot, names)])
                t0 = time.perf_counter()
                sink.commit({}, data, {})
                seconds.append(time.perf_counter() - t0)
        finally:
            sink.close()
        with psycopg.connect(db) as conn:
            updates, hot = conn.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'meter_baselines'").fetchone() or (0, 0)
            size = conn.execute(
                "SELECT pg_total_relation_size('meter_baselines')").fetchone() or (0,)
    return {"seconds": seconds, "updates": updates, "hot": hot, "size_mb": size[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=4, help="the first inserts (default 4)")
    parser.add_argument("--fillfactor", type=int, default=None,
                        help="meter_baselines' fill factor instead of the schema's")
    args = parser.parse_args()
    with _server() as url:
        r = run(url, meters=args.meters, rounds=args.rounds, fillfactor=args.fillfactor)
    times = r["seconds"]
    assert isinstance(times, list)
    print(f"{args.meters:,} baselines: new {times[0]:.2f} s, stored "
          f"{', '.join(f'{t:.2f}' for t in times[1:])} s; HOT {r['hot']:,} of "
          f"{r['updates']:,} updates; table {r['size_mb']:.0f} MB")


if __name__ == "__main__":
    main()
