"""Publishing: the database's side of publishing N closed 1-minute rows, by each path.

``python -m segs.bench.publish --meters 500000 --windows 2`` writes the 1-minute rows of
``meters`` meters × ``windows`` windows over the 6 partitions of the topic in one commit
(:meth:`segs.checkpoint.sink.Sink.commit`), then publishes them all with
:meth:`~segs.checkpoint.sink.Sink.claim_closed`, once per path, each in a fresh database:

* ``cursor``: committed with the partitions' positions, as their owner writes them: the rows
  come after the publishing cursor, and the claim moves the cursor past them;
* ``catch-up``: committed without positions (as a worker that does not own them), so every
  row waits for the catch-up path, which marks each one after delivery — the cost every row
  paid before schema/V011.

Delivery is left out (the rows are only counted): what is timed is the database's work and
the rows' way through Python. Prints one line per path: the commit's and the claim's
seconds, µs per row, and the table's size with its indexes.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import psycopg

from segs.bench.infra import fresh_database
from segs.checkpoint.sink import ClosedRow, Positions, PositionWrite, Sink
from segs.tools.local_servers import LocalPostgres, postgres_from_env

PARTITIONS = 6
_T0_MS = 1_795_759_200_000  # 2026-11-27T06:00:00Z


@contextlib.contextmanager
def _server() -> Iterator[str]:
    url = postgres_from_env()
    if url is not None:
        yield url
        return
    with LocalPostgres() as pg:
        yield pg.url


def run(url: str, *, meters: int, windows: int, owned: bool) -> dict[str, float]:
    rows = [(f"meter-{m:07d}", f"r{m % 7}", _T0_MS + w * 60_000, 6, 12.0, 3.0, 1.0, 0.1,
             _T0_MS + w * 60_000 + 59_000, m % PARTITIONS)
            for w in range(windows) for m in range(meters)]
    watermark = _T0_MS + windows * 60_000
    with fresh_database(url) as db:
        sink = Sink(db, consumer_group="bench", topic="readings")
        sink.open()
        try:
            positions: Positions = {}
            if owned:
                positions = {p: PositionWrite(None, 1, watermark) for p in range(PARTITIONS)}
            t0 = time.perf_counter()
            sink.commit({60: rows}, [], positions)
            t1 = time.perf_counter()
            delivered = 0

            def deliver(size_s: int, got: list[ClosedRow]) -> None:
                nonlocal delivered
                delivered += len(got)

            sink.claim_closed(dict.fromkeys(range(PARTITIONS), watermark), deliver)
            t2 = time.perf_counter()
        finally:
            sink.close()
        with psycopg.connect(db, autocommit=True) as conn:
            size = conn.execute(
                "SELECT COALESCE((SELECT hypertable_size('aggregates_1m') WHERE EXISTS ("
                "SELECT FROM pg_extension WHERE extname = 'timescaledb')), "
                "pg_total_relation_size('aggregates_1m'))").fetchone()
    if delivered != len(rows):
        raise SystemExit(f"published {delivered} of {len(rows)} rows")
    return {"rows": len(rows), "commit_s": t1 - t0, "claim_s": t2 - t1,
            "size_mb": (size[0] if size else 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=100_000)
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    with _server() as url:
        for name, owned in (("cursor", True), ("catch-up", False)):
            r = run(url, meters=args.meters, windows=args.windows, owned=owned)
            print(f"{name:8}: {r['rows']:,} rows, commit {r['commit_s']:.2f} s, claim "
                  f"{r['claim_s']:.2f} s ({r['claim_s'] * 1e6 / r['rows']:.1f} µs/row), "
                  f"table {r['size_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
