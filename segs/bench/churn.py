"""Churn: waves of new meter ids, each idle before the next (issue 20).

``python -m segs.bench.churn --meters 1000000 --waves 3`` runs ``segs-stream run --workers 2``
(``FLUSH_INTERVAL_1M`` 10 s, other settings the defaults, so ``METER_IDLE_EVICT`` is 1 h)
against local servers and produces, per wave, ``--readings`` readings for each of
``--meters`` new meter ids, 10 s of event time apart, then one reading per partition
``METER_IDLE_EVICT`` + 2 min later, which makes the wave idle. Waves are 3 h of event time
apart. Per wave it reports the peak RSS (``VmHWM``, reset by ``clear_refs`` when the wave
starts) of each worker, the seconds until every message is consumed and until the wave's
meters are evicted (``stream_meters_evicted_total``), and at the end checks the
stored 1-minute rows: one per meter and minute, with every reading counted once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer

from segs.bench.infra import OutputTopics, Servers, fresh_database, servers, service, tag
from segs.errors import InfraError
from segs.tools.harness import create_topics
from segs.tools.procfs import status_kb

PARTITIONS = 6
HOUR_MS = 3_600_000
EVICT_MS = HOUR_MS  # the service's default METER_IDLE_EVICT
GAP_MS = 3 * HOUR_MS


def _iso(ms: int) -> bytes:
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return (t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z").encode()


def produce_wave(bootstrap: str, topic: str, wave: int, meters: int, readings: int,
                 start_ms: int) -> int:
    """Readings of the wave's meters (keyed by meter id), then the ticks; messages sent."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000,
                         "compression.type": "lz4"})
    sent = 0
    for k in range(readings):
        ts = _iso(start_ms + k * 10_000)
        for i in range(meters):
            meter = b"X%d-%07d" % (wave, i)
            value = (b'{"meterId":"' + meter + b'","region":"r%d","timestamp":"' % (i % 7)
                     + ts + b'","powerKw":%d.5,"energyKwh":0.25}' % (1 + i % 13))
            while True:
                try:
                    producer.produce(topic, value, meter)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
    tick = _iso(start_ms + EVICT_MS + 120_000)
    for p in range(PARTITIONS):
        value = b'{"meterId":"tick-%d","region":"r0","timestamp":"' % p + tick + (
            b'","powerKw":1.0,"energyKwh":0.0}')
        producer.produce(topic, value, b"tick-%d" % p, partition=p)
        sent += 1
    if producer.flush(120):
        raise InfraError("the churn producer could not deliver every message")
    return sent


def _reset_peak(pids: list[int]) -> None:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def run(srv: Servers, meters: int, readings: int, waves: int, workdir: Path) -> dict[str, Any]:
    topic = f"churn.{tag()}"
    create_topics(srv.bootstrap, {topic: PARTITIONS})
    topics = OutputTopics(topic)
    topics.create(srv.bootstrap)
    start = (int(time.time() * 1000) - (waves + 1) * GAP_MS) // 60_000 * 60_000
    out: dict[str, Any] = {"meters_per_wave": meters, "readings_per_meter": readings,
                           "waves": []}
    with fresh_database(srv.postgres_url) as db:
        svc = service(srv.bootstrap, db, topics, 2, workdir / "churn.log",
                      FLUSH_INTERVAL_1M="10000")
        with svc:
            svc.wait_workers(2, 60)
            total = 0
            for wave in range(waves):
                pids = svc.worker_pids()
                _reset_peak(pids)
                t0 = time.perf_counter()
                total += produce_wave(srv.bootstrap, topic, wave, meters, readings,
                                      start + wave * GAP_MS)
                produced = time.perf_counter()
                _wait(svc, "stream_messages_total", total, 900)
                consumed = time.perf_counter()
                _wait(svc, "stream_meters_evicted_total", (wave + 1) * meters, 300)
                evicted = time.perf_counter()
                peaks = sorted(round(status_kb(pid, "VmHWM") / 1024, 1) for pid in pids)
                rss = sorted(round(status_kb(pid, "VmRSS") / 1024, 1) for pid in pids)
                w = {"wave": wave + 1, "produce_s": round(produced - t0, 1),
                     "consumed_s": round(consumed - t0, 1),
                     "evicted_s": round(evicted - t0, 1),
                     "worker_peak_rss_mb": peaks, "worker_rss_after_mb": rss}
                out["waves"].append(w)
                print(json.dumps(w), flush=True)
            code = svc.stop()
        out["exit_code"] = code
        out["exact"] = _check(db, meters, readings, waves)
    first, last = out["waves"][0], out["waves"][-1]
    out["last_to_first_peak"] = max(last["worker_peak_rss_mb"]) / max(
        first["worker_peak_rss_mb"])
    return out


def _wait(svc: Any, metric: str, bound: int, timeout_s: float) -> None:
    """Until ``metric`` ≥ ``bound``."""
    deadline = time.monotonic() + timeout_s
    while svc.metric(metric) < bound:
        svc.check_alive()
        if time.monotonic() > deadline:
            raise InfraError(f"{metric} = {svc.metric(metric)} after {timeout_s} s")
        time.sleep(0.2)


def _check(db: str, meters: int, readings: int, waves: int) -> dict[str, Any]:
    """One row per meter and minute of readings, each reading counted once."""
    with psycopg.connect(db) as conn:
        rows, counted = conn.execute(
            "SELECT count(*), sum(sample_count) FROM aggregates_1m "
            "WHERE meter_id NOT LIKE 'tick-%'").fetchone() or (0, 0)
    minutes = len({k * 10_000 // 60_000 for k in range(readings)})
    want_rows, want_counted = waves * meters * minutes, waves * meters * readings
    return {"rows": rows, "want_rows": want_rows, "readings": int(counted or 0),
            "want_readings": want_counted,
            "ok": rows == want_rows and counted == want_counted}


def time_lookups(srv: Servers, n: int = 50_000, stored: int = 1_000_000) -> dict[str, float]:
    """Seconds of one ``Sink.baselines_of`` of ``n`` meter ids: against an empty table,
    all of them among ``stored`` rows, none of them among those rows (best of 3)."""
    from segs.checkpoint.sink import Sink

    out: dict[str, float] = {}
    with fresh_database(srv.postgres_url) as db:
        sink = Sink(db, consumer_group="g", topic="t", writers=1, regional=False)
        sink.open()
        try:
            def best(names: list[str]) -> float:
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    sink.baselines_of(names)
                    times.append(time.perf_counter() - t0)
                return round(min(times), 3)

            names = [f"MTR-{i:08d}" for i in range(n)]
            out["empty"] = best(names)
            with psycopg.connect(db) as conn:
                conn.execute(
                    "INSERT INTO meter_baselines (consumer_group, meter_id, source_partition, "
                    "baseline, samples, last_outage_ms, last_spike_ms, last_drop_ms) "
                    "SELECT 'g', 'MTR-' || lpad(i::text, 8, '0'), 0, 1, 1, 0, 0, 0 "
                    "FROM generate_series(0, %s) i", (stored - 1,))
                conn.execute("ANALYZE meter_baselines")
            out["all_stored"] = best(names)
            out["none_stored"] = best([f"NEW-{i:08d}" for i in range(n)])
        finally:
            sink.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meters", type=int, default=1_000_000, help="new meter ids per wave")
    ap.add_argument("--readings", type=int, default=2, help="readings per meter and wave")
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--lookups", action="store_true",
                    help="only time the baseline lookup of 50,000 returning meters")
    args = ap.parse_args(argv)
    if args.lookups:
        with servers() as srv:
            print(json.dumps(time_lookups(srv)))
        return 0
    with tempfile.TemporaryDirectory(prefix="segs-churn-") as tmp, servers() as srv:
        result = run(srv, args.meters, args.readings, args.waves, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exact"]["ok"] and result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
