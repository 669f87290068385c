"""How prefetch and batch size trade worker memory for throughput.

    .venv/bin/python -m segs.bench.prefetch_sweep [--readings 3000000] [--meters 100000]
                                                  [--workers 2] [--rounds 2]

Starts a local Kafka and PostgreSQL, pre-loads a 6-partition topic once, then runs
``segs-stream run`` over it once per setting below and round (fresh database and group
each time, as the ``pipeline`` scenario of ``segs-stream bench``): readings/s from the first
consumed message to the last stored position, the consume rate alone, worker CPU per
reading and peak RSS per worker.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from segs.bench import infra
from segs.bench.pipeline import run_pipeline
from segs.tools.harness import end_offsets
from segs.tools.simulator import SimulatorOptions

SMALL = ("max.partition.fetch.bytes=2097152,fetch.max.bytes=16777216,"
         "queued.min.messages=20000,queued.max.messages.kbytes=32768")
MEDIUM = ("max.partition.fetch.bytes=4194304,fetch.max.bytes=33554432,"
          "queued.min.messages=50000,queued.max.messages.kbytes=65536")
# name → environment of the service ({} = the defaults)
SETTINGS: dict[str, dict[str, str]] = {
    "small prefetch, batch 10k": {"KAFKA_EXTRA_CONFIG": SMALL, "BATCH_SIZE": "10000"},
    "small prefetch, batch 50k": {"KAFKA_EXTRA_CONFIG": SMALL},
    "medium prefetch, batch 50k": {"KAFKA_EXTRA_CONFIG": MEDIUM},
    "default prefetch, batch 10k": {"BATCH_SIZE": "10000"},
    "defaults (batch 50k)": {},
    "default prefetch, batch 100k": {"BATCH_SIZE": "100000"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=3_000_000)
    ap.add_argument("--meters", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    console = Console()
    table = Table(title=f"{args.readings:,} readings, {args.meters:,} meters, "
                        f"{args.workers} worker(s)")
    for col in ("setting", "round", "readings/s", "consume/s", "µs CPU/reading", "RSS MB"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    with tempfile.TemporaryDirectory(prefix="segs-sweep-") as tmp, infra.servers() as srv:
        topic = f"raw_readings.sweep.{infra.tag()}"
        infra.preload(srv.bootstrap, topic,
                      SimulatorOptions(meters=args.meters, count=args.readings))
        ends = end_offsets(srv.bootstrap, topic)
        for rnd in range(1, args.rounds + 1):
            for name, env in SETTINGS.items():
                r = run_pipeline(srv, topic, ends, workers=args.workers, workdir=Path(tmp),
                                 extra_env=env)
                row = (name, str(rnd), f"{r['readings_per_s']:,.0f}",
                       f"{r['consume_readings_per_s']:,.0f}",
                       f"{r['worker_cpu_us_per_reading']:.2f}",
                       ", ".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"]))
                table.add_row(*row)
                console.print("  ".join(row))
    console.print(table)


if __name__ == "__main__":
    main()
