"""What anomaly detection costs the pipeline: the same run with ANOMALY_DETECTION on and off.

    .venv/bin/python -m segs.bench.detector_cost [--readings 3000000] [--meters 100000]
                                                 [--rounds 2]

Starts a local Kafka and PostgreSQL, pre-loads the input topic once, then runs
``segs-stream run --workers 1`` over it alternately with detection on and off (each in a
fresh database and consumer group), and reports readings/s from start to the last stored
position, the worker's CPU seconds per reading and its peak RSS.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from segs.tools.harness import Service, create_topics, service_env, stored_positions
from segs.tools.local_servers import LocalKafka, LocalPostgres
from segs.tools.procfs import cpu_seconds, status_kb
from segs.tools.simulator import SimulatorOptions, produce

TOPICS = {"raw_readings": 6, "raw_readings.dlq": 1, "aggregates_1m": 1, "aggregates_15m": 1,
          "alerts": 1}


def run_once(kafka: LocalKafka, pg: LocalPostgres, readings: int, detection: str,
             log: Path) -> dict[str, float]:
    db = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = pg.url.rsplit("/", 1)[0] + "/" + db
    env = service_env(kafka.bootstrap, url, FLUSH_INTERVAL_1M="5000", LOG_LEVEL="warning",
                      ANOMALY_DETECTION=detection, KAFKA_GROUP_ID=f"bench-{db}")
    t0 = time.monotonic()
    stats: dict[int, tuple[float, int]] = {}
    with Service(env, log, workers=1, stop_timeout_s=120) as svc:
        while True:
            time.sleep(0.5)
            svc.check_alive()
            for pid in svc.worker_pids():
                cpu = cpu_seconds(pid)
                if cpu:  # 0: it just exited, keep what was read before
                    stats[pid] = (cpu, status_kb(pid, "VmHWM") // 1024)
            if sum(stored_positions(url, f"bench-{db}", "raw_readings").values()) >= readings:
                break
        elapsed = time.monotonic() - t0
    cpu = max((c for c, _ in stats.values()), default=0.0)
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
