"""What anomaly detection costs the pipeline: the same run with ANOMALY_DETECTION on and off.

    python benchmarks/detector_cost.py [--readings 3000000] [--meters 100000] [--rounds 2]

Starts a local Kafka and PostgreSQL, pre-loads the input topic once, then runs
``segs-stream run --workers 1`` over it alternately with detection on and off (each in a
fresh database and consumer group), and reports readings/s from start to the last stored
position, the worker's CPU seconds per reading and its peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from segs.local_servers import LocalKafka, LocalPostgres, create_topics
from segs.simulator import SimulatorOptions, produce

SEGS = str(Path(sys.executable).with_name("segs-stream"))
TOPICS = {"raw_readings": 6, "raw_readings.dlq": 1, "aggregates_1m": 1, "aggregates_15m": 1,
          "alerts": 1}


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS MB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) // 1024
    return cpu, peak


def run_once(kafka: LocalKafka, pg: LocalPostgres, readings: int, detection: str,
             log: Path) -> dict[str, float]:
    db = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = pg.url.rsplit("/", 1)[0] + "/" + db
    env = {**os.environ, "KAFKA_BROKERS": kafka.bootstrap, "POSTGRES_URL": url, "PORT": "0",
           "FLUSH_INTERVAL_1M": "5000", "LOG_LEVEL": "warning", "ANOMALY_DETECTION": detection,
           "KAFKA_GROUP_ID": f"bench-{db}"}
    t0 = time.monotonic()
    with log.open("ab") as out:
        svc = subprocess.Popen([SEGS, "--env-file", "/dev/null", "run", "--workers", "1"],
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    stats: dict[int, tuple[float, int]] = {}
    try:
        while True:
            time.sleep(0.5)
            children = Path(f"/proc/{svc.pid}/task/{svc.pid}/children").read_text().split()
            for pid in map(int, children):
                with contextlib.suppress(OSError):  # a child that just exited
                    stats[pid] = _proc(pid)
            try:
                with psycopg.connect(url) as conn:
                    row = conn.execute("SELECT coalesce(sum(next_offset), 0) "
                                       "FROM stream_positions").fetchone()
            except psycopg.Error:
                continue
            if row and row[0] >= readings:
                break
        elapsed = time.monotonic() - t0
    finally:
        svc.send_signal(signal.SIGTERM)
        svc.wait(120)
    cpu = max((c for c, _ in stats.values()), default=0.0)  # the worker, not the tracker
    return {"readings_per_s": readings / elapsed, "cpu_us_per_reading": 1e6 * cpu / readings,
            "peak_rss_mb": max((m for _, m in stats.values()), default=0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=3_000_000)
    ap.add_argument("--meters", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="segs-detcost-") as tmp, LocalKafka() as kafka, \
            LocalPostgres() as pg:
        create_topics(kafka.bootstrap, TOPICS)
        produce(SimulatorOptions(meters=args.meters, count=args.readings, seed=1,
                                 anomaly_fraction=0.001),
                {"bootstrap.servers": kafka.bootstrap}, "raw_readings", progress=False)
        results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                r = run_once(kafka, pg, args.readings, mode, Path(tmp) / "service.log")
                results[mode].append(r)
                print(f"detection {mode:>3}: {r['readings_per_s']:>9,.0f} readings/s, "
                      f"{r['cpu_us_per_reading']:.2f} µs CPU/reading, "
                      f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
        mean = {m: sum(r["readings_per_s"] for r in rs) / len(rs) for m, rs in results.items()}
        print(f"with detection: {mean['on'] / mean['off']:.0%} of the throughput without it")


if __name__ == "__main__":
    main()
